"""Stage 4, `router`: train H_d, H_g, G_d, G_g with the experts and the extractor frozen (DESIGN §1.4).

Top-1 dispatch: each image goes to the one node `Router.route` picks, through the same TreeMoE
placement as the experts stage (forward only, no gradients), and `y = gate(E(x), g)` carries the L1
loss into the gates; the loss is the paper's L1 + 0.1·L_dg + 0.01·L_aux with u = the image's k-means
leaf centroid. Metrics: leaf accuracy against the tree path, the chosen level distribution, and how
often the chosen node lies on the image's own path.

The experts come from the experts stage's checkpoint (`train.init_ckpt`), read with weights.py and
loaded strictly into the local slots (any world size / ep_size). DeepSpeed's ZeRO and bf16 optimizers
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
import torch.nn.functional as F
from torch import Tensor

from unirestorer.data_shards.loader import make_loader
from unirestorer.launch.env import DistInfo
from unirestorer.model.router import Route, Router, gate
from unirestorer.parallel.tree_moe import TreeMoE, check_ds_config, moe_param_groups
from unirestorer.train.checkpoint import CheckpointError
from unirestorer.train.config import ConfigError, RunConfig, build_ds_config
from unirestorer.train.stage_experts import (TreeModule, all_sum, check_placement,
                                             expert_spec, load_init, node_factory, stream_config,
                                             tree_from_state, tree_to_state, validate_psnr)
from unirestorer.train.stage import warmup_cosine
from unirestorer.train.weights import expert_files_by_node, read_checkpoint


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
        self.spec = json.loads(saved["expert_spec"]) if "expert_spec" in saved else expert_spec(cfg)
        self.extractor_config = extractor.config
        ep = check_placement(cfg, self.tree, dist_info.world_size)
        tree_moe = TreeMoE(node_factory(self.spec, cfg.train.seed), self.tree.level_sizes, ep)
        load_tree_weights(tree_moe, cfg.train.init_ckpt)
        router = Router.from_tree(self.tree)
        module = TreeModule(extractor, tree_moe, router).to(self.device)
        ds = build_ds_config(cfg, self.device.type)
        self.autocast = bool(ds["bf16"].get("enabled")) and self.device.type == "cuda"
        ds["bf16"]["enabled"] = False
        ds.setdefault("zero_optimization", {})["stage"] = 0
        check_ds_config(ds)
        self.micro_batch = ds["train_micro_batch_size_per_gpu"]
        t = cfg.train
        groups = moe_param_groups(module, weight_decay=t.weight_decay)
        optimizer = torch.optim.Adam(groups, lr=t.lr, betas=tuple(t.betas))
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds,
                                               lr_scheduler=warmup_cosine(optimizer, cfg))
        if dist_info.rank == 0:
            print(f"[router] experts from {cfg.train.init_ckpt} (frozen, {self.spec}); router "
                  f"{sum(p.numel() for p in router.parameters()) / 1e6:.3f}M params trained with ZeRO stage 0 in "
                  f"fp32{', experts under bf16 autocast' if self.autocast else ''}", file=sys.stderr, flush=True)
        return self.engine

    def stream(self, cfg: RunConfig, dist_info: DistInfo, segment: int) -> Iterable[dict]:
        sc = stream_config(cfg, self.micro_batch, cfg.data.train_shards, cfg.data.family_weights or None)
        return make_loader(sc, dist_info.rank, dist_info.world_size, restart=segment)

    def experts(self, lq: Tensor, nodes: Tensor) -> Tensor:
        """Frozen expert outputs [B, k, 3, H, W] (all ranks together)."""
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return self.engine(lq, nodes).float()

    def forward(self, batch: dict, step: int) -> tuple[Tensor, dict[str, float]]:
        module = self.engine.module
        lq, gt = batch["lq"].to(self.device), batch["gt"].to(self.device)
        e = module.extractor.embed(lq)
        paths = self.tree.path(e).to(self.device)
        route = module.router.route(e)
        y = gate(self.experts(lq, route.node[:, None])[:, 0], route.g)
        u = self.tree.centroids.to(e)[paths[:, -1]]
        loss, parts = module.router.loss(route, F.l1_loss(y, gt), u)
        return loss, {**{f"loss/{k}": float(v) for k, v in parts.items()}, **self.routing(route, paths)}

    def routing(self, route: Route, paths: Tensor, prefix: str = "route") -> dict[str, float]:
        """Leaf accuracy, on-path rate and level distribution over all ranks' images."""
        leaf_hit = (route.leaf + self.tree.level_starts[-1] == paths[:, -1]).double().sum()
        on_path = (paths.gather(1, route.level[:, None]).squeeze(1) == route.node).double().sum()
        levels = torch.bincount(route.level, minlength=self.tree.n_levels).double()
        sums = all_sum(torch.cat([leaf_hit[None], on_path[None], levels]).to(self.device)).cpu()
        n = float(sums[2:].sum().clamp_min(1))
        out = {f"{prefix}/leaf_accuracy": float(sums[0]) / n, f"{prefix}/on_path": float(sums[1]) / n}
        out |= {f"{prefix}/level{l}_share": float(v) / n for l, v in enumerate(sums[2:])}
        return out

    def state(self) -> dict[str, Any]:
        return {**tree_to_state(self.tree), "extractor_config": json.dumps(self.extractor_config),
                "expert_spec": json.dumps(self.spec), "router_config": json.dumps(self.engine.module.router.config)}

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
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            out = validate_psnr(self.engine, self.tree, loader, nodes_of, ["routed", "oracle_leaf"], self.grids)
        router.train(was)
        merged = Route(*(torch.cat([getattr(r, f) for r, _ in routes]) for f in
                         ("node", "leaf", "level", "g", "p_leaf", "p_level", "leaf_logits", "level_logits")))
        return out | self.routing(merged, torch.cat([p for _, p in routes]), prefix="route")

    def images(self) -> dict[str, Tensor]:
        return self.grids


def make_stage() -> RouterStage:
    return RouterStage()
