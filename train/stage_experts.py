"""Stage 3, `experts`: every tree node's expert at once, expert parallel, oracle routing (DESIGN §1.3, §3).

Each image goes to the k = n_levels experts on its tree path (`tree.path(extractor.embed(lq))`, the
extractor frozen); the loss is the mean L1 (or PSNR loss) over the k outputs. Every level has its own
peak LR (`train.level_lrs`) and start step (`train.level_start_steps`): a level trains from its start on
a warmup + cosine schedule of its own, and with `train.init_from_parent` its nodes first copy their
parent's weights (broadcast from the parent's rank, so any placement works).

Balanced sampling (`data.balance`, the documented simple rule): when `data.train_shards` holds several
single-task shard sets (a set's task is read from its first sample), the sets are mixed with weights
w_task = mean over leaves of the leaf's task share, so every leaf gets data in proportion 1/n_leaves
instead of its k-means size; `data.family_weights`, when given, wins.

Module attribute names (`extractor`, `tree_moe`, later `router`) are shared with the router stage, so
one checkpoint's weights load into the other by name; none contains "expert" (DESIGN §3).
"""

from __future__ import annotations

import json
import math
import sys
import tarfile
import time
from typing import Any, Callable, Iterable

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector

from unirestorer.data_shards.loader import StreamConfig, expand_source, make_loader
from unirestorer.launch.env import DistInfo
from unirestorer.model.experts import create_expert
from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.tree import DegradationTree
from unirestorer.parallel.dispatch import CommTimer
from unirestorer.parallel.placement import plan_placement
from unirestorer.parallel.tree_moe import TreeMoE, check_ds_config, moe_param_groups
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage import lr_lambda
from unirestorer.train.stage_cluster import load_extractor
from unirestorer.train.weights import load_submodule, read_checkpoint

EXTRACTOR = "extractor."  # module path of the frozen extractor in every stage's checkpoint


# ---------------------------------------------------------------- pieces shared with the router stage


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
    """create_expert kwargs of every node (stored in checkpoints and bundles)."""
    m = cfg.model
    if m.lora_rank:
        raise ConfigError("model.lora_rank > 0: LoRA trees are not trained by the experts stage yet; use 0")
    if m.preset:
        return {"name": m.arch, "preset": m.preset}
    if m.arch != "restormer":
        raise ConfigError(f"model.preset is empty: set it for arch {m.arch!r} (tiny, small or paper)")
    return {"name": "restormer", "preset": "paper", "dim": m.dim, "blocks": list(m.num_blocks),
            "heads": list(m.heads), "ffn_expansion": m.ffn_expansion}


def node_factory(spec: dict, seed: int) -> Callable[[int], nn.Module]:
    """Expert of a node, initialised from (seed, node) so any placement builds the same weights."""
    def factory(node: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 100003 + node)
            return create_expert(**spec)
    return factory


def tree_to_state(tree: DegradationTree) -> dict[str, Any]:
    meta, tensors = tree.to_state()
    return {"tree_meta": json.dumps(meta), "tree_centroids": tensors["centroids"]}


def tree_from_state(state: dict[str, Any], source: str) -> DegradationTree:
    return DegradationTree.from_state(json.loads(state["tree_meta"]), {"centroids": state["tree_centroids"]}, source)


