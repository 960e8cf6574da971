"""The expert tree as DeepSpeed MoE layers: one `deepspeed.moe.layer.MoE` per granularity level.

DeepSpeed owns what it is good at: the expert / expert-data process groups of each ep_size, the MoE
optimizer param groups, ZeRO-1/2 gradient reduction and the per-expert checkpoint files. Its
capacity-padded gate and dispatch are not used: routes come from the tree (oracle paths while
experts train, the router's pick otherwise) and images travel through `dispatch.all_to_all_v`,
dropless and unpadded. Levels with the same ep_size share one exchange each way.

Naming: DeepSpeed sends every state-dict key under an MoE module that contains "expert" to the
per-expert files, so nothing here (and no attribute above this module) may contain that substring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import Tensor, nn

from .dispatch import all_to_all_v, exchange_counts
from .placement import IDLE, LevelPlacement, Placement, plan_placement

ExpertFactory = Callable[[int], nn.Module]
IDLE_PROBE = 16  # side of the blank image an idle expert runs on, unless it has a `multiple` (its smallest input)


class IdleSlot(nn.Module):
    """Fills a padding slot. One parameter, so DeepSpeed writes (and on load finds) its file."""

    def __init__(self) -> None:
        super().__init__()
        self.placeholder = nn.Parameter(torch.zeros(1))

    def forward(self, images: Tensor) -> Tensor:
        """Only ever sees the zero-weighted probe that gives idle experts their zero gradients."""
        return images * self.placeholder


@dataclass
class _Exchange:
    """Levels sharing one ep_size: one DeepSpeed group, one all-to-all each way."""

    ep_size: int
    levels: list[int]
    modules: list[nn.Module]


def _inverse(perm: Tensor) -> Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _wire_dtype(images: Tensor) -> torch.dtype:
    """Images travel in the autocast dtype when autocast is on (bf16 on GPU), else in their own."""
    kind = images.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else images.dtype


class TreeMoE(nn.Module):
    """All experts of a degradation tree, placed over ranks, called with per-image routes.

    `factory(node_id)` builds the expert of a tree node (global breadth-first id). Only the experts
    placed on this rank are built. With `cluster_sizes` (training images per node) a skewed placement
    is balanced by expected load (parallel/placement.py). Construct after `deepspeed.init_distributed`
    and wrap with `initialize` (or `deepspeed.initialize`), which creates the process groups.

    The buffer `slot_nodes` (`[levels, max slots]`, node id per slot, -1 idle or absent) goes into the
    dense checkpoint file, so every checkpoint says which node each per-expert file holds.
    """

    def __init__(self, factory: ExpertFactory, level_sizes: Sequence[int],
                 ep_sizes: Sequence[int] | None = None, cluster_sizes: Sequence[float] | None = None) -> None:
        super().__init__()
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.placement: Placement = plan_placement(level_sizes, dist.get_world_size() if distributed else 1,
                                                   ep_sizes, cluster_sizes=cluster_sizes)
        self.register_buffer("slot_nodes", slot_table(self.placement))
        self.levels = nn.ModuleList(self._build_level(lv, factory) for lv in self.placement.levels)
        self._exchanges = [
            _Exchange(ep, [lv.level for lv in self.placement.levels if lv.ep_size == ep], [])
            for ep in sorted({lv.ep_size for lv in self.placement.levels})]
        # Per node: its exchange, the ep position that holds it and its index among that position's
        # modules of the exchange (same layout on every position, so computable locally).
        exchange_of, dest, local = [], [], []
        for ex_id, ex in enumerate(self._exchanges):
            offset = 0
            for level in ex.levels:
                lv = self.placement.levels[level]
                ex.modules.extend(self._slots(level))
                for slot, node in enumerate(lv.slot_nodes):
                    if node != IDLE:
                        exchange_of.append((node, ex_id))
                        dest.append((node, slot // lv.local_slots))
                        local.append((node, offset + slot % lv.local_slots))
                offset += lv.local_slots
        self._exchange_of, self._dest, self._local = (
            torch.tensor([v for _, v in sorted(table)]) for table in (exchange_of, dest, local))
        self._checked_groups = False
        self.rows_computed = 0  # images run by this rank's experts in the last forward (load balance logs)

    def _build_level(self, lv: LevelPlacement, factory: ExpertFactory) -> MoE:
        # hidden_size 1 keeps DeepSpeed's unused gate tiny; it is frozen since routes come from the tree.
        moe = MoE(hidden_size=1, expert=nn.Identity(), num_experts=lv.num_slots, ep_size=lv.ep_size,
                  min_capacity=0, drop_tokens=False, use_rts=False)
        moe.deepspeed_moe.gate.wg.weight.requires_grad_(False)
        slots = [factory(lv.slot_nodes[s]) if lv.slot_nodes[s] != IDLE else IdleSlot()
                 for s in lv.slots_on(self.rank % lv.ep_size)]
        for module in slots:
            for param in module.parameters():
                param.allreduce, param.group_name = False, lv.group_name  # DeepSpeed's MoE-param markers
        moe.deepspeed_moe.experts.deepspeed_experts = nn.ModuleList(slots)
        return moe

    def _slots(self, level: int) -> list[nn.Module]:
        return list(self.levels[level].deepspeed_moe.experts.deepspeed_experts)

    @property
    def communicating_exchanges(self) -> int:
        """All-to-all pairs per forward that cross ranks (one per distinct ep_size > 1)."""
        return sum(1 for ex in self._exchanges if ex.ep_size > 1)

    def rows_per_rank(self) -> list[int]:
        """Collective: images each rank's experts ran in the last forward (idle probes not counted)."""
        rows = torch.zeros(self.placement.world_size, dtype=torch.long, device=self.slot_nodes.device)
        rows[self.rank] = self.rows_computed
        if self.placement.world_size > 1:
            dist.all_reduce(rows)
        return rows.tolist()

    def local_nodes(self) -> list[int]:
        return self.placement.nodes_on_rank(self.rank)

    def local_module(self, node: int) -> nn.Module:
        """The expert of `node`, which must be placed on this rank."""
        level = self.placement.level_of_node()[node]
        lv = self.placement.levels[level]
        slot = lv.slot_of(node)
        if slot not in lv.slots_on(self.rank % lv.ep_size):
            raise KeyError(f"node {node} is not placed on rank {self.rank}")
        return self._slots(level)[slot % lv.local_slots]

    def placement_report(self, factory: ExpertFactory, cluster_sizes: Sequence[float] | None = None) -> str:
        """The placement report; parameter counts come from building every expert on the meta device."""
        with torch.device("meta"):
            params = [sum(p.numel() for p in factory(n).parameters()) for n in range(self.placement.num_nodes)]
        return self.placement.report(params, cluster_sizes)

    def _group(self, ex: _Exchange) -> dist.ProcessGroup | None:
        if ex.ep_size == 1:
            return None
        group = self.levels[ex.levels[0]].deepspeed_moe.ep_group
        if group is None:
            raise RuntimeError("expert-parallel groups are not set up: wrap the model with "
                               "unirestorer.parallel.tree_moe.initialize (or deepspeed.initialize) first")
        if not self._checked_groups:
            if dist.get_rank(group) != self.rank % ex.ep_size:
                raise RuntimeError("DeepSpeed placed expert-parallel groups differently than expected: "
                                   "use_data_before_expert_parallel is not supported")
            self._checked_groups = True
        return group

    def forward(self, images: Tensor, node_ids: Tensor) -> Tensor:
        """images `[B, C, H, W]`, node_ids `[B, k]` global node ids -> expert outputs `[B, k, C, H, W]`.

        Every rank must call it together (B may differ per rank, 0 included); within one call all
        images share C x H x W. Experts placed here that get no image still receive a zero gradient.
        """
        if node_ids.dim() != 2 or node_ids.shape[0] != images.shape[0]:
            raise ValueError(f"node_ids must be [B, k] with B = {images.shape[0]}, got {tuple(node_ids.shape)}")
        flat = node_ids.reshape(-1).long().cpu()
        if flat.numel() and (flat.min() < 0 or flat.max() >= self.placement.num_nodes):
            raise ValueError(f"node ids must lie in [0, {self.placement.num_nodes}), got {flat.unique().tolist()}")
        batch, k = node_ids.shape
        source = torch.arange(batch).repeat_interleave(k)
        self.rows_computed = 0
        pieces, picked, token = [], [], None
        for ex_id, ex in enumerate(self._exchanges):
            sel = (self._exchange_of[flat] == ex_id).nonzero().squeeze(1)
            rows, token = self._run_exchange(ex, images, source[sel], flat[sel], token)
            pieces.append(rows)
            picked.append(sel)
        out = torch.cat(pieces)[_inverse(torch.cat(picked)).to(images.device, non_blocking=True)]
        return out.view(batch, k, *out.shape[1:])

    def _run_exchange(self, ex: _Exchange, images: Tensor, source: Tensor, nodes: Tensor,
                      token: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Route rows to their experts over one group and back. `token` chains the communicating
        exchanges so that backward runs their collectives in the same order on every rank. Index tensors
        go host to device with non_blocking (no stream sync: CUDA stages pageable memory at once)."""
        group, wire = self._group(ex), _wire_dtype(images)
        peers, width = ex.ep_size, len(ex.modules)
        key = self._dest[nodes] * width + self._local[nodes]
        order = torch.argsort(key, stable=True)
        send = images.index_select(0, source[order].to(images.device, non_blocking=True)).to(wire)
        if group is not None and token is not None:
            send = send + 0.0 * token
        counts = torch.bincount(key, minlength=peers * width).view(peers, width)
        recv_counts, row_shape = exchange_counts(counts, images.shape[1:], group)
        received = all_to_all_v(send, counts.sum(1), recv_counts.sum(1), row_shape, group)
        self.rows_computed += int(recv_counts.sum())

        # Received rows come grouped by sender, then by local module; regroup by module and run.
        labels = torch.arange(width).repeat(peers).repeat_interleave(recv_counts.flatten())
        by_module = torch.argsort(labels, stable=True).to(received.device, non_blocking=True)
        chunks = received[by_module].split(recv_counts.sum(0).tolist())
        outs, idle = [], []
        for module, chunk in zip(ex.modules, chunks):
            if chunk.shape[0]:
                outs.append(module(chunk).to(wire))
            elif torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
                # An expert without images still runs (one blank probe, weight 0) so that it gets zero
                # gradients through the same graph as a real step: ZeRO/DDP hooks fire in the same
                # order on every rank and never wait. (Empty batches trip PixelShuffle's backward.)
                side = getattr(module, "multiple", IDLE_PROBE)  # the smallest input: the cheapest probe
                idle.append(module(received.new_zeros((1, row_shape[0], side, side))).sum())
        # With no rows here the result must still hang off `received`: the backward exchange of every
        # rank has to run, or the ranks that did get rows wait forever.
        result = torch.cat(outs)[_inverse(by_module)] if outs else 0.0 * received
        if idle:
            result = result + 0.0 * torch.stack(idle).sum().to(wire)
        back = all_to_all_v(result, recv_counts.sum(1), counts.sum(1), tuple(images.shape[1:]), group)
        if group is not None and back.requires_grad:
            token = back.sum()
        return back[_inverse(order).to(back.device, non_blocking=True)], token


def slot_table(placement: Placement) -> Tensor:
    """`[levels, max slots]` node id per slot (-1: idle padding, or past the level's slots)."""
    table = torch.full((len(placement.levels), max(lv.num_slots for lv in placement.levels)), IDLE, dtype=torch.long)
    for lv in placement.levels:
        table[lv.level, : lv.num_slots] = torch.tensor(lv.slot_nodes)
    return table


def moe_param_groups(model: nn.Module, **options: Any) -> list[dict]:
    """Optimizer param groups for DeepSpeed: dense params, then one group per ep_size, sorted.

    `max_group_size=None` keeps one group per ep_size, so ranks holding different experts build the
    same number of groups; DeepSpeed collects group names in a set, whose order depends on the
    per-process hash seed, so the MoE groups are sorted here or ZeRO collectives could pair up wrong.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": params, "name": "dense", **options}, max_group_size=None)
    dense = [g for g in groups if not g.get("moe") and g["params"]]
    return dense + sorted((g for g in groups if g.get("moe")), key=lambda g: g["name"])


def check_ds_config(config: dict) -> None:
    """Reject DeepSpeed settings that break MoE training here, with the reason."""
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage >= 3:
        raise ValueError(f"ZeRO stage {stage} does not support DeepSpeed MoE layers; use stage 1 or 2")
    if "gradient_clipping" not in config:
        raise ValueError("set gradient_clipping explicitly in the DeepSpeed config "
                         "(deepspeed 0.19 clips at 1.0 when it is missing; 0 disables clipping)")
    if config.get("use_data_before_expert_parallel_"):
        raise ValueError("use_data_before_expert_parallel_ is not supported by TreeMoE's placement")


def initialize(model: nn.Module, config: dict,
               optimizer: Callable[[list[dict]], torch.optim.Optimizer] | None = None) -> Any:
    """`deepspeed.initialize` with a checked config and MoE param groups; returns the engine.

    `optimizer(param_groups)` builds a client optimizer; without it the config's optimizer is used.
    """
    check_ds_config(config)
    groups = moe_param_groups(model)
    engine, *_ = deepspeed.initialize(model=model, config=config,
                                      optimizer=optimizer(groups) if optimizer else None,
                                      model_parameters=None if optimizer else groups)
    return engine


def expected_checkpoint_files(placement: Placement) -> list[str]:
    """Per-expert files DeepSpeed writes when TreeMoE is the model's only MoE: layer = level, expert = slot."""
    return [f"layer_{lv.level}_expert_{slot}_mp_rank_00_model_states.pt"
            for lv in placement.levels for slot in range(lv.num_slots)]

