"""Dropless variable-split all-to-all: each image travels alone to the rank that holds its expert.

DeepSpeed's stock MoE pads every expert's buffer to a shared capacity (or drops images past it).
Here a rank sends exactly the rows it routes to each peer: split sizes (and the image shape) are
exchanged first, then one `all_to_all_single` moves the rows, and autograd runs the mirror exchange
in backward. Ranks may hold any number of rows, zero included.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class CommTimer:
    """Time spent inside the exchanges of this module, for benchmarks and the experts stage's log (off by
    default). Gloo calls block, so the host clock times them (`seconds`). NCCL calls only enqueue work, so on
    CUDA a pair of events on the current stream brackets each call (the stream waits for the collective's
    end before its next kernel); `take()` reads them, a sync, so call it at log steps only."""

    enabled = False
    seconds = 0.0
    _events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @classmethod
    def timed(cls, fn, *args, cuda: bool = False, **kwargs):
        if not cls.enabled:
            return fn(*args, **kwargs)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            cls._events.append((start, end))
            return out
        start_s = time.perf_counter()
        out = fn(*args, **kwargs)
        cls.seconds += time.perf_counter() - start_s
        return out

    @classmethod
    def take(cls) -> float:
        """Seconds spent in exchanges since the last `take` (host-timed plus CUDA-event-timed), then reset."""
        if cls._events:
            cls._events[-1][1].synchronize()
        total = cls.seconds + sum(start.elapsed_time(end) for start, end in cls._events) / 1e3
        cls.seconds, cls._events = 0.0, []
        return total


class _AllToAllV(torch.autograd.Function):
    """`all_to_all_single` with per-peer split sizes; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx: Any, rows: Tensor, send_splits: list[int], recv_splits: list[int],
                recv_shape: tuple[int, ...], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.shape, ctx.group = (send_splits, recv_splits), tuple(rows.shape[1:]), group
        out = rows.new_empty((sum(recv_splits), *recv_shape))
        CommTimer.timed(dist.all_to_all_single, out, rows.contiguous(), recv_splits, send_splits, group=group,
                        cuda=out.is_cuda)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        send_splits, recv_splits = ctx.splits
        grad_rows = _AllToAllV.apply(grad.contiguous(), recv_splits, send_splits, ctx.shape, ctx.group)
        return grad_rows, None, None, None, None


def all_to_all_v(rows: Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                 recv_shape: Sequence[int], group: dist.ProcessGroup | None) -> Tensor:
    """Send `send_splits[p]` consecutive rows to peer p of `group`, receive `recv_splits[p]` rows
    of shape `recv_shape` from it, in peer order.

    Differentiable both ways. Every rank of `group` must call it, with the same dtype.
    """
    if group is None:
        return rows
    return _AllToAllV.apply(rows, [int(s) for s in send_splits], [int(s) for s in recv_splits],
                            tuple(int(d) for d in recv_shape), group)


def exchange_counts(counts: Tensor, row_shape: Sequence[int], group: dist.ProcessGroup | None) -> tuple[Tensor, list[int]]:
    """Tell every peer how many rows it gets per local expert, and learn the same from it.

    `counts[p, e]`: rows this rank sends to local expert e of peer p. Returns the received matrix
    (`[p, e]`: rows peer p sends to my expert e) and the row shape the senders use. The shape rides
    along so that a rank holding no images needs no shape of its own, and mixed shapes fail loudly.
    """
    peers = counts.shape[0]
    shape = torch.tensor(list(row_shape), dtype=torch.long).expand(peers, -1)
    message = torch.cat([counts.long().cpu(), shape], dim=1)
    if group is not None:
        message = message.to(_comm_device(group), non_blocking=True)  # one stream sync per exchange: the read below
        received = torch.empty_like(message)
        CommTimer.timed(dist.all_to_all_single, received, message, group=group, cuda=message.is_cuda)
        received = received.cpu()
    else:
        received = message
    recv_counts, shapes = received[:, : counts.shape[1]], received[:, counts.shape[1]:]
    senders = recv_counts.sum(1) > 0
    if senders.any():
        sender_shapes = shapes[senders].unique(dim=0)
        if sender_shapes.shape[0] > 1:
            raise ValueError(f"ranks sent images of different shapes in one call: {sender_shapes.tolist()}; "
                             "all images of one call must share C x H x W")
        row_shape = sender_shapes[0].tolist()
    return recv_counts, list(row_shape)


def _comm_device(group: dist.ProcessGroup) -> torch.device:
    """NCCL moves only device tensors, gloo only host ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