def load_init(cfg: RunConfig) -> tuple[DegradationExtractor, DegradationTree, Any]:
    """Extractor (from `train.init_ckpt`) and tree (the init checkpoint's stage state, else `tree.path`);
    also returns the init checkpoint (weights.Checkpoint, expert files not read)."""
    if not cfg.train.init_ckpt:
        raise ConfigError(f"train.init_ckpt is empty: stage {cfg.train.stage!r} needs an earlier stage's checkpoint")
    ckpt = read_checkpoint(cfg.train.init_ckpt, experts=False)
    state = ckpt.client_state.get("stage_state", {})
    if "extractor_config" in state:  # an experts / router checkpoint: the extractor lives under `extractor.`
        extractor = DegradationExtractor(**json.loads(state["extractor_config"]))
        load_submodule(extractor, ckpt.dense, EXTRACTOR)
    else:  # the extractor stage's own checkpoint
        extractor, _ = load_extractor(cfg.train.init_ckpt)
    if "tree_meta" in state:  # the experts were trained on this tree: it wins over tree.path
        tree = tree_from_state(state, str(ckpt.path))
    elif cfg.tree.path:
        tree = DegradationTree.load(cfg.tree.path)
    else:
        raise ConfigError(f"tree.path is empty and {ckpt.path} holds no tree: give the `cluster` stage's folder")
    return extractor.eval(), tree, ckpt


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
                        seed=cfg.train.seed + (7919 if val else 0), augment=not val)


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
                  grids: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Mean PSNR per task of the experts `nodes_of(embeddings, paths) -> [B, len(names)]` picks (and of the
    input); every rank takes part."""
    module, n_tasks = engine.module, len(tree.task_names)
    sums = torch.zeros(len(names) + 1, n_tasks + 1, dtype=torch.float64)  # last row: the input; column: unknown task
    counts = torch.zeros(n_tasks + 1, dtype=torch.float64)
    param = next(module.tree_moe.parameters())
    was = module.training
    module.eval()
    with torch.no_grad():
        for batch in stream:
            lq, gt = batch["lq"].to(param.device), batch["gt"].to(param.device)
            task = torch.tensor([tree.task_names.index(t) if t in tree.task_names else n_tasks
                                 for t in batch["task"]], dtype=torch.long)
            e = module.extractor.embed(lq)
            nodes = nodes_of(e, tree.path(e).to(param.device))
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


def set_task(spec: str) -> str | None:
    """Task of a shard set = the task in the JSON of its first shard's first sample (never unpickles)."""
    with tarfile.open(expand_source(spec)[0]) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                task = json.loads(tar.extractfile(member).read()).get("task")
                return task if isinstance(task, str) else None
    return None


def balanced_weights(tree: DegradationTree, tasks: list[str | None]) -> list[float] | None:
    """Mixture weight per shard set so that each leaf gets an equal share (module docstring); None = no rule."""
    if len(tasks) < 2 or any(t not in tree.task_names for t in tasks):
        return None
    leaves = tree.task_counts[tree.leaf_ids].double()
    share = (leaves / leaves.sum(1, keepdim=True).clamp_min(1)).mean(0)  # per task
    per_set = [float(share[tree.task_names.index(t)]) / tasks.count(t) for t in tasks]
    return per_set if sum(per_set) > 0 else None


