"""Stage 4, `router`: train H_d, H_g, G_d, G_g with the experts and the extractor frozen (DESIGN §1.4).

Top-1 dispatch: each image goes to the one node `Router.route` picks, through the same TreeMoE
placement as the experts stage (forward only, no gradients), and `y = gate(E(x), g)` carries the L1
loss into the gates; the paper's loss is L1 + dg_weight·L_dg + aux_weight·L_aux with u = the image's
k-means leaf centroid, L_aux over the level probabilities of the global batch (all ranks).

That loss alone asks the gates only whether scaling the output would lower L1, not which expert
restores best. With `train.leaf_ce_weight` / `train.level_ce_weight` > 0 (the default) the stage also
sends every image to all the experts on its own tree path, measures their PSNR against the ground
truth, and adds cross-entropy towards the path's leaf and towards the coarsest level whose expert comes
within `train.level_margin_db` of the best (model/router.py `best_level`). Metrics: leaf accuracy against the tree path, the chosen level
distribution, how often the chosen node lies on the image's own path, and how often the chosen level
is the best one.

The experts come from the experts stage's checkpoint (`train.init_ckpt`), read with weights.py and
loaded strictly into the local slots (any world size / ep_size), built as its stage state says
(`expert_spec`, and `expert_lora` for a LoRA tree), which this stage's state carries on for export. DeepSpeed's ZeRO and bf16 optimizers
require a trainable MoE param group, which a frozen TreeMoE does not have, so this stage runs ZeRO
stage 0 in fp32 (the router has a few M parameters); on CUDA the frozen experts run under bf16 autocast
when the DeepSpeed config asked for bf16.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from unirestorer.data_shards.loader import make_loader
from unirestorer.cuda_setup import optimizer_options
from unirestorer.launch.env import DistInfo
from unirestorer.model.router import Route, Router, best_level, gate, image_psnr
from unirestorer.parallel.tree_moe import TreeMoE, check_ds_config, moe_param_groups
from unirestorer.train.checkpoint import CheckpointError
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage import Metrics, warmup_cosine
from unirestorer.train.stage_state import tree_from_state, tree_to_state
from unirestorer.train.tree_stage import (TreeModule, all_sum, check_placement, expert_lora, expert_spec, load_init,
                                          node_factory, stream_config, validate_psnr)
from unirestorer.train.weights import expert_files_by_node, read_checkpoint


class GlobalSum(torch.autograd.Function):
    """Sum over ranks that gradients flow through: the gradient of a global sum is the global sum of the
    gradients (every rank's loss depends on every rank's input)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ANN001
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ANN001
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def global_sum(x: Tensor) -> Tensor:
    """L_aux's level importance over the global batch (all ranks)."""
    return GlobalSum.apply(x) if dist.is_initialized() and dist.get_world_size() > 1 else x


def load_tree_weights(tree_moe: TreeMoE, init_ckpt: str) -> None:
    """Every expert placed on this rank from the experts checkpoint (its slot table names each node's file)."""
    ckpt = read_checkpoint(init_ckpt)
    files = expert_files_by_node(ckpt, [lv.num_nodes for lv in tree_moe.placement.levels])
    for node in tree_moe.local_nodes():
        try:
            tree_moe.local_module(node).load_state_dict(ckpt.experts[files[node]])
        except RuntimeError as err:
            raise CheckpointError(f"{ckpt.path}: expert of node {node} does not fit model.arch/preset: {err}") from None


