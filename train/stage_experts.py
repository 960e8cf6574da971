"""Stage 3, `experts`: every tree node's expert at once, expert parallel, oracle routing (DESIGN §1.3, §3).

Each image goes to the experts on its tree path (`tree.path(extractor.embed(lq))`, the extractor frozen)
of the levels training at this step; the loss is the mean L1 (or PSNR loss) over those outputs.

Level by level: every level has its own peak LR (`train.level_lrs`), start step
(`train.level_start_steps`, default: level l at l·max_steps/n_levels, so the root trains alone first)
and end step (`train.level_end_steps`, default max_steps). A level trains from its start to its end on a
warmup + cosine schedule of its own; with `train.init_from_parent` its nodes first copy their *trained*
parent's weights (broadcast from the parent's rank, so any placement works). After its end a level gets
no more images (its experts stay as they are), so ending a level when the next starts spends every step
on one level: each image then costs one expert pass instead of n_levels.

The root's polish (`train.root_polish_steps` N > 0, PSNR loss): once every other level has ended, the last N
steps train the root alone again, on a fresh warmup + cosine at its peak LR, with its loss floored at 60 dB
instead of 50. The root is the fallback for what the tree does not know, so it must leave a near-clean photo
as it is; its children copied it long before, and frozen they get no images and no LR, so they stay exactly
as they were.

LoRA tree (`model.lora_rank` r > 0, alpha `model.lora_alpha`; the paper's variant): the root is a full
expert, every other node the root's frozen weights + a trainable rank-r LoRA on every conv. The root level
must end no later than level 1 starts and `train.init_from_parent` must be on (`check_lora_tree`): at its
start a level-1 node copies the finished root into its base (its LoRA has B = 0, so it starts equal to the
root), a level-2 node its parent's base and LoRA, so every base is the root. Base weights never require
grad and are never in the optimizer (no weight decay on them); only lora_A / lora_B train.

Balanced sampling (`data.balance`, the documented simple rule): when `data.train_shards` holds several
single-task shard sets (a set's task is read from its first sample), the sets are mixed with weights
w_task = mean over leaves of the leaf's task share, so every leaf gets data in proportion 1/n_leaves
instead of its k-means size; `data.family_weights`, when given, wins.
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
from typing import Any, Iterable

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from unirestorer.data_shards.loader import make_loader
from unirestorer.data_shards.shards import expand_source
from unirestorer.cuda_setup import optimizer_options
from unirestorer.launch.env import DistInfo
from unirestorer.model.lora import trainable_parameters
from unirestorer.model.tree import DegradationTree
from unirestorer.parallel.dispatch import CommTimer
from unirestorer.parallel.tree_moe import TreeMoE, check_ds_config, moe_param_groups
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage import Metrics, lr_lambda
from unirestorer.train.stage_state import tree_from_state, tree_to_state
from unirestorer.train.tree_stage import (TreeModule, all_sum, check_placement, expert_lora, expert_spec, load_init,
                                          node_factory, stream_config, validate_psnr)

# MSE added inside the PSNR loss, root then every finer level: the best PSNR one image can earn (50 / 40 dB).
# The loss's weight on an image is 1/(MSE + floor), so a near-clean image outweighs a hazy one by up to
# 0.03/floor. The root, the fallback for what the tree does not know, keeps 50 dB: it learns to leave images
# alone. At 50 dB a 15 % share of clean crops also made a haze expert the identity (15.9 dB on haze val vs
# 22.8 without clean crops; 21.7 at 40 dB), so the finer experts, which restore what they were routed, earn
# at most 40 dB (BENCHMARKS.md "Do no harm")
PSNR_LOSS_FLOORS = (1e-5, 1e-4)
# The root's floor in its polish (train.root_polish_steps): 60 dB. Trained at 60 dB from the start, the root is a
# worse start for its children (demo haze 17.65 → 15.40 dB in one run); polished at 60 dB after they copied it, it stops turning a
# 47 dB slightly blurred photo into a 46 dB one (BENCHMARKS.md "The root's polish")
ROOT_POLISH_FLOOR = 1e-6


def to_channels_last(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the images in channels_last, so the convolutions run in it (TreeMoE's row gathers
    return contiguous images; the weights cannot be: DeepSpeed's broadcast and ZeRO's flat buffers need them
    contiguous)."""
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


