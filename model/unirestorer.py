"""UniRestorer, single process: extractor → router → one expert per image (DESIGN §1).

The expert pool is a plain mapping node id → expert. The routing decision is `Router.route` and the
per-image expert call is `dispatch`, so an expert-parallel placement that uses the same two pieces
gives the same outputs for the same weights. A bundle is one safetensors file + one JSON (no pickle).

Of a LoRA tree (every expert but the root = the root's weights + a LoRA, model/lora.py) a bundle stores the
root in full and only the lora_A / lora_B tensors of the others; bundle.json gives each of them
`"lora": {"rank", "alpha", "base": 0}`, and loading rebuilds them on the root's weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from unirestorer.safe_files import atomic_path, atomic_write, ensure_dir

from . import bundle_schema
from .bundle_schema import BUNDLE_FORMAT
from .calibration import Calibration, bright_ceiling, dark_floor, mean_luma
from .experts import create_expert
from .extractor import DegradationExtractor
from .fallback import EXPOSURE_SHIFT, GUARD_SIDE, fall_back, fallback_reason
from .lora import add_lora, has_lora, lora_settings, lora_state_dict
from .router import Route, Router, TaskArg, best_level, gate, image_psnr
from .tree import DegradationTree

WEIGHTS, CONFIG, CALIBRATION = "weights.safetensors", "bundle.json", "calibration.safetensors"


def dispatch(x: Tensor, nodes: Tensor, experts: Mapping[int, Callable[[Tensor], Tensor]]) -> Tensor:
    """Run each image through the expert of its node, one call per distinct node, in batch order."""
    order, parts = [], []
    for n in nodes.unique().tolist():
        idx = (nodes == n).nonzero().squeeze(1)
        parts.append(experts[n](x[idx]))
        order.append(idx)
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


class UniRestorer(nn.Module):
    """Frozen extractor and experts, trainable router; `restore` for inference, `router_loss` to train."""

    def __init__(
        self, extractor: nn.Module, tree: DegradationTree, router: Router, experts: Mapping[int, nn.Module], *,
        expert_specs: Mapping[int, dict] | None = None, extractor_config: dict | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        super().__init__()
        missing = sorted(set(range(tree.n_nodes)) - {int(k) for k in experts})
        if missing:
            raise ValueError(f"no expert for tree node(s) {missing} (tree has {tree.n_nodes} nodes)")
        if router.config["n_nodes"] != tree.n_nodes or router.config["n_levels"] != tree.n_levels:
            raise ValueError(f"router built for {router.config['n_nodes']} nodes / {router.config['n_levels']} "
                             f"levels, tree has {tree.n_nodes} / {tree.n_levels}")
        self.extractor, self.tree, self.router = extractor, tree, router
        self.experts = nn.ModuleDict({str(int(k)): v for k, v in sorted(experts.items())})
        self.expert_specs = {int(k): dict(v) for k, v in (expert_specs or {}).items()}
        self.extractor_config = extractor_config or getattr(extractor, "config", None)
        self.calibration = calibration  # the bank `unirestorer calibrate` measured, or None

    def expert(self, node_id: int) -> nn.Module:
        return self.experts[str(node_id)]

    def _pool(self) -> dict[int, nn.Module]:
        return {int(k): v for k, v in self.experts.items()}

    def embed(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.extractor.embed(x)

    def train(self, mode: bool = True) -> "UniRestorer":
        """Only the router trains: the frozen extractor and experts stay in eval mode."""
        super().train(mode)
        self.extractor.eval()
        self.experts.eval()
        return self

    def route(self, x: Tensor, task: TaskArg = None) -> Route:
        """The router's choice, then the checks of model/fallback.py: where the image's embedding lies outside
        the training support (tree.radii) of a node on its path, where its dark channel floor or brightness
        ceiling lies below that of nearly all bank samples that node did not harm, or where the calibration
        bank's nearest samples say that node harmed images like it, the level falls back to that node's parent
        level, at most the root; where the router stopped above a node those samples gained clearly through,
        it goes down to it, past the support too where the evidence is clear. A node that would run in a type's
        outer shell and move the image's exposure is barred unless that evidence vouches for it, and the checks run
        again without it (the exposure guard, `_exposure_moved`, `_vouched`). Images routed in
        instruction mode (a task given) keep the router's level: the user named the degradation."""
        e = self.embed(x)
        light = (dark_floor(x), bright_ceiling(x)) if self.calibration is not None else (None, None)
        task_index = self.router.task_index(task, len(e))
        barred = torch.zeros(len(e), self.tree.n_levels, dtype=torch.bool, device=e.device)
        node, shift = torch.full((len(e),), -1, device=e.device), torch.full((len(e),), torch.nan, device=e.device)
        for _ in range(self.tree.n_levels):  # each pass bars one more level per image, at most
            route = fall_back(self.router.route(e, task), e, self.tree, self.router.leaf_paths, task_index,
                              self.calibration, *light, barred)
            moved = self._exposure_moved(x, route)
            if bool(moved.any()):
                moved &= ~self._vouched(e, route, barred)
            if not bool(moved.any()):
                break
            barred[moved, route.level[moved]] = True
            node, shift = torch.where(moved, route.node, node), torch.where(moved, route.exposure_shift, shift)
        route.exposure_node, route.exposure_shift = node, shift
        return route

    def _exposure_moved(self, x: Tensor, route: Route) -> Tensor:
        """[B] True where the node that runs lies in a type's outer shell and its expert would move the image's
        mean luminance by more than EXPOSURE_SHIFT (on the image shrunk to GUARD_SIDE); `route.exposure_shift`
        gets the shifts. In the shell the embedding cannot tell a dark, mildly noisy photo from low light, and a
        low-light expert re-exposes the whole photo (31 → 11.5 dB), while a noise expert there leaves the exposure
        (a shift of at most 0.003) and restores (BENCHMARKS.md, "fourteenth session")."""
        route.exposure_shift = torch.full((len(x),), torch.nan, device=x.device)
        if route.shell is None or not bool(route.shell.any()):
            return torch.zeros(len(x), dtype=torch.bool, device=x.device)
        idx = route.shell.nonzero().squeeze(1)
        small = x[idx]
        if max(small.shape[-2:]) > GUARD_SIDE:
            scale = GUARD_SIDE / max(small.shape[-2:])
            small = F.interpolate(small, scale_factor=scale, mode="area")
        with torch.no_grad():
            y = dispatch(small, route.node[idx], self._pool()).clamp(0, 1)
        route.exposure_shift[idx] = (mean_luma(y) - mean_luma(small)).abs()
        return route.exposure_shift > EXPOSURE_SHIFT  # NaN compares False

    def _vouched(self, e: Tensor, route: Route, barred: Tensor) -> Tensor:
        """[B] True where the calibration bank's nearest samples vouch at promotion's bar for the node that runs:
        those that went through it gained clearly there and it harmed almost none. The exposure guard yields to
        that: very dark low light in a type's shell gains 5 to 12 dB through its leaf, while the leaf had harmed
        6 of the 20 neighbours of the darkish photo the guard was made for (BENCHMARKS.md, "fifteenth session")."""
        if self.calibration is None:
            return torch.zeros(len(e), dtype=torch.bool, device=e.device)
        paths = self.router.leaf_paths[route.leaf]
        open_levels = self.tree.open_to_evidence(e, paths) & ~barred
        return (route.level > 0) & (self.calibration.promote(e, paths, route.level, open_levels).depth == route.level)

    def forward(self, x: Tensor, task: TaskArg = None, embedding: Tensor | None = None) -> tuple[Tensor, Route]:
        """Gated output E(x)·g/stopgrad(g): equal to the chosen expert's output, differentiable in g. The
        router's own choice (no support check), as the router stage trains it."""
        route = self.router.route(self.embed(x) if embedding is None else embedding, task)
        with torch.no_grad():
            out = dispatch(x, route.node, self._pool())
        return gate(out, route.g), route

    def level_psnr(self, x: Tensor, gt: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] PSNR of the frozen experts on each image's own root→leaf path."""
        with torch.no_grad():
            return torch.stack([image_psnr(dispatch(x, paths[:, l], self._pool()), gt)
                                for l in range(paths.shape[1])], dim=1)

    def router_loss(self, x: Tensor, gt: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One router training step's loss: L1 + 0.1·L_dg + 0.01·L_aux (+ optional supervision)."""
        e = self.embed(x)
        y, route = self(x, embedding=e)
        l1 = F.l1_loss(y, gt)
        paths = self.tree.path(e).to(e.device)
        u = self.tree.centroids.to(e)[paths[:, -1]]
        leaf_target = paths[:, -1] - self.tree.level_starts[-1] if self.router.config["leaf_ce_weight"] > 0 else None
        level_target = (best_level(self.level_psnr(x, gt, paths), self.router.config["level_margin_db"])
                        if self.router.config["level_ce_weight"] > 0 else None)
        return self.router.loss(route, l1, u, leaf_target, level_target)

    @torch.no_grad()
    def restore(self, image: Tensor, task: TaskArg = None) -> tuple[Tensor, Any]:
        """Image [3,H,W] or batch [B,3,H,W] in [0,1] → (restored, route description per image)."""
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(f"restore expects [3,H,W] or [B,3,H,W] RGB, got shape {tuple(image.shape)}")
        single = image.ndim == 3
        x = image[None] if single else image
        was_training = self.training
        self.eval()
        try:
            route = self.route(x, task)
            y = dispatch(x, route.node, self._pool())
        finally:
            self.train(was_training)
        info = [self.describe(route, i) for i in range(len(x))]
        return (y[0], info[0]) if single else (y, info)

    @torch.no_grad()
    def restore_route(self, image: Tensor, task: TaskArg = None) -> dict:
        """The route `restore` takes for one image [1,3,H,W] or [3,H,W], as `describe` gives it."""
        x = image[None] if image.ndim == 3 else image
        return self.describe(self.route(x, task), 0)

    def describe(self, route: Route, i: int, top: int = 3) -> dict:
        """Human-readable route of image i: level, node, root→leaf path, the node's task composition, top
        probabilities (restore's --level runs another node of `path`, --explain prints all of it)."""
        node, leaf0 = int(route.node[i]), self.tree.level_starts[-1]
        p, leaves = route.p_leaf[i].topk(min(top, route.p_leaf.shape[1]))
        out = {
            "level": int(route.level[i]), "node": node, "leaf": leaf0 + int(route.leaf[i]),
            "path": [int(n) for n in self.router.leaf_paths[int(route.leaf[i])]],
            "composition": self.tree.composition(node),
            "top_leaves": {leaf0 + int(k): float(v) for k, v in zip(leaves, p)},
            "p_level": [float(v) for v in route.p_level[i]],
        }
        if route.router_level is not None:
            out["router_level"] = int(route.router_level[i])
        if route.support is not None:
            out["support"] = [round(float(v), 3) for v in route.support[i]]  # distance / radius, path order
        if (why := fallback_reason(route, i, out, self.tree, self.router.leaf_paths, self.calibration)) is not None:
            out["fallback"] = why
        return out

    # ---- bundle ---------------------------------------------------------------------------------
    def _expert_tensors(self, node: int, expert: nn.Module) -> dict[str, Tensor]:
        """What the bundle stores of one expert: all of a plain one, only the LoRA of one whose base is the
        root (node 0, plain); any other LoRA expert is refused, since loading rebuilds it on the root."""
        if not has_lora(expert):
            return expert.state_dict()
        root = self.expert(0)
        if node == 0 or has_lora(root):
            raise ValueError("save_bundle: the root expert (node 0) has LoRA; a bundle stores LoRA experts as "
                             "updates of a plain root: merge_lora it first")
        lora = lora_state_dict(expert)
        base = {k: v for k, v in expert.state_dict().items() if k not in lora}
        root_state = root.state_dict()
        differs = sorted(set(base) ^ set(root_state)) or [k for k in base if not torch.equal(base[k], root_state[k])]
        if differs:
            raise ValueError(f"save_bundle: expert {node} has LoRA on a base that is not the root's weights "
                             f"({differs[0]!r} differs): the bundle stores it as root + LoRA, so it could not be "
                             f"reloaded; merge_lora it first to store it in full")
        return lora

    def _bundle_tensors(self) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """(every tensor save_bundle writes, the bundle.json spec of every expert)."""
        tensors = {f"tree.{k}": v for k, v in self.tree.to_state()[1].items()}
        tensors |= {f"extractor.{k}": v for k, v in self.extractor.state_dict().items()}
        tensors |= {f"router.{k}": v for k, v in self.router.state_dict().items()}
        specs = {}
        for node, expert in self._pool().items():
            tensors |= {f"experts.{node}.{k}": v for k, v in self._expert_tensors(node, expert).items()}
            lora = lora_settings(expert)
            specs[str(node)] = {**self.expert_specs[node], **({"lora": {**lora, "base": 0}} if lora else {})}
        return tensors, specs

    def stored_parameters(self) -> int:
        """Number of values save_bundle stores (experts of a LoRA tree: the root in full, the others' LoRA)."""
        return sum(t.numel() for t in self._bundle_tensors()[0].values())

    def save_bundle(self, directory: str | Path) -> None:
        """weights.safetensors (extractor, router, tree centroids, experts: plain ones in full, LoRA ones as
        their lora_A/lora_B on the root) + bundle.json."""
        if self.extractor_config is None:
            raise ValueError("save_bundle needs extractor_config (the extractor's constructor kwargs)")
        absent = sorted(set(range(self.tree.n_nodes)) - set(self.expert_specs))
        if absent:
            raise ValueError(f"save_bundle needs expert_specs (name, preset, overrides) for node(s) {absent}")
        tensors, specs = self._bundle_tensors()
        d = ensure_dir(directory)
        # copies: safetensors refuses tensors that share memory (tied weights)
        with atomic_path(d / WEIGHTS) as tmp:  # temp + rename: an interrupted save leaves the old bundle
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, str(tmp))
        config = {"format": BUNDLE_FORMAT, "extractor": self.extractor_config, "router": self.router.config,
                  "experts": specs, "tree": self.tree.to_state()[0]}
        atomic_write(d / CONFIG, json.dumps(config, indent=1))
        if self.calibration is not None:
            save_calibration(d, self.calibration, config)

    @classmethod
    def load_bundle(
        cls, directory: str | Path, *, build_extractor: Callable[..., nn.Module] = DegradationExtractor,
        build_expert: Callable[..., nn.Module] = create_expert, device: str | torch.device = "cpu",
    ) -> "UniRestorer":
        """Rebuild every module from bundle.json, then load weights.safetensors strictly: both are checked
        first (model/bundle_schema.py), a bad bundle raises BundleError (a ValueError) naming the field."""
        d = Path(directory)
        cfg_file, weights_file = d / CONFIG, d / WEIGHTS
        for f in (cfg_file, weights_file):
            if not f.is_file():
                raise FileNotFoundError(f"bundle file missing: {f}")
        config = bundle_schema.read_config(cfg_file, build_extractor)  # checked before any value reaches a constructor
        specs = {int(k): {n: v for n, v in s.items() if n != "lora"} for k, s in config["experts"].items()}
        loras = {int(k): s["lora"] for k, s in config["experts"].items() if "lora" in s}

        def build(share: bool = False) -> dict[str, nn.Module]:
            """Every module by its tensor prefix; `share`: nodes of one spec get one module (on meta, shapes only)."""
            cache: dict[str, nn.Module] = {}

            def expert(n: int) -> nn.Module:
                lora = loras.get(n)
                key = json.dumps([specs[n], lora and [lora["rank"], lora["alpha"]]], sort_keys=True)
                if not share or key not in cache:
                    cache[key] = build_expert(**specs[n])
                    if lora:
                        add_lora(cache[key], lora["rank"], lora["alpha"])
                return cache[key]

            return {"extractor.": build_extractor(**config["extractor"]), "router.": Router(**config["router"])} | {
                f"experts.{n}.": expert(n) for n in specs}

        # shapes, dtypes and bytes from a build on the meta device: nothing is allocated before they are checked
        meta = bundle_schema.build_on_meta(lambda: build(share=True), str(cfg_file))
        bundle_schema.check_memory({p + k: v for p, m in meta.items() for k, v in m.state_dict().items()}, str(cfg_file))
        expected = {"tree.centroids": torch.empty(len(config["tree"]["parents"]), config["router"]["dim"],
                                                  device="meta")}  # router dim = embedding dim
        expected |= {p + k: v for p, m in meta.items()
                     for k, v in (lora_state_dict(m) if has_lora(m) else m.state_dict()).items()}
        tensors = bundle_schema.read_tensors(weights_file, device)
        bundle_schema.check_tensors(tensors, expected, str(weights_file))
        parts = build()
        extractor, router = parts["extractor."], parts["router."]
        experts = {n: parts[f"experts.{n}."] for n in specs}

        def under(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        # a LoRA expert: its base from the tensors of its base expert (same spec: schema-checked), then its LoRA
        bases = {f"experts.{n}.": under(f"experts.{lora['base']}.") for n, lora in loras.items()}
        for prefix, module in parts.items():
            module.load_state_dict(bases.get(prefix, {}) | under(prefix))
            module.to(device)
        tree = DegradationTree.from_state(config["tree"], {"centroids": tensors["tree.centroids"].cpu()}, str(cfg_file))
        bundle_schema.check_routing(router, tree, str(weights_file))
        calibration = load_calibration(d, config, tree) if "calibration" in config else None
        model = cls(extractor, tree, router, experts, expert_specs=specs, extractor_config=config["extractor"],
                    calibration=calibration)
        return model.eval()


def save_calibration(directory: str | Path, calibration: Calibration, config: dict | None = None) -> None:
    """Store the bank beside a bundle: bundle.json without its `calibration` entry, calibration.safetensors, then
    bundle.json with the new entry (each write atomic). Interrupted anywhere, the bundle still loads: with the old
    bank, without one, or with the new one. `config`: bundle.json as the caller has it (default: read it)."""
    from unirestorer.safe_json import read_json

    d = Path(directory)
    config = dict(read_json(d / CONFIG) if config is None else config)
    meta, tensors = calibration.to_state()
    if config.pop("calibration", None) is not None:
        atomic_write(d / CONFIG, json.dumps(config, indent=1))
    with atomic_path(d / CALIBRATION) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    atomic_write(d / CONFIG, json.dumps(config | {"calibration": meta}, indent=1))


def load_calibration(directory: Path, config: dict, tree: DegradationTree) -> Calibration:
    """The bank bundle.json's `calibration` entry names: exact tensors, paths of the bundle's own tree."""
    f, meta = directory / CALIBRATION, config["calibration"]
    if not f.is_file():
        raise bundle_schema.BundleError(f"{directory / CONFIG}: calibration is set but {f} is missing")
    n, levels, dim = meta["samples"], tree.n_levels, config["router"]["dim"]
    expected = {"embeddings": torch.empty(n, dim, device="meta"), "psnr": torch.empty(n, levels, device="meta"),
                "paths": torch.empty(n, levels, dtype=torch.long, device="meta")}
    for key, name in (("floor_quantile", "floors"), ("ceiling_quantile", "ceilings")):
        if key in meta:
            expected[name] = torch.empty(n, device="meta")
    tensors = bundle_schema.read_tensors(f, "cpu")
    bundle_schema.check_tensors(tensors, expected, str(f))
    try:
        return Calibration.from_state(meta, tensors, tree.leaf_paths())
    except ValueError as err:
        raise bundle_schema.BundleError(f"{f}: {err}") from None


def bundle_bytes(directory: str | Path) -> int:
    """Size of a bundle's weights.safetensors in bytes (what a LoRA tree saves on disk)."""
    return (Path(directory) / WEIGHTS).stat().st_size