class ExpertsStage:
    name = "experts"

    def build(self, cfg: RunConfig, dist_info: DistInfo) -> Any:
        t = cfg.train
        if t.loss not in ("l1", "psnr"):
            raise ConfigError(f"train.loss must be 'l1' or 'psnr' for the experts stage, got {t.loss!r}")
        if t.schedule not in ("cosine", "constant"):
            raise ConfigError(f"train.schedule must be 'cosine' or 'constant', got {t.schedule!r}")
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        extractor, self.tree, _ = load_init(cfg)
        n_levels = self.tree.n_levels
        ep = check_placement(cfg, self.tree, dist_info.world_size)
        self.level_lrs = list(t.level_lrs) or [t.lr] * n_levels
        self.starts = list(t.level_start_steps) or [0] * n_levels
        if len(self.level_lrs) != n_levels or len(self.starts) != n_levels:
            raise ConfigError(f"train.level_lrs {t.level_lrs} / level_start_steps {t.level_start_steps} need one "
                              f"entry per tree level ({n_levels})")
        if self.starts[0] != 0 or self.starts != sorted(self.starts):
            raise ConfigError(f"train.level_start_steps {self.starts}: the root starts at 0 and a level never "
                              f"before its parent level")
        self.spec = expert_spec(cfg)
        factory = node_factory(self.spec, t.seed)
        self.extractor_config = extractor.config
        tree_moe = TreeMoE(factory, self.tree.level_sizes, ep, cluster_sizes=self.tree.counts.tolist())
        module = TreeModule(extractor, tree_moe).to(self.device)
        ds = build_ds_config(cfg, self.device.type)
        check_ds_config(ds)
        self.micro_batch = ds["train_micro_batch_size_per_gpu"]
        groups = self.param_groups(module)
        floor = t.min_lr / t.lr if t.lr > 0 else 0.0
        lambdas = [lr_lambda(self.starts[g["level"]], t.warmup_steps, t.max_steps, floor, t.schedule) for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas))
        module.extractor.float()  # frozen, outside the optimizer: routes in fp32 as `cluster` and inference do
        self.started = {l for l in range(n_levels) if self.starts[l] <= 0}
        self.seen = torch.zeros(self.tree.n_nodes, dtype=torch.float64)
        self.last_forward: float | None = None
        CommTimer.enabled = True
        if dist_info.rank == 0:
            print(module.tree_moe.placement_report(factory, self.tree.counts.tolist()), file=sys.stderr, flush=True)
        self.weights = cfg.data.family_weights or None
        if self.weights is None and cfg.data.balance:
            self.weights = balanced_weights(self.tree, [set_task(s) for s in cfg.data.train_shards])
            if dist_info.rank == 0 and self.weights:
                print(f"[experts] balanced shard-set weights {[round(w, 4) for w in self.weights]}", file=sys.stderr)
        return self.engine

    def param_groups(self, module: TreeModule) -> list[dict]:
        """moe_param_groups split by tree level: same count and order on every rank, one LR per level."""
        level_of = {id(p): l for l, moe in enumerate(module.tree_moe.levels) for p in moe.parameters()}
        groups = []
        for g in moe_param_groups(module, weight_decay=self.cfg.train.weight_decay):
            for level in sorted({level_of.get(id(p), 0) for p in g["params"]}):
                params = [p for p in g["params"] if level_of.get(id(p), 0) == level]
                groups.append({**g, "params": params, "level": level, "lr": self.level_lrs[level]})
        return groups

    def stream(self, cfg: RunConfig, dist_info: DistInfo, segment: int) -> Iterable[dict]:
        sc = stream_config(cfg, self.micro_batch, cfg.data.train_shards, self.weights)
        return make_loader(sc, dist_info.rank, dist_info.world_size, restart=segment)

    def start_levels(self, step: int) -> None:
        """Levels whose start step is reached begin now; with init_from_parent their nodes copy the parent."""
        for level in range(1, self.tree.n_levels):
            if level in self.started or step < self.starts[level]:
                continue
            self.started.add(level)
            if self.cfg.train.init_from_parent:
                self.copy_parents(level)

    def copy_parents(self, level: int) -> None:
        """Every rank takes part: each parent's weights are broadcast from the first rank holding it."""
        moe = self.engine.module.tree_moe
        par, child = moe.placement.levels[level - 1], moe.placement.levels[level]
        local, rank = set(moe.local_nodes()), moe.rank
        with torch.device("meta"):
            numel = sum(p.numel() for p in create_expert(**self.spec).parameters())
        with torch.no_grad():
            for parent in range(par.first_node, par.first_node + par.num_nodes):
                owner = par.position_of(parent)  # ranks 0..ep-1 hold positions 0..ep-1
                if rank == owner:
                    flat = parameters_to_vector(moe.local_module(parent).parameters())
                else:
                    flat = torch.empty(numel, device=self.device, dtype=next(moe.parameters()).dtype)
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(flat, src=owner)
                for node in range(child.first_node, child.first_node + child.num_nodes):
                    if int(self.tree.parents[node]) == parent and node in local:
                        params = list(moe.local_module(node).parameters())
                        for param, chunk in zip(params, flat.split([q.numel() for q in params])):
                            param.copy_(chunk.view_as(param))  # in place: ZeRO's flat buffers alias them
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO / bf16 keep fp32 master copies: take the copied weights there too
            refresh()

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict[str, float]]:
        now = time.perf_counter()
        share = CommTimer.seconds / (now - self.last_forward) if self.last_forward else 0.0
        self.last_forward, CommTimer.seconds = now, 0.0
        self.start_levels(step)
        module = self.engine.module
        param = next(module.tree_moe.parameters())
        lq, gt = batch["lq"].to(param.device), batch["gt"].to(param.device)
        paths = self.tree.path(module.extractor.embed(lq)).to(param.device)  # [B, n_levels], oracle routes
        levels = sorted(self.started)
        nodes = paths[:, levels]
        out = self.engine(lq.to(param.dtype), nodes).float()  # [B, k, 3, H, W]
        diff = out - gt[:, None].float()
        if self.cfg.train.loss == "psnr":
            per = 10 * torch.log10(diff.pow(2).flatten(2).mean(2) + 1e-8)  # [B, k]; minimising = max PSNR
        else:
            per = diff.abs().flatten(2).mean(2)
        loss = per.mean()
        return loss, self.metrics(per.detach(), nodes, levels, share)

    def metrics(self, per: Tensor, nodes: Tensor, levels: list[int], share: float) -> dict[str, float]:
        """Loss per level and per expert, images seen per expert (summed over ranks), all-to-all share."""
        n = self.tree.n_nodes
        flat = nodes.flatten().cpu()
        sums = torch.cat([torch.zeros(n, dtype=torch.float64).index_add_(0, flat, per.flatten().double().cpu()),
                          torch.bincount(flat, minlength=n).double()])
        sums = all_sum(sums.to(per.device)).cpu()
        loss_sum, count = sums[:n], sums[n:]
        self.seen += count
        rows = self.engine.module.tree_moe.rows_per_rank()  # load balance: images each rank's experts ran
        out = {"a2a_time_share": share, "compute/skew": max(rows) / max(sum(rows) / len(rows), 1e-9),
               **{f"compute/rank{r}_images": float(v) for r, v in enumerate(rows)}}
        for i, level in enumerate(levels):
            lo, hi = self.tree.level_starts[level], self.tree.level_starts[level] + self.tree.level_sizes[level]
            out[f"loss/level{level}"] = float(loss_sum[lo:hi].sum() / count[lo:hi].sum().clamp_min(1))
        for node in range(n):
            out[f"expert{node}/images_seen"] = float(self.seen[node])
            if count[node] > 0:
                out[f"expert{node}/loss"] = float(loss_sum[node] / count[node])
        return out

    def state(self) -> dict[str, Any]:
        return {**tree_to_state(self.tree), "extractor_config": json.dumps(self.extractor_config),
                "expert_spec": json.dumps(self.spec), "images_seen": self.seen.clone(),
                "levels_started": sorted(self.started)}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = tree_from_state(state, "checkpoint client state")
        if not torch.equal(saved.centroids, self.tree.centroids) or saved.level_sizes != self.tree.level_sizes:
            raise ConfigError("the checkpoint was trained on another tree than tree.path / the init checkpoint's")
        self.seen = state["images_seen"].double().cpu()
        self.started |= set(state["levels_started"])

    def validate(self, step: int) -> dict[str, float]:
        self.grids = {}
        if not self.cfg.data.val_shards:
            return {}
        sc = stream_config(self.cfg, self.micro_batch, self.cfg.data.val_shards, None, val=True)
        loader = make_loader(sc, self.dist.rank, self.dist.world_size, restart=0)
        return validate_psnr(self.engine, self.tree, loader, lambda e, paths: paths[:, [-1, 0]], ["leaf", "root"],
                             self.grids)

    def images(self) -> dict[str, Tensor]:
        return self.grids


def make_stage() -> ExpertsStage:
    return ExpertsStage()
