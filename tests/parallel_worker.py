"""One rank of the expert-parallel tests: real DeepSpeed engine, gloo, compared to one process.

Every rank builds the same global data (all ranks' images and routes from shared seeds) and a
single-process reference holding every expert; it checks its own outputs, input gradients and the
parameters of its own experts after each `engine.step()` (SGD lr 1, so update = -gradient), then
saves and reloads a DeepSpeed checkpoint. Errors go to a JSON file per rank for the test to judge.
Started by torch.multiprocessing (`run`, one case) or by the `deepspeed` launcher (`main`, many cases).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

LR = 1.0


def make_factory(seed: int):
    """Tiny NAFNet per node, seeded by node id; perturbed so zero-initialised scales get gradients too."""
    from unirestorer.model.experts import create_expert

    def factory(node: int) -> nn.Module:
        torch.manual_seed(seed * 1000 + node)
        net = create_expert("nafnet", "tiny")
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape))
        return net
    return factory


def make_step(step: dict, level_sizes: list[int], world: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: images [B, 3, size, size] and node ids [B, k], avoiding the step's idle nodes."""
    gen = torch.Generator().manual_seed(step["seed"])
    offsets = [sum(level_sizes[:i]) for i in range(len(level_sizes))]
    allowed = [[offsets[i] + j for j in range(n) if offsets[i] + j not in step["idle"]]
               for i, n in enumerate(level_sizes)]
    flat = [n for level in allowed for n in level]
    batches = []
    for rank in range(world):
        b = step["batch"][rank]
        images = torch.rand(b, 3, size, size, generator=gen)
        if step["k"] == 1:
            ids = torch.tensor([flat[i] for i in torch.randint(len(flat), (b,), generator=gen)]).view(b, 1)
        else:
            ids = torch.tensor([[lv[torch.randint(len(lv), (1,), generator=gen)] for lv in allowed]
                                for _ in range(b)], dtype=torch.long).view(b, len(level_sizes))
        batches.append((images, ids))
    return batches


def reference_outputs(ref: nn.ModuleList, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    rows = [ref[int(n)](images[i: i + 1]) for i in range(ids.shape[0]) for n in ids[i]]
    return torch.cat(rows).view(*ids.shape, *images.shape[1:]) if rows else images.new_zeros(*ids.shape, *images.shape[1:])


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def run(rank: int, world: int, port: int, case: dict, out_dir: str) -> None:
    """One case on `world` ranks started by torch.multiprocessing."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    run_case(rank, world, case, Path(out_dir, f"rank{rank}.json"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # not left to interpreter shutdown (train/preemption.py)


def main(cases_file: str, out_dir: str) -> None:
    """Several cases in one process group, one rank as started by the `deepspeed` launcher (ranks from the
    environment); each case writes `<out_dir>/<name>_rank<r>.json`."""
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for name, case in json.loads(Path(cases_file).read_text()).items():
        run_case(rank, world, {**case, "ckpt_dir": str(Path(out_dir, f"ckpt_{name}"))},
                 Path(out_dir, f"{name}_rank{rank}.json"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_case(rank: int, world: int, case: dict, out_file: Path) -> None:
    from unirestorer.parallel.tree_moe import TreeMoE, initialize

    levels, size, sizes = case["level_sizes"], case["size"], case.get("cluster_sizes")
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": case["zero"]}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    sgd = lambda groups: torch.optim.SGD(groups, lr=LR)  # noqa: E731
    factory = make_factory(seed=1)
    layer = TreeMoE(factory, levels, case.get("ep_sizes"), cluster_sizes=sizes)
    engine = initialize(layer, config, sgd)
    ref = nn.ModuleList(factory(n) for n in range(sum(levels)))
    errors: dict[str, float] = {}

    for s, step in enumerate(case["steps"]):
        batches = make_step(step, levels, world, size)
        images, ids = batches[rank]
        images = images.clone().requires_grad_(step["grad"])
        if step["grad"]:
            out = engine(images, ids)
            weights = [torch.randn(b[1].shape + b[0].shape[1:], generator=torch.Generator().manual_seed(99 + r))
                       / size ** 2 for r, b in enumerate(batches)]
            engine.backward((weights[rank] * out).sum())
            engine.step()
            ref_images = [b[0].clone().requires_grad_() for b in batches]
            ref_out = [reference_outputs(ref, x, b[1]) for x, b in zip(ref_images, batches)]
            total = sum((w * o).sum() for w, o in zip(weights, ref_out)) / world
            ref.zero_grad()
            total.backward()
            with torch.no_grad():
                for p in ref.parameters():
                    if p.grad is not None:  # experts no image reached
                        p.sub_(LR * p.grad)
            ref_grad = ref_images[rank].grad
            errors[f"step{s}_input_grad"] = max_err(images.grad, world * ref_grad) if images.numel() else 0.0
            errors[f"step{s}_params"] = max(max_err(p, q) for n in layer.local_nodes()
                                            for p, q in zip(layer.local_module(n).parameters(), ref[n].parameters()))
            errors[f"step{s}_output"] = max_err(out.detach(), ref_out[rank].detach())
        else:
            with torch.no_grad():
                out = engine(images, ids)
                errors[f"step{s}_output"] = max_err(out, reference_outputs(ref, images, ids))
        errors[f"step{s}_shape_ok"] = float(tuple(out.shape) != (*ids.shape, 3, size, size))

    if case.get("ckpt", True):
        errors.update(checkpoint_round_trip(engine, case, rank, world, config, sgd))
    out_file.write_text(json.dumps({"errors": errors, "balanced": layer.placement.balanced,
                                    "slot_nodes": layer.slot_nodes.tolist(), "nodes": layer.local_nodes()}))
    torch.distributed.barrier()


def checkpoint_round_trip(engine, case: dict, rank: int, world: int, config: dict, sgd) -> dict[str, float]:
    """Save, load into an engine built from other weights, compare bit for bit."""
    from unirestorer.parallel.tree_moe import TreeMoE, expected_checkpoint_files, initialize

    levels, layer = case["level_sizes"], engine.module
    ckpt = Path(case["ckpt_dir"])
    engine.save_checkpoint(str(ckpt), tag="t")
    torch.distributed.barrier()
    saved = set(os.listdir(ckpt / "t"))
    errors = {"ckpt_missing_files": float(len(set(expected_checkpoint_files(layer.placement)) - saved))}
    other = initialize(TreeMoE(make_factory(seed=2), levels, case.get("ep_sizes"), cluster_sizes=case.get("cluster_sizes")),
                       config, sgd)
    other.load_checkpoint(str(ckpt), tag="t")
    mine, theirs = engine.module.state_dict(), other.module.state_dict()
    errors["ckpt_keys_differ"] = float(mine.keys() != theirs.keys())
    errors["ckpt_not_bit_exact"] = float(sum(not torch.equal(mine[k], theirs[k]) for k in mine))
    images, ids = make_step(case["steps"][0], levels, world, case["size"])[rank]
    with torch.no_grad():
        errors["ckpt_forward_not_equal"] = float(not torch.equal(engine(images, ids), other(images, ids)))
    return errors


if __name__ == "__main__":
    import sys

    main(*sys.argv[1:])

