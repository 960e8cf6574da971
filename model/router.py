"""Multi-granularity router (DESIGN §1.4): pick one expert per image from its degradation embedding.

`H_d` maps the embedding towards its leaf centroid, `H_g` to a log-variance; `G_d` scores leaves,
`G_g` scores levels. The leaf k* and level t* are argmaxes; the expert is the node at level t* on
the root→k* path. `gate` keeps the expert's output value exact while L1 reaches the gates through
g = p_leaf[k*] + p_level[t*]. Everything after the two heads is the pure function `select`, so the
single-process model and the expert-parallel placement route identically for the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .tree import DegradationTree

TaskArg = str | Sequence[str | None] | Tensor | None  # one task for the batch, one per image, or indices


@dataclass
class Route:
    """Per-image routing decision; all tensors have batch dimension B first."""

    node: Tensor  # [B] global node id of the chosen expert
    leaf: Tensor  # [B] k*, index among leaves
    level: Tensor  # [B] t*, 0 = root
    g: Tensor  # [B] p_leaf[k*] + p_level[t*], carries the gradient to the gates
    p_leaf: Tensor  # [B, n_leaves]
    p_level: Tensor  # [B, n_levels]
    leaf_logits: Tensor  # [B, n_leaves] after noise and masks
    level_logits: Tensor  # [B, n_levels]
    e_d: Tensor | None = None  # [B, d] centroid estimate
    e_g: Tensor | None = None  # [B, d] log-variance
    router_level: Tensor | None = None  # [B] t* before the support check (UniRestorer.route), where it ran
    support: Tensor | None = None  # [B, n_levels] distance to each path node's centroid / that node's radius
    clean_leaf: Tensor | None = None  # [B] the clean leaf that capped the level below the support check, or -1
    refused: Tensor | None = None  # [B] the node the calibration bank refused where that set the level, or -1
    promoted: Tensor | None = None  # [B] the node the calibration bank took the image down to past the router, or -1
    past_support: Tensor | None = None  # [B] the bank took it there past the support check (its evidence alone)
    evidence: Tensor | None = None  # [B, 3] at that node (either): neighbours through it, their mean gain (dB), harmed
    floor: Tensor | None = None  # [B] the image's dark channel floor, where the bank keeps floors
    floor_node: Tensor | None = None  # [B] the node whose floor minimum set the level, or -1
    ceiling: Tensor | None = None  # [B] the image's brightness ceiling, where the bank keeps ceilings
    ceiling_node: Tensor | None = None  # [B] the node whose ceiling minimum set the level, or -1
    shell: Tensor | None = None  # [B] the node that runs lies outside a trusted core on its path (tree.py, `in_shell`)
    exposure_node: Tensor | None = None  # [B] the node the exposure guard barred, or -1
    exposure_shift: Tensor | None = None  # [B] that node's shift of the mean luminance (NaN where not barred)


def _head(dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(dim, dim, bias=False), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers, nn.Linear(dim, dim), nn.BatchNorm1d(dim))


def select(
    leaf_logits: Tensor, level_logits: Tensor, leaf_paths: Tensor,
    leaf_mask: Tensor | None = None, node_mask: Tensor | None = None,
) -> Route:
    """The selection rule on (possibly noisy) logits; masks are True where allowed.

    leaf_mask [B, n_leaves] restricts k*; node_mask [B, n_nodes] restricts t* to the levels whose
    node on the root→k* path is allowed (so the level mask follows the chosen leaf).
    """
    if leaf_mask is not None:
        _refuse_empty(leaf_mask, "leaf_mask allows no leaf")
        leaf_logits = leaf_logits.masked_fill(~leaf_mask, float("-inf"))
    p_leaf = leaf_logits.softmax(-1)
    leaf = p_leaf.argmax(-1)
    paths = leaf_paths[leaf]  # [B, n_levels]
    if node_mask is not None:
        allowed = node_mask.gather(1, paths)
        _refuse_empty(allowed, "node_mask allows no node on the chosen leaf's path")
        level_logits = level_logits.masked_fill(~allowed, float("-inf"))
    p_level = level_logits.softmax(-1)
    level = p_level.argmax(-1)
    g = p_leaf.gather(1, leaf[:, None]).squeeze(1) + p_level.gather(1, level[:, None]).squeeze(1)
    node = paths.gather(1, level[:, None]).squeeze(1)
    return Route(node, leaf, level, g, p_leaf, p_level, leaf_logits, level_logits)


def _refuse_empty(mask: Tensor, what: str) -> None:
    """An all-False mask row makes every probability NaN and the argmax an arbitrary pick: refuse it."""
    empty = ~mask.any(-1)
    if bool(empty.any()):
        raise ValueError(f"{what} for image(s) {empty.nonzero().flatten().tolist()}")


def gate(expert_out: Tensor, g: Tensor) -> Tensor:
    """y = E(x)·g/stopgrad(g): the value is exactly E(x), the gradient flows into g."""
    return expert_out * (g / g.detach()).view(-1, *([1] * (expert_out.ndim - 1)))


def dg_loss(e_d: Tensor, e_g: Tensor, u: Tensor) -> Tensor:
    """Gaussian NLL of the leaf centroid u under mean e_d and log-variance e_g."""
    return (0.5 * torch.exp(-e_g) * (u - e_d).pow(2) + 0.5 * e_g).mean()


def cv_squared(importance: Tensor) -> Tensor:
    """Squared coefficient of variation of the batch-summed level probabilities [n_levels] (load balance)."""
    importance = importance.float()
    if importance.numel() < 2:
        return importance.new_zeros(())
    return importance.var() / (importance.mean().pow(2) + 1e-10)


LEVEL_PSNR_CAP = 50.0  # dB; matches the experts' PSNR loss floor (train/stage_experts.py)


def image_psnr(out: Tensor, gt: Tensor) -> Tensor:
    """PSNR in dB of each image [..., 3, H, W] in [0, 1] (MSE floored at 1e-10: 100 dB at most)."""
    return -10 * torch.log10((out - gt).pow(2).flatten(-3).mean(-1).clamp_min(1e-10))


def best_level(psnr: Tensor, margin_db: float = 0.0) -> Tensor:
    """Target level per image from the frozen path experts' PSNR [B, n_levels]: the coarsest level within
    `margin_db` of the best. A fine expert must earn its place: where it gains less than the margin over
    a coarser one, the coarser one is the target, as it is the safer choice when recognition is wrong."""
    psnr = psnr.clamp_max(LEVEL_PSNR_CAP)  # above it every output is as good as the input: the coarsest wins
    return (psnr >= psnr.max(1, keepdim=True).values - margin_db).long().argmax(1)


def task_subtrees(tree: DegradationTree) -> Tensor:
    """[T, n_nodes] True for the level-1 node(s) a task dominates and all their descendants.

    A task that dominates no level-1 node takes the one holding most of its samples; a task the tree
    never saw gets no subtree (all False).
    """
    inside = torch.zeros(len(tree.task_names), tree.n_nodes, dtype=torch.bool)
    if tree.n_levels < 2:
        return inside
    level1 = torch.arange(tree.level_starts[1], tree.level_starts[1] + tree.level_sizes[1])
    dom = tree.dominant_task()[level1]
    for t in range(len(tree.task_names)):
        owned = level1[dom == t]
        if len(owned) == 0 and tree.task_counts[level1, t].sum() > 0:
            owned = level1[tree.task_counts[level1, t].argmax()][None]
        inside[t, owned] = True
        for node in range(tree.level_starts[2] if tree.n_levels > 2 else tree.n_nodes, tree.n_nodes):
            inside[t, node] = inside[t, int(tree.parents[node])]  # breadth-first ids: parents come first
    return inside


def instruction_masks(tree: DegradationTree) -> tuple[Tensor, Tensor]:
    """Per task: allowed leaves [T, n_leaves] and allowed nodes [T, n_nodes] (root + the task's subtree).

    A task the tree never saw falls back to the root expert (all leaves allowed for k*, only the root
    for t*). A one-level tree has only the root.
    """
    node_mask = task_subtrees(tree)
    leaf_mask = node_mask[:, tree.leaf_ids]
    unseen = ~leaf_mask.any(1)
    leaf_mask[unseen] = True
    node_mask[unseen] = False
    node_mask[:, 0] = True
    return leaf_mask, node_mask


class Router(nn.Module):
    """H_d, H_g, G_d, G_g plus the tree lookups the selection needs (as buffers)."""

    def __init__(
        self, dim: int, n_leaves: int, n_levels: int, n_nodes: int, task_names: Sequence[str] = (), *,
        noisy: bool = True, dg_weight: float = 0.1, aux_weight: float = 0.01, leaf_ce_weight: float = 0.0,
        level_ce_weight: float = 0.0, level_margin_db: float = 0.0,
    ) -> None:
        super().__init__()
        self.config = dict(dim=dim, n_leaves=n_leaves, n_levels=n_levels, n_nodes=n_nodes,
                           task_names=list(task_names), noisy=noisy, dg_weight=dg_weight, aux_weight=aux_weight,
                           leaf_ce_weight=leaf_ce_weight, level_ce_weight=level_ce_weight,
                           level_margin_db=level_margin_db)
        self.task_names = list(task_names)
        self.h_d, self.h_g = _head(dim), _head(dim)
        self.g_d = nn.Linear(dim, 2 * n_leaves)
        self.g_g = nn.Linear(dim, 2 * n_levels)
        for lin in (self.g_d, self.g_g):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        # filled by from_tree, or by load_state_dict when rebuilt from a bundle
        self.register_buffer("leaf_paths", torch.zeros(n_leaves, n_levels, dtype=torch.long))
        self.register_buffer("task_leaf_mask", torch.ones(len(task_names), n_leaves, dtype=torch.bool))
        self.register_buffer("task_node_mask", torch.ones(len(task_names), n_nodes, dtype=torch.bool))

    @classmethod
    def from_tree(cls, tree: DegradationTree, dim: int | None = None, **flags) -> "Router":
        dim = dim or tree.centroids.shape[1]
        router = cls(dim, len(tree.leaf_ids), tree.n_levels, tree.n_nodes, tree.task_names, **flags)
        router.leaf_paths.copy_(tree.leaf_paths())
        leaf_mask, node_mask = instruction_masks(tree)
        router.task_leaf_mask.copy_(leaf_mask)
        router.task_node_mask.copy_(node_mask)
        return router

    def _logits(self, out: Tensor) -> Tensor:
        clean, raw = out.chunk(2, dim=-1)
        if self.training and self.config["noisy"]:
            return clean + torch.randn_like(clean) * (F.softplus(raw) + 0.01)
        return clean

    def task_index(self, task: TaskArg, batch: int) -> Tensor | None:
        """Task per image as indices (-1 = none) from a name, a list of names/None, or indices."""
        if task is None:
            return None
        names = [task] * batch if isinstance(task, str) else task
        if len(names) != batch:
            raise ValueError(f"{len(names)} tasks for a batch of {batch}")
        if isinstance(names, Tensor):
            if names.min() < -1 or names.max() >= len(self.task_names):
                raise ValueError(f"task indices must be in -1..{len(self.task_names) - 1}, got {names.tolist()}")
            return names.long().to(self.leaf_paths.device)
        unknown = sorted({n for n in names if n is not None and n not in self.task_names})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; this tree knows {self.task_names}")
        idx = [-1 if n is None else self.task_names.index(n) for n in names]
        return torch.tensor(idx, dtype=torch.long, device=self.leaf_paths.device)

    def route(self, embedding: Tensor, task: TaskArg = None) -> Route:
        """Embedding [B, d] → Route; `task` turns on instruction mode for those images."""
        e_d, e_g = self.h_d(embedding), self.h_g(embedding)
        leaf_logits, level_logits = self._logits(self.g_d(e_d)), self._logits(self.g_g(e_g))
        leaf_mask = node_mask = None
        t = self.task_index(task, len(embedding))
        if t is not None:
            on = (t >= 0)[:, None]
            leaf_mask = torch.where(on, self.task_leaf_mask[t.clamp_min(0)], True)
            node_mask = torch.where(on, self.task_node_mask[t.clamp_min(0)], True)
        r = select(leaf_logits, level_logits, self.leaf_paths, leaf_mask, node_mask)
        r.e_d, r.e_g = e_d, e_g
        return r

    forward = route

    def loss(
        self, route: Route, l1: Tensor, u: Tensor,
        leaf_target: Tensor | None = None, level_target: Tensor | None = None, importance: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Paper loss L1 + dg_weight·L_dg + aux_weight·L_aux, plus the CE supervision when its weights are set.

        `importance`: the level probabilities summed over the *global* batch (all ranks) for L_aux; default
        this batch's.
        """
        assert route.e_d is not None and route.e_g is not None, "route() output needed (has e_d, e_g)"
        importance = route.p_level.sum(0) if importance is None else importance
        parts = {"l1": l1, "dg": dg_loss(route.e_d, route.e_g, u), "aux": cv_squared(importance)}
        total = l1 + self.config["dg_weight"] * parts["dg"] + self.config["aux_weight"] * parts["aux"]
        if self.config["leaf_ce_weight"] > 0:
            if leaf_target is None:
                raise ValueError("leaf_ce_weight > 0 needs leaf_target (the k-means leaf index)")
            parts["leaf_ce"] = F.cross_entropy(route.leaf_logits, leaf_target)
            total = total + self.config["leaf_ce_weight"] * parts["leaf_ce"]
        if self.config["level_ce_weight"] > 0:
            if level_target is None:
                raise ValueError("level_ce_weight > 0 needs level_target (see best_level)")
            parts["level_ce"] = F.cross_entropy(route.level_logits, level_target)
            total = total + self.config["level_ce_weight"] * parts["level_ce"]
        return total, parts