class LevelLR:
    """LR factor of a level: its warmup + schedule from `start` until `end`; a level that ends before the run
    does gets 0 from there on (it is done); from `again` to `again_end` it runs a second warmup + schedule (the
    root's polish). Plain numbers only: LambdaLR saves a callable object's attributes in the checkpoint."""

    def __init__(self, start: int, warmup: int, end: int, floor: float, schedule: str, stops: bool,
                 again: int = 0, again_end: int = 0) -> None:
        self.start, self.warmup, self.end, self.floor, self.schedule = start, warmup, end, floor, schedule
        self.stops, self.again, self.again_end = stops, again, again_end  # again < again_end: a second window

    def __call__(self, step: int) -> float:
        if self.again < self.again_end and step >= self.again:
            return lr_lambda(self.again, self.warmup, self.again_end, self.floor, self.schedule)(step)
        if self.stops and step >= self.end:
            return 0.0
        return lr_lambda(self.start, self.warmup, self.end, self.floor, self.schedule)(step)


def polish_start(cfg: RunConfig) -> int:
    """The step the root's polish starts (train.max_steps without one)."""
    return cfg.train.max_steps - cfg.train.root_polish_steps


def level_schedule(cfg: RunConfig, n_levels: int) -> tuple[list[float], list[int], list[int]]:
    """Peak LR, start and end step per level, with the defaults of the module docstring, checked."""
    t = cfg.train
    last = polish_start(cfg)  # the levels' own windows end by here
    if not 0 <= t.root_polish_steps < t.max_steps:
        raise ConfigError(f"train.root_polish_steps={t.root_polish_steps}: must lie in [0, train.max_steps="
                          f"{t.max_steps})")
    if t.root_polish_steps and t.loss != "psnr":
        raise ConfigError(f"train.root_polish_steps={t.root_polish_steps} needs train.loss = \"psnr\" (the polish "
                          f"raises the root's PSNR-loss floor), got {t.loss!r}")
    lrs = list(t.level_lrs) or [t.lr] * n_levels
    starts = list(t.level_start_steps) or [round(l * last / n_levels) for l in range(n_levels)]
    ends = list(t.level_end_steps) or [last] * n_levels
    if not len(lrs) == len(starts) == len(ends) == n_levels:
        raise ConfigError(f"train.level_lrs {t.level_lrs} / level_start_steps {t.level_start_steps} / level_end_steps "
                          f"{t.level_end_steps} need one entry per tree level ({n_levels}) or none")
    if starts[0] != 0 or starts != sorted(starts):
        raise ConfigError(f"train.level_start_steps {starts}: the root starts at 0 and a level never before its "
                          f"parent level")
    if any(e <= s for s, e in zip(starts, ends)) or max(ends) < last:
        raise ConfigError(f"train.level_end_steps {ends}: every level must end after it starts ({starts}), and one "
                          f"must train until train.max_steps={t.max_steps}"
                          + (f" - train.root_polish_steps={t.root_polish_steps}" if t.root_polish_steps else ""))
    if max(ends) > last:
        raise ConfigError(f"train.level_end_steps {ends}: with train.root_polish_steps={t.root_polish_steps} every "
                          f"level must end by step {last}, where the root's polish starts")
    if any(not any(s <= b < e for s, e in zip(starts, ends)) for b in starts + ends if b < last):
        raise ConfigError(f"train.level_start_steps {starts} / level_end_steps {ends}: some steps train no level")
    return lrs, starts, ends