class RouterStage:
    name = "router"

    def build(self, cfg: RunConfig, dist_info: DistInfo) -> Any:
        self.cfg, self.dist, self.device = cfg, dist_info, dist_info.device
        extractor, self.tree, init = load_init(cfg)
        saved = init.client_state.get("stage_state", {})
        if "expert_spec" in saved:  # the experts as trained (a checkpoint without expert_lora has full experts)
            self.spec, self.lora = json.loads(saved["expert_spec"]), json.loads(saved.get("expert_lora", "null"))
        else:
            self.spec, self.lora = expert_spec(cfg), expert_lora(cfg)
        self.extractor_config = extractor.config
        ep = check_placement(cfg, self.tree, dist_info.world_size)
        tree_moe = TreeMoE(node_factory(self.spec, cfg.train.seed, self.lora), self.tree.level_sizes, ep)
        load_tree_weights(tree_moe, cfg.train.init_ckpt)
        t = cfg.train
        router = Router.from_tree(self.tree, dg_weight=t.dg_weight, aux_weight=t.aux_weight,
                                  leaf_ce_weight=t.leaf_ce_weight, level_ce_weight=t.level_ce_weight,
                                  level_margin_db=t.level_margin_db)
        self.supervised = t.level_ce_weight > 0
        if self.device.type == "cuda" and dist_info.world_size > 1:  # heads' BatchNorm over the global batch
            router = torch.nn.SyncBatchNorm.convert_sync_batchnorm(router)  # (no CPU kernel: per rank there)
        module = TreeModule(extractor, tree_moe, router).to(self.device)
        ds = build_ds_config(cfg, self.device.type)
        self.autocast = bool(ds["bf16"].get("enabled")) and self.device.type == "cuda"
        ds["bf16"]["enabled"] = False
        ds.setdefault("zero_optimization", {})["stage"] = 0
        check_ds_config(ds)
        self.micro_batch = ds["train_micro_batch_size_per_gpu"]
        groups = moe_param_groups(module, weight_decay=t.weight_decay)
        optimizer = torch.optim.Adam(groups, lr=t.lr, betas=tuple(t.betas), **optimizer_options(self.device))
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds,
                                               lr_scheduler=warmup_cosine(optimizer, cfg))
        if dist_info.rank == 0:
            print(f"[router] experts from {cfg.train.init_ckpt} (frozen, {self.spec}, LoRA {self.lora}); router "
                  f"{sum(p.numel() for p in router.parameters()) / 1e6:.3f}M params trained with ZeRO stage 0 in "
                  f"fp32{', experts under bf16 autocast' if self.autocast else ''}; loss: paper (dg "
                  f"{t.dg_weight}, aux {t.aux_weight}) + CE leaf {t.leaf_ce_weight} / best level {t.level_ce_weight} "
                  f"(the coarsest level within {t.level_margin_db} dB of the best)",
                  file=sys.stderr, flush=True)
        return self.engine

    def stream(self, cfg: RunConfig, dist_info: DistInfo, segment: int) -> Iterable[dict]:
        sc = stream_config(cfg, self.micro_batch, cfg.data.train_shards, cfg.data.family_weights or None)
        return make_loader(sc, dist_info.rank, dist_info.world_size, restart=segment)

    def experts(self, lq: Tensor, nodes: Tensor) -> Tensor:
        """Frozen expert outputs [B, k, 3, H, W] (all ranks together)."""
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return self.engine(lq, nodes).float()

    def forward(self, batch: dict, step: int) -> tuple[Tensor, Metrics]:
        module = self.engine.module
        lq, gt = batch["lq"].to(self.device, non_blocking=True), batch["gt"].to(self.device, non_blocking=True)
        e = module.extractor.embed(lq)  # fp32, as the tree path and the router (only the experts run in bf16)
        paths = self.tree.path(e, check=False)
        route = module.router.route(e)
        nodes = torch.cat([route.node[:, None], paths], 1) if self.supervised else route.node[:, None]
        out = self.experts(lq, nodes)  # [B, 1 (+ n_levels), 3, H, W]
        y = gate(out[:, 0], route.g)
        level_target = (best_level(image_psnr(out[:, 1:].float(), gt[:, None]), module.router.config["level_margin_db"])
                        if self.supervised else None)
        u = self.tree.centroids.to(e.device, non_blocking=True)[paths[:, -1]]
        importance = global_sum(route.p_level.sum(0))
        loss, parts = module.router.loss(route, F.l1_loss(y, gt), u, paths[:, -1] - self.tree.level_starts[-1],
                                         level_target, importance)
        parts = {k: v.detach() for k, v in parts.items()}
        return loss, lambda: {**{f"loss/{k}": float(v) for k, v in parts.items()},
                              **self.routing(route, paths, best=level_target)}

    def routing(self, route: Route, paths: Tensor, prefix: str = "route", best: Tensor | None = None
                ) -> dict[str, float]:
        """Leaf accuracy, on-path rate, best-level rate (when measured) and level distribution over all ranks."""
        leaf_hit = (route.leaf + self.tree.level_starts[-1] == paths[:, -1]).double().sum()
        on_path = (paths.gather(1, route.level[:, None]).squeeze(1) == route.node).double().sum()
        best_hit = (route.level == best).double().sum() if best is not None else leaf_hit.new_zeros(())
        levels = torch.bincount(route.level, minlength=self.tree.n_levels).double()
        sums = all_sum(torch.stack([leaf_hit, on_path, best_hit.to(leaf_hit)]).to(self.device)).cpu()
        counts = all_sum(levels.to(self.device)).cpu()
        n = float(counts.sum().clamp_min(1))
        out = {f"{prefix}/leaf_accuracy": float(sums[0]) / n, f"{prefix}/on_path": float(sums[1]) / n}
        if best is not None:
            out[f"{prefix}/best_level_rate"] = float(sums[2]) / n
        out |= {f"{prefix}/level{l}_share": float(v) / n for l, v in enumerate(counts)}
        return out

    def state(self) -> dict[str, Any]:
        return {**tree_to_state(self.tree), "extractor_config": json.dumps(self.extractor_config),
                "expert_spec": json.dumps(self.spec), "expert_lora": json.dumps(self.lora), "router_config": json.dumps(self.engine.module.router.config)}

    def load_state(self, state: dict[str, Any]) -> None:
        saved = tree_from_state(state, "checkpoint client state")
        if not torch.equal(saved.centroids, self.tree.centroids) or saved.level_sizes != self.tree.level_sizes:
            raise ConfigError("the checkpoint's router was trained on another tree than the init checkpoint's")

    def validate(self, step: int) -> dict[str, float]:
        self.grids = {}
        if not self.cfg.data.val_shards:
            return {}
        router = self.engine.module.router
        sc = stream_config(self.cfg, self.micro_batch, self.cfg.data.val_shards, None, val=True)
        loader = make_loader(sc, self.dist.rank, self.dist.world_size, restart=0)
        routes: list[tuple[Route, Tensor]] = []

        def nodes_of(e: Tensor, paths: Tensor) -> Tensor:
            route = router.route(e)
            routes.append((route, paths))
            return torch.stack([route.node, paths[:, -1]], dim=1)

        was = router.training
        router.eval()
        out = validate_psnr(self.engine, self.tree, loader, nodes_of, ["routed", "oracle_leaf"], self.grids,
                            autocast=self.autocast)
        router.train(was)
        merged = Route(*(torch.cat([getattr(r, f) for r, _ in routes]) for f in
                         ("node", "leaf", "level", "g", "p_leaf", "p_level", "leaf_logits", "level_logits")))
        return out | self.routing(merged, torch.cat([p for _, p in routes]), prefix="route")

    def images(self) -> dict[str, Tensor]:
        return self.grids


def make_stage() -> RouterStage:
    return RouterStage()
