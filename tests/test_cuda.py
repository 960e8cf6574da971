"""CUDA code paths (run by bench/gpu_check.sh on a GPU; skipped on CPU machines): TreeMoE under bf16
autocast, fp32 routing on the device, CUDA-event exchange timing, the fused step flags, pinned batches and
bf16 inference against fp32."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
sys.path.insert(0, str(Path(__file__).parent))

CUDA = torch.device("cuda")


def test_tree_moe_bf16_autocast_on_cuda_matches_its_experts():
    import parallel_worker

    from unirestorer.parallel.tree_moe import TreeMoE

    layer = TreeMoE(parallel_worker.make_factory(seed=3), [1, 2]).to(CUDA)
    images, ids = torch.rand(2, 3, 16, 16, device=CUDA), torch.tensor([[2, 0], [0, 2]], device=CUDA)
    with torch.autocast("cuda", torch.bfloat16):
        out = layer(images, ids)
        alone = layer.local_module(2)(images[:1])
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2, 3, 16, 16)
    assert torch.allclose(out[0, 0].float(), alone[0].float(), atol=1e-2)
    out.float().sum().backward()
    idle = list(layer.local_module(1).parameters())
    assert all(p.grad is not None and not p.grad.any() for p in idle)


def test_tree_path_on_cuda_under_autocast_equals_cpu_fp32():
    from test_routing_precision import crowded_tree

    tree, queries = crowded_tree()
    with torch.autocast("cuda", torch.bfloat16):
        on_gpu = tree.path(queries.to(CUDA), check=False)
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.cpu() == tree.path(queries)).float().mean() > 0.999  # fp32 GPU vs CPU matmul rounding only


def test_comm_timer_reads_cuda_events():
    from unirestorer.parallel.dispatch import CommTimer

    CommTimer.enabled = True
    try:
        CommTimer.take()
        CommTimer.timed(torch.cuda._sleep, 50_000_000, cuda=True)  # ~tens of ms of GPU time, returns at once
        assert CommTimer.take() > 1e-3
        assert CommTimer.take() == 0.0
    finally:
        CommTimer.enabled = False


def test_step_flags_on_cuda():
    from unirestorer.launch.env import DistInfo
    from unirestorer.train.loop import step_flags
    from unirestorer.train.preemption import PreemptionHandler

    info, handler = DistInfo(0, 0, 1, CUDA), PreemptionHandler()
    assert step_flags(torch.tensor(1.0, device=CUDA), handler, info) == (True, False)
    handler.received = "SIGUSR1"
    assert step_flags(torch.tensor(float("nan"), device=CUDA), handler, info) == (False, True)


def test_bf16_restore_is_close_to_fp32(tiny_bundle):
    from unirestorer.restore import load_model, restore_tensor

    model = load_model(tiny_bundle, CUDA)
    x = torch.rand(1, 3, 64, 64, device=CUDA)
    y32, info32 = restore_tensor(model, x, tile=0)
    y16, info16 = restore_tensor(model, x, tile=0, bf16=True)
    assert info16["node"] == info32["node"]  # routing stays fp32
    assert y16.dtype == torch.float32 and (y16 - y32).abs().max() < 0.05


def test_loader_batches_are_pinned_on_cuda(tmp_path):
    from test_loader import cfg, write_set

    from unirestorer.data_shards.loader import make_loader

    spec, _ = write_set(tmp_path, "d", [4])
    batch = next(iter(make_loader(cfg([spec], num_workers=1))))
    assert batch["lq"].is_pinned() and batch["gt"].is_pinned()