def check_lora_tree(cfg: RunConfig, starts: list[int], ends: list[int]) -> None:
    """A LoRA tree's root is the frozen base of every node: children must copy it (train.init_from_parent),
    and only once it is final (its level ends no later than level 1 starts), or their bases would differ."""
    if not cfg.model.lora_rank:
        return
    if cfg.train.root_polish_steps:
        raise ConfigError(f"model.lora_rank={cfg.model.lora_rank}: train.root_polish_steps must be 0, since the root "
                          f"is the frozen base of every LoRA node and must not change after they copied it")
    if not cfg.train.init_from_parent:
        raise ConfigError(f"model.lora_rank={cfg.model.lora_rank} needs train.init_from_parent = true: every LoRA "
                          f"node's frozen base is the root's weights, copied in when its level starts")
    if len(starts) > 1 and ends[0] > starts[1]:
        raise ConfigError(f"model.lora_rank={cfg.model.lora_rank}: the root level must end no later than level 1 "
                          f"starts (train.level_end_steps[0]={ends[0]} > train.level_start_steps[1]={starts[1]}): "
                          f"the root is the frozen base of every node and must not change after its children "
                          f"copied it; set train.level_end_steps")


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
        self.level_lrs, self.starts, self.ends = level_schedule(cfg, n_levels)
        self.spec, self.lora = expert_spec(cfg), expert_lora(cfg)
        check_lora_tree(cfg, self.starts, self.ends)
        self.factory = factory = node_factory(self.spec, t.seed, self.lora)
        self.extractor_config = extractor.config
        tree_moe = TreeMoE(factory, self.tree.level_sizes, ep, cluster_sizes=self.tree.counts.tolist())
        module = TreeModule(extractor, tree_moe).to(self.device)
        if t.channels_last:  # each expert's input; weights stay contiguous (DeepSpeed views them as bytes)
            for node in module.tree_moe.local_nodes():
                module.tree_moe.local_module(node).register_forward_pre_hook(to_channels_last)
        if t.compile_experts:  # in place: parameter names (and checkpoint keys) stay as they are
            for node in module.tree_moe.local_nodes():
                module.tree_moe.local_module(node).compile()
        ds = build_ds_config(cfg, self.device.type)
        check_ds_config(ds)
        self.micro_batch = ds["train_micro_batch_size_per_gpu"]
        groups = self.param_groups(module)
        floor = t.min_lr / t.lr if t.lr > 0 else 0.0
        self.polish = polish_start(cfg)
        lambdas = [LevelLR(self.starts[g["level"]], t.warmup_steps, self.ends[g["level"]], floor, t.schedule,
                           self.ends[g["level"]] < t.max_steps, *((self.polish, t.max_steps) if g["level"] == 0 else ()))
                   for g in groups]
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
                                      **optimizer_options(self.device))
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas))
        module.extractor.float()  # frozen, outside the optimizer: routes in fp32 as `cluster` and inference do
        self.started = {l for l in range(n_levels) if self.starts[l] <= 0}
        self.seen = torch.zeros(self.tree.n_nodes, dtype=torch.float64)
        self.trainable: list[int] | None = None  # levels whose experts require grad (None: all, as built)
        self.unread = torch.zeros(self.tree.n_nodes, dtype=torch.float64, device=self.device)
        self.last_read = time.perf_counter()
        CommTimer.enabled = True
        if dist_info.rank == 0:
            print(module.tree_moe.placement_report(factory, self.tree.counts.tolist()), file=sys.stderr, flush=True)
            polish = (f"; the root alone again over [{self.polish}, {t.max_steps}] at a 60 dB floor"
                      if self.polish < t.max_steps else "")
            print(f"[experts] levels train over steps {[list(se) for se in zip(self.starts, self.ends)]} at peak LR "
                  f"{self.level_lrs}{polish}", file=sys.stderr, flush=True)
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
        """Every rank takes part: each parent's weights are broadcast from the first rank holding it. A child
        takes every parameter the parent has, by name: all of a full parent; a LoRA child of the (full) root
        takes its base and keeps its fresh LoRA, a LoRA child of a LoRA parent takes base and LoRA."""
        moe = self.engine.module.tree_moe
        par, child = moe.placement.levels[level - 1], moe.placement.levels[level]
        local, rank = set(moe.local_nodes()), moe.rank
        with torch.no_grad():
            for parent in range(par.first_node, par.first_node + par.num_nodes):
                with torch.device("meta"):
                    sizes = [(n, p.numel()) for n, p in self.factory(parent).named_parameters()]
                owner = par.position_of(parent)  # ranks 0..ep-1 hold positions 0..ep-1
                if rank == owner:
                    flat = parameters_to_vector(moe.local_module(parent).parameters())
                else:
                    flat = torch.empty(sum(n for _, n in sizes), device=self.device,
                                       dtype=next(moe.parameters()).dtype)
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.broadcast(flat, src=owner)
                for node in range(child.first_node, child.first_node + child.num_nodes):
                    if int(self.tree.parents[node]) == parent and node in local:
                        params = dict(moe.local_module(node).named_parameters())
                        for (name, _), chunk in zip(sizes, flat.split([n for _, n in sizes])):
                            params[name].copy_(chunk.view_as(params[name]))  # in place: ZeRO's flat buffers alias them
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO / bf16 keep fp32 master copies: take the copied weights there too
            refresh()

    def forward(self, batch: dict, step: int) -> tuple[Tensor, Metrics]:
        self.start_levels(step)
        module = self.engine.module
        param = next(module.tree_moe.parameters())
        lq, gt = batch["lq"].to(param.device, non_blocking=True), batch["gt"].to(param.device, non_blocking=True)
        paths = self.tree.path(module.extractor.embed(lq), check=False)  # [B, n_levels], oracle routes, fp32
        polishing = step >= self.polish
        levels = [0] if polishing else [l for l in sorted(self.started) if step < self.ends[l]]
        self.train_only(levels)
        nodes = paths[:, levels]
        out = self.engine(lq.to(param.dtype), nodes).float()  # [B, k, 3, H, W]
        diff = out - gt[:, None].float()
        if self.cfg.train.loss == "psnr":
            # [B, k]; minimising = max PSNR. The floor bounds what one image can earn: without it a clean image's
            # PSNR grows without limit as the output nears the input, and it rules the whole batch
            floor = torch.tensor([ROOT_POLISH_FLOOR if polishing else PSNR_LOSS_FLOORS[min(level, 1)]
                                  for level in levels], device=diff.device)
            per = 10 * torch.log10(diff.pow(2).flatten(2).mean(2) + floor)
        else:
            per = diff.abs().flatten(2).mean(2)
        loss = per.mean()
        flat = nodes.flatten()  # images per expert, counted on the device: read (and summed over ranks) at log steps
        self.unread.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float64, device=flat.device))
        per = per.detach()
        return loss, lambda: self.metrics(per, nodes, levels)

    def train_only(self, levels: list[int]) -> None:
        """Levels not training at this step (not started, or ended) are frozen, on every rank alike: their
        experts get no images, and frozen they run no idle probe (DeepSpeed counts their parameters as unused:
        zero gradients, as the probe gave). Active levels keep the probe, so hook order stays equal. Only the
        trainable parameters are switched: a LoRA expert's base never requires grad."""
        if levels == self.trainable:
            return
        for level, moe in enumerate(self.engine.module.tree_moe.levels):
            for module in moe.deepspeed_moe.experts.deepspeed_experts:
                for param in trainable_parameters(module):
                    param.requires_grad_(level in levels)
        self.trainable = levels

    def read_seen(self) -> None:
        """Add the images every rank routed since the last read to `seen` (a collective)."""
        self.seen += all_sum(self.unread).cpu()
        self.unread.zero_()

    def metrics(self, per: Tensor, nodes: Tensor, levels: list[int]) -> dict[str, float]:
        """Loss per level and per expert of this step, images seen per expert (summed over ranks), the share of
        the time since the last log step spent in all-to-all exchanges, peak GPU memory."""
        n = self.tree.n_nodes
        flat = nodes.flatten().cpu()
        sums = torch.cat([torch.zeros(n, dtype=torch.float64).index_add_(0, flat, per.flatten().double().cpu()),
                          torch.bincount(flat, minlength=n).double()])
        sums = all_sum(sums.to(per.device)).cpu()
        loss_sum, count = sums[:n], sums[n:]
        self.read_seen()
        now = time.perf_counter()
        rows = self.engine.module.tree_moe.rows_per_rank()  # load balance: images each rank's experts ran
        out = {"a2a_time_share": CommTimer.take() / max(now - self.last_read, 1e-9),
               "compute/skew": max(rows) / max(sum(rows) / len(rows), 1e-9),
               **{f"compute/rank{r}_images": float(v) for r, v in enumerate(rows)}}
        self.last_read = now
        if self.device.type == "cuda":
            out["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for i, level in enumerate(levels):
            lo, hi = self.tree.level_starts[level], self.tree.level_starts[level] + self.tree.level_sizes[level]
            out[f"loss/level{level}"] = float(loss_sum[lo:hi].sum() / count[lo:hi].sum().clamp_min(1))
        for node in range(n):
            out[f"expert{node}/images_seen"] = float(self.seen[node])
            if count[node] > 0:
                out[f"expert{node}/loss"] = float(loss_sum[node] / count[node])
        return out

    def state(self) -> dict[str, Any]:
        self.read_seen()  # every rank saves at the same step
        return {**tree_to_state(self.tree), "extractor_config": json.dumps(self.extractor_config),
                "expert_spec": json.dumps(self.spec), "expert_lora": json.dumps(self.lora),
                "images_seen": self.seen.clone(),
                "levels_started": sorted(self.started)}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = tree_from_state(state, "checkpoint client state")
        if not torch.equal(saved.centroids, self.tree.centroids) or saved.level_sizes != self.tree.level_sizes:
            raise ConfigError("the checkpoint was trained on another tree than tree.path / the init checkpoint's")
        if json.loads(state.get("expert_lora", "null")) != self.lora:
            raise ConfigError(f"the checkpoint's experts have LoRA {state.get('expert_lora', 'null')}, the config asks "
                              f"for {json.dumps(self.lora)} (model.lora_rank / model.lora_alpha): resume with its values")
        self.seen = state["images_seen"].double().cpu()
        self.unread.zero_()
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
