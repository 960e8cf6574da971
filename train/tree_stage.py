"""What the experts and router stages share: the engine's module, the experts' constructors, the init
checkpoint, placement checks, data streams and PSNR validation over the tree.

The experts' constructors are stored in the stage state of both stages: `expert_spec` (create_expert kwargs,
the same for every node) and `expert_lora` ({rank, alpha} of a LoRA tree, null for full experts), so the
router stage and export build exactly the experts the checkpoint holds.

Module attribute names (`extractor`, `tree_moe`, later `router`) are shared by both stages, so one
checkpoint's weights load into the other by name; none contains "expert" (DESIGN §3).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unirestorer.data_shards.loader import StreamConfig
from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.lora import tree_expert
from unirestorer.model.tree import DegradationTree
from unirestorer.parallel.placement import plan_placement
from unirestorer.parallel.tree_moe import TreeMoE
from unirestorer.train.config import ConfigError, RunConfig
from unirestorer.train.stage_state import extractor_from_checkpoint, tree_from_state
from unirestorer.train.weights import Checkpoint, read_checkpoint


class TreeModule(nn.Module):
    """What the engine holds: the frozen extractor, the experts as a TreeMoE and (router stage) the router,
    with which the experts are frozen too. Frozen parts stay in eval mode whatever the engine asks."""

    def __init__(self, extractor: nn.Module, tree_moe: TreeMoE, router: nn.Module | None = None) -> None:
        super().__init__()
        self.extractor = extractor.requires_grad_(False)
        self.tree_moe = tree_moe if router is None else tree_moe.requires_grad_(False)
        if router is not None:
            self.router = router

    def train(self, mode: bool = True) -> "TreeModule":
        super().train(mode)
        self.extractor.eval()
        if hasattr(self, "router"):
            self.tree_moe.eval()
        return self

    def forward(self, images: Tensor, node_ids: Tensor) -> Tensor:
        return self.tree_moe(images, node_ids)


def expert_spec(cfg: RunConfig) -> dict:
    """create_expert kwargs of every node (stored in checkpoints and bundles). `stat_window` is the training
    patch: at test time the experts pool statistics over it (TLSC, model/local_stats.py), as they learned to;
    on patches no larger than it they pool globally, so training is unchanged."""
    m, window = cfg.model, {"stat_window": cfg.data.patch_size}
    if m.preset:
        return {"name": m.arch, "preset": m.preset, **window}
    if m.arch != "restormer":
        raise ConfigError(f"model.preset is empty: set it for arch {m.arch!r} (tiny, small or paper)")
    return {"name": "restormer", "preset": "paper", "dim": m.dim, "blocks": list(m.num_blocks),
            "heads": list(m.heads), "ffn_expansion": m.ffn_expansion, **window}


def expert_lora(cfg: RunConfig) -> dict | None:
    """{rank, alpha} of the LoRA tree `model.lora_rank > 0` asks for; None: a full expert per node."""
    m = cfg.model
    if m.lora_rank < 0 or (m.lora_rank and not m.lora_alpha > 0):
        raise ConfigError(f"model.lora_rank={m.lora_rank} / model.lora_alpha={m.lora_alpha}: the rank must be >= 0 "
                          f"(0 = full experts) and, for a LoRA tree, alpha > 0")
    return {"rank": m.lora_rank, "alpha": float(m.lora_alpha)} if m.lora_rank else None


def node_factory(spec: dict, seed: int, lora: dict | None = None) -> Callable[[int], nn.Module]:
    """Expert of a node (model/lora.py: tree_expert), initialised from (seed, node) so any placement builds the
    same weights."""
    def factory(node: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100003 + node)
            return tree_expert(spec, node, lora)
    return factory


def load_init(cfg: RunConfig) -> tuple[DegradationExtractor, DegradationTree, Checkpoint]:
    """Extractor (from `train.init_ckpt`) and tree (the init checkpoint's stage state, else `tree.path`);
    also returns the init checkpoint (expert files not read)."""
    if not cfg.train.init_ckpt:
        raise ConfigError(f"train.init_ckpt is empty: stage {cfg.train.stage!r} needs an earlier stage's checkpoint")
    ckpt = read_checkpoint(cfg.train.init_ckpt, experts=False)
    state = ckpt.client_state.get("stage_state", {})
    extractor = extractor_from_checkpoint(ckpt)
    if "tree_meta" in state:  # the experts were trained on this tree: it wins over tree.path
        tree = tree_from_state(state, str(ckpt.path))
    elif cfg.tree.path:
        tree = DegradationTree.load(cfg.tree.path)
    else:
        raise ConfigError(f"tree.path is empty and {ckpt.path} holds no tree: give the `cluster` stage's folder")
    return extractor, tree, ckpt


def check_placement(cfg: RunConfig, tree: DegradationTree, world: int) -> list[int] | None:
    """Fail before any work when the configured ep_sizes cannot be placed on this world (e.g. elastic 2 → 1)."""
    ep = list(cfg.tree.ep_sizes) or None
    try:
        plan_placement(tree.level_sizes, world, ep)
    except ValueError as err:
        raise ConfigError(f"tree.ep_sizes={ep} cannot be placed on {world} rank(s) for tree levels "
                          f"{tree.level_sizes}: {err}. Set tree.ep_sizes to divisors of {world} (or [] = auto)"
                          ) from None
    return ep


def stream_config(cfg: RunConfig, micro_batch: int, sources: list[str], weights: list[float] | None,
                  val: bool = False) -> StreamConfig:
    d = cfg.data
    return StreamConfig(sources=sources, weights=weights, patch=d.patch_size, batch_size=micro_batch,
                        num_workers=0 if val else d.num_workers, shuffle_buffer=0 if val else d.shuffle_buffer,
                        batches_per_epoch=cfg.log.val_batches if val else d.batches_per_epoch,
                        seed=cfg.train.seed + (7919 if val else 0), augment=not val, online=d.online and not val)


def psnr(out: Tensor, gt: Tensor) -> Tensor:
    """Per image PSNR (RGB float in [0, 1], no rounding: the PromptIR convention)."""
    mse = (out.float().clamp(0, 1) - gt.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def all_sum(x: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def image_grids(lq: Tensor, out: Tensor, gt: Tensor, nodes: Tensor, tasks: list[str], what: str,
                n: int = 4) -> dict[str, Tensor]:
    """TensorBoard images: LQ | output | GT side by side, tagged with the task and the expert's node."""
    return {f"{i}_{task}/{what}_node{int(node)}": torch.cat([lq[i], out[i].float().clamp(0, 1), gt[i]], dim=2).cpu()
            for i, (task, node) in enumerate(zip(tasks[:n], nodes[:n]))}


def validate_psnr(engine: Any, tree: DegradationTree, stream: Iterable[dict],
                  nodes_of: Callable[[Tensor, Tensor], Tensor], names: list[str],
                  grids: dict[str, Tensor] | None = None, autocast: bool = False) -> dict[str, float]:
    """Mean PSNR per task of the experts `nodes_of(embeddings, paths) -> [B, len(names)]` picks (and of the
    input); every rank takes part. Routing runs in fp32; `autocast`: the experts under bf16 autocast."""
    module, n_tasks = engine.module, len(tree.task_names)
    sums = torch.zeros(len(names) + 1, n_tasks + 1, dtype=torch.float64)  # last row: the input; column: unknown task
    counts = torch.zeros(n_tasks + 1, dtype=torch.float64)
    param = next(module.tree_moe.parameters())
    was = module.training
    module.eval()
    with torch.no_grad():
        for batch in stream:
            lq, gt = batch["lq"].to(param.device, non_blocking=True), batch["gt"].to(param.device, non_blocking=True)
            task = torch.tensor([tree.task_names.index(t) if t in tree.task_names else n_tasks
                                 for t in batch["task"]], dtype=torch.long)
            e = module.extractor.embed(lq)
            nodes = nodes_of(e, tree.path(e, check=False))
            with torch.autocast(param.device.type, torch.bfloat16, enabled=autocast):
                out = engine(lq.to(param.dtype), nodes)
            if grids is not None and not grids:
                grids.update(image_grids(lq, out[:, 0], gt, nodes[:, 0], batch["task"], names[0]))
            for col in range(len(names)):
                sums[col].index_add_(0, task, psnr(out[:, col], gt).double().cpu())
            sums[-1].index_add_(0, task, psnr(lq, gt).double().cpu())
            counts += torch.bincount(task, minlength=n_tasks + 1).double()
    module.train(was)
    total = all_sum(torch.cat([sums.flatten(), counts]).to(param.device)).cpu()
    sums, counts = total[:-n_tasks - 1].view(len(names) + 1, n_tasks + 1), total[-n_tasks - 1:]
    out: dict[str, float] = {}
    for t, name in enumerate(tree.task_names):
        if counts[t] > 0:
            for col, what in enumerate(names + ["input"]):
                out[f"psnr_{what}/{name}"] = float(sums[col, t] / counts[t])
    return out
