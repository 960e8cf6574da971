"""Degradation tree: recursive k-means over degradation embeddings (DESIGN §1.2).

Nodes carry global ids in breadth-first order: root = 0, level-1 nodes 1..n1 (grouped by parent,
children of a parent sorted by size, largest first), then level-2 nodes, and so on. Everything runs
in torch on the embeddings' device, in chunks over points, so millions of embeddings fit a GPU.

The per-level spec `k` has one entry per level, the first must be 1 (the root):
  - an int: the *total* number of nodes at that level (paper style `[1, 7, 19]`), spread over the
    parents in proportion to their sample counts (at least one child each, largest remainder);
  - a list of ints: the number of children of every parent, in parent id order;
  - None or an `AutoK`: each parent picks its k from the data (silhouette on a sample, within
    bounds, with a minimum cluster size; a parent that does not split well keeps one child, a copy
    of itself). None uses `fit`'s `auto` argument, an `AutoK` entry sets that level's own bounds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from unirestorer.model.kmeans import CHUNK, AutoK, auto_k, check_finite, kmeans, sq_dists
from unirestorer.safe_files import atomic_path, atomic_write, ensure_dir

KSpec = Sequence[int | Sequence[int] | AutoK | None]  # one entry per level, see the module docstring
SUPPORT_QUANTILE = 0.99  # a node's support radius: the distance within which 99 % of its training members lie
# A type node (level 1) is trusted only within this share of its radius: its outer shell is where the other families'
# images nearest to it lie, and its expert harms them (two demo bundles, validation photos: past 0.7 a type expert's
# mean gain is -0.1 to -2.1 dB and 10-28 % of the images lose > 0.5 dB, while a finer node still gains +0.6 to +4.1 dB
# out to its radius; BENCHMARKS.md "The trusted core"). The shell bars the type's own expert only: a leaf below it
# still runs on what its whole support and the type's hold (`supported_levels`), if it keeps the image's exposure
# (`in_shell`, the exposure guard in `UniRestorer.route`).
TRUSTED_FRACTION = 0.7


def _split_total(total: int, counts: list[int], level: int) -> list[int]:
    """Spread `total` children over parents in proportion to their counts, at least one each."""
    if total < len(counts):
        raise ValueError(f"level {level}: total k={total} is fewer than its {len(counts)} parents")
    share = torch.tensor(counts, dtype=torch.float64) * (total - len(counts)) / max(sum(counts), 1)
    ks = share.floor().long()
    rest = total - len(counts) - int(ks.sum())
    ks[torch.argsort(share - ks, descending=True, stable=True)[:rest]] += 1
    return [1 + int(v) for v in ks]


def deepest_level(allowed: Tensor, upto: Tensor | None = None) -> Tensor:
    """[B] the deepest level l <= `upto` [B] (default: the leaf level) with `allowed` [B, n_levels] True; level 0
    when there is none."""
    levels = torch.arange(allowed.shape[1], device=allowed.device).expand_as(allowed)
    ok = allowed if upto is None else allowed & (levels <= upto.to(allowed.device)[:, None])
    return torch.where(ok, levels, torch.zeros_like(levels)).amax(1)


class DegradationTree:
    """Centroids, parent links, counts, task composition and intensity ranges of every node; maps embeddings
    to paths."""

    def __init__(
        self, centroids: Tensor, parents: Sequence[int], level_sizes: Sequence[int],
        counts: Sequence[int], task_names: Sequence[str], task_counts: Tensor, radii: Sequence[float] | None = None,
        intensity_ranges: Tensor | None = None,
    ) -> None:
        n = sum(level_sizes)
        if radii is not None and (len(radii) != n or not all(math.isfinite(r) and r > 0 for r in radii)):
            raise ValueError(f"inconsistent tree: {len(radii)} support radii for {n} nodes (each finite and > 0)")
        if level_sizes[0] != 1 or len(parents) != n or len(counts) != n or centroids.shape[0] != n:
            raise ValueError(f"inconsistent tree: level_sizes {list(level_sizes)}, {len(parents)} parents, "
                             f"{len(counts)} counts, {centroids.shape[0]} centroids")
        if task_counts.shape != (n, len(task_names)):
            raise ValueError(f"task_counts shape {tuple(task_counts.shape)} != ({n}, {len(task_names)})")
        if intensity_ranges is not None and intensity_ranges.shape != (n, len(task_names), 2):
            raise ValueError(f"intensity_ranges shape {tuple(intensity_ranges.shape)} != ({n}, {len(task_names)}, 2)")
        self.centroids = centroids.float()
        self.parents = torch.tensor(list(parents), dtype=torch.long)
        self.level_sizes = [int(s) for s in level_sizes]
        self.counts = torch.tensor(list(counts), dtype=torch.long)
        self.task_names = list(task_names)
        self.task_counts = task_counts.long()
        self.level_starts = [sum(self.level_sizes[:l]) for l in range(len(self.level_sizes))]
        # each node's support: the SUPPORT_QUANTILE of its training embeddings' distances to its centroid
        self.radii = None if radii is None else torch.tensor([float(r) for r in radii])
        # [n, tasks, 2] min and max label intensity of each node's training samples per task, NaN where none
        # is known; None for trees fitted without intensities (and those saved before them)
        self.intensity_ranges = None if intensity_ranges is None else intensity_ranges.double()

    # ---- building -------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, embeddings: Tensor, k: KSpec = (1, None, None), *, tasks: Sequence[str] | None = None,
        auto: AutoK = AutoK(), seed: int = 0, restarts: int = 4, level1_from_tasks: bool = False,
        intensities: Sequence[float | None] | None = None,
    ) -> "DegradationTree":
        """Recursive k-means: every node at level l-1 is split into its children at level l.

        `tasks` (one name per embedding, e.g. the shard's task) fills the task composition, `intensities`
        (the labels' degrees, None where unknown) each node's intensity range per task. With
        `level1_from_tasks` and level 1 asking for one node per task, level 1's k-means starts from the
        per-task mean embeddings instead of k-means++ (Lloyd's iterations then move them as usual): so the
        level-1 nodes start as degradation types, not as one type split by intensity beside two merged.
        """
        x = embeddings.detach().float()
        check_finite(x)
        if tasks is not None and len(tasks) != len(x):
            raise ValueError(f"{len(tasks)} task labels for {len(x)} embeddings")
        if len(k) < 1 or k[0] != 1:
            raise ValueError(f"k spec {list(k)!r}: level 0 must be exactly 1 (the root)")
        groups = [torch.arange(len(x), device=x.device)]  # member indices of each node at this level
        centroids, parents, sizes = [x.mean(0, keepdim=True)], [-1], [1]
        for level, spec in enumerate(k[1:], start=1):
            first_parent = len(parents) - len(groups)
            if isinstance(spec, int):
                ks: list[int | None] = list(_split_total(spec, [len(g) for g in groups], level))
            elif spec is None or isinstance(spec, AutoK):
                ks = [None] * len(groups)
                level_auto = spec or auto
            else:
                ks = [int(v) for v in spec]
                if len(ks) != len(groups):
                    raise ValueError(f"level {level}: {len(ks)} k values for {len(groups)} parents")
            new_groups = []
            for j, (members, kj) in enumerate(zip(groups, ks)):
                node = f"node {first_parent + j} (level {level - 1})"
                xs = x[members]
                init = None
                if level == 1 and level1_from_tasks and tasks is not None and kj == len(set(tasks)):
                    names = sorted(set(tasks))
                    index = torch.tensor([names.index(t) for t in tasks], device=x.device)
                    init = torch.zeros(kj, x.shape[1], device=x.device).index_add_(0, index, x)
                    init /= torch.bincount(index, minlength=kj)[:, None]
                if kj is None:
                    c, labels = auto_k(xs, level_auto, seed + first_parent + j, node)
                else:
                    c, labels, _ = kmeans(xs, kj, seed=seed + first_parent + j, restarts=restarts, node=node,
                                          init=init)
                order = torch.argsort(-torch.bincount(labels, minlength=len(c)), stable=True)
                for ci in order.tolist():
                    centroids.append(c[ci : ci + 1])
                    parents.append(first_parent + j)
                    new_groups.append(members[labels == ci])
            sizes.append(len(new_groups))
            groups = new_groups
        task_names = sorted(set(tasks)) if tasks is not None else []
        tree = cls(torch.cat(centroids).cpu(), parents, sizes, [0] * sum(sizes), task_names,
                   torch.zeros(sum(sizes), len(task_names), dtype=torch.long))
        tree.update_counts(x, tasks, intensities)
        tree.radii = tree.support_radii(x)
        return tree

    def update_counts(self, embeddings: Tensor, tasks: Sequence[str] | None = None,
                      intensities: Sequence[float | None] | None = None) -> None:
        """Recount samples (and their tasks) per node by routing them with `path`, as restore does; with
        `intensities`, also each node's per-task intensity range (what `restore --explain` shows)."""
        paths = self.path(embeddings).cpu()
        n = len(self.parents)
        self.counts = torch.bincount(paths.flatten(), minlength=n)
        self.task_counts = torch.zeros(n, len(self.task_names), dtype=torch.long)
        self.intensity_ranges = None
        if intensities is not None and (tasks is None or len(intensities) != len(paths)):
            raise ValueError(f"{len(intensities)} intensities for {len(paths)} embeddings"
                             f"{'' if tasks is not None else ' and no task labels to group them by'}")
        if tasks is not None:
            if len(tasks) != len(paths):
                raise ValueError(f"{len(tasks)} task labels for {len(paths)} embeddings")
            unknown = sorted(set(tasks) - set(self.task_names))
            if unknown:
                raise ValueError(f"unknown task(s) {unknown[:5]}; this tree knows {self.task_names}")
            index = {t: i for i, t in enumerate(self.task_names)}
            t = torch.tensor([index[s] for s in tasks], dtype=torch.long)
            flat = paths * len(self.task_names) + t[:, None]
            self.task_counts = torch.bincount(flat.flatten(), minlength=n * len(self.task_names)).view(n, -1)
            if intensities is not None:
                v = torch.tensor([math.nan if i is None else float(i) for i in intensities], dtype=torch.float64)
                known = v.isfinite()
                where, v = flat[known].flatten(), v[known].repeat_interleave(self.n_levels)
                empty = torch.full((n * len(self.task_names),), math.nan, dtype=torch.float64)
                self.intensity_ranges = torch.stack([empty.scatter_reduce(0, where, v, how, include_self=False)
                                                     for how in ("amin", "amax")], 1).view(n, len(self.task_names), 2)

    def distances(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] Euclidean distance of each embedding to the centroid of each node on its path (fp32)."""
        x = embeddings.detach().float()
        cent = self.centroids.to(x.device)[paths]  # [B, n_levels, d]
        return (x[:, None] - cent).pow(2).sum(-1).sqrt()

    def support_radii(self, embeddings: Tensor, quantile: float = SUPPORT_QUANTILE) -> Tensor:
        """Per node, the `quantile` of its members' distances to its centroid (members: routed by `path`).
        A node with fewer than two members gets its parent's radius (the root: the whole set's)."""
        paths = self.path(embeddings)
        dist = self.distances(embeddings, paths).cpu()
        radii = torch.zeros(self.n_nodes)
        for node in range(self.n_nodes):
            level = self.level_of(node)
            members = dist[paths[:, level].cpu() == node, level]
            radii[node] = members.quantile(quantile) if len(members) > 1 else radii[max(int(self.parents[node]), 0)]
        return radii.clamp_min(1e-6)

    def supported_levels(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] True where the node at that level may restore the image: every node on the path down
        to it holds the embedding within its whole support, and the node itself within its trusted core (the
        root holds everything). A type node's outer shell bars its own expert only: the leaves below it choose
        the degree within what it holds, and a leaf's gain stays positive out to its radius (BENCHMARKS.md,
        "fifth session"; barring the leaves too cost the seed-1 demo 1 dB on noise, "thirteenth session"). A node
        also holds what lies past it as seen from the clean images (`beyond`). Without radii: all True."""
        whole, trusted = self._held(embeddings, paths)
        return whole.long().cumprod(1).bool() & trusted

    def in_shell(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] True where a node at or above that level lies outside its trusted core for the image:
        a node there runs in the outer shell of a type, among the other families' nearest images, and only if
        it keeps the image's exposure (`UniRestorer.route`). All False without radii."""
        return ~self._held(embeddings, paths)[1].long().cumprod(1).bool()

    def open_to_evidence(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] True where the calibration bank's clear evidence may take the image to the node past
        the support check (`Calibration.promote` in model/fallback.py): everywhere but a type node's own outer
        shell, which bars its expert whatever its neighbours gained (a noise type's expert there took a mildly
        noisy photo from 31.9 to 30.3 dB where its 15 neighbours had gained +2.2 dB, BENCHMARKS.md "fifteenth
        session"). All True without radii."""
        whole, trusted = self._held(embeddings, paths)
        return ~whole | trusted

    def _held(self, embeddings: Tensor, paths: Tensor) -> tuple[Tensor, Tensor]:
        """([B, n_levels] within each path node's whole support, [B, n_levels] within its trusted core); both
        count what lies `beyond` the node, and the root holds everything."""
        if self.radii is None:
            held = torch.ones(paths.shape, dtype=torch.bool, device=paths.device)
            return held, held.clone()
        d, beyond = self.distances(embeddings, paths), self.beyond(embeddings, paths)
        whole = (d <= self.radii.to(paths.device)[paths]) | beyond
        trusted = (d <= self.trusted_radii().to(paths.device)[paths]) | beyond
        whole[:, 0] = trusted[:, 0] = True
        return whole, trusted

    def supported_depth(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B] the deepest level whose node may restore the image (`supported_levels`; 0 at least)."""
        return deepest_level(self.supported_levels(embeddings, paths))

    def trusted_fraction(self, node_id: int) -> float:
        """The share of a node's support radius within which the support check trusts its expert."""
        return TRUSTED_FRACTION if self.level_of(node_id) == 1 else 1.0

    def trusted_radii(self) -> Tensor:
        """[n_nodes] each node's radius times its trusted fraction (requires radii)."""
        return self.radii * torch.tensor([self.trusted_fraction(n) for n in range(self.n_nodes)])

    def beyond(self, embeddings: Tensor, paths: Tensor) -> Tensor:
        """[B, n_levels] True where the embedding lies past the node's centroid on the ray from the clean leaf
        nearest to that node, within the node's radius of the ray: the node's own degradation, heavier than
        its members'. Its expert still restores such an image, which the root leaves as it is (the robustness
        benchmark's heavy sets: routed 14.5 → 16.0 dB, BENCHMARKS.md). Outside the support on the clean side
        (milder than trained) or off the ray (another family) is not held. All False without radii or a
        clean leaf."""
        held = torch.zeros(paths.shape, dtype=torch.bool, device=paths.device)
        cleans = self.clean_leaves()
        if self.radii is None or not len(cleans):
            return held
        x = embeddings.detach().float()
        cent = self.centroids.to(x.device).float()
        nearest_clean = cleans.to(x.device)[torch.cdist(cent, cent[cleans.to(x.device)]).argmin(1)]
        anchor = cent[nearest_clean[paths]]  # [B, n_levels, d]
        axis = cent[paths] - anchor
        length = axis.norm(dim=-1)
        v = x[:, None] - anchor
        along = (v * axis).sum(-1) / length.clamp_min(1e-12)
        across = (v.pow(2).sum(-1) - along.pow(2)).clamp_min(0).sqrt()
        return (length > 0) & (along > length) & (across <= self.radii.to(x.device)[paths])

    def clean_leaves(self) -> Tensor:
        """Global ids of the leaves whose majority task is "clean" (empty when no clean task was labelled)."""
        if "clean" not in self.task_names:
            return torch.zeros(0, dtype=torch.long)
        leaves = self.leaf_ids
        return leaves[self.dominant_task()[leaves] == self.task_names.index("clean")]

    def clean_claim(self, embeddings: Tensor, paths: Tensor) -> tuple[Tensor, Tensor]:
        """([B] deepest level allowed, [B] clean leaf holding the image or -1). An embedding inside the support
        of a clean leaf may be a clean image: no node finer than that leaf's deepest common ancestor with the
        routed path may restore it, since a fine expert of another family (a haze leaf on a bright photo)
        rewrites it. Without radii or a clean leaf: the leaf level everywhere, no claimant."""
        depth = torch.full((len(paths),), self.n_levels - 1, dtype=torch.long, device=paths.device)
        claim = torch.full_like(depth, -1)
        if self.radii is None:
            return depth, claim
        x = embeddings.detach().float()
        for leaf in self.clean_leaves().tolist():
            inside = (x - self.centroids[leaf].to(x.device)).pow(2).sum(1).sqrt() <= float(self.radii[leaf])
            own = torch.tensor(self.ancestors(leaf) + [leaf], device=paths.device)
            shared = (paths == own).long().cumprod(1).sum(1) - 1  # the deepest level both paths share
            capped = inside & (shared < depth)
            depth, claim = torch.where(capped, shared, depth), torch.where(capped, leaf, claim)
        return depth, claim

    # ---- structure --------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def leaf_ids(self) -> Tensor:
        return torch.arange(self.level_starts[-1], self.n_nodes)

    def level_of(self, node_id: int) -> int:
        self._check_node(node_id)
        return max(l for l, s in enumerate(self.level_starts) if s <= node_id)

    def leaf_index(self, node_id: int) -> int:
        """Position of a leaf among the leaves (0..n_leaves-1)."""
        if self.level_of(node_id) != self.n_levels - 1:
            raise ValueError(f"node {node_id} is not a leaf (leaves are {self.level_starts[-1]}..{self.n_nodes - 1})")
        return node_id - self.level_starts[-1]

    def ancestors(self, node_id: int) -> list[int]:
        """Ids from the root down to the node's parent (empty for the root)."""
        self._check_node(node_id)
        out, p = [], int(self.parents[node_id])
        while p >= 0:
            out.append(p)
            p = int(self.parents[p])
        return out[::-1]

    def leaf_paths(self) -> Tensor:
        """LongTensor[n_leaves, n_levels]: root→leaf node ids of every leaf."""
        return torch.tensor([self.ancestors(int(i)) + [int(i)] for i in self.leaf_ids], dtype=torch.long)

    def dominant_task(self) -> Tensor:
        """Index of each node's majority task, -1 for nodes with no labelled samples."""
        if not self.task_names:
            return torch.full((self.n_nodes,), -1, dtype=torch.long)
        return self.task_counts.argmax(1).masked_fill(self.task_counts.sum(1) == 0, -1)

    def composition(self, node_id: int) -> dict[str, int]:
        self._check_node(node_id)
        return {t: int(c) for t, c in zip(self.task_names, self.task_counts[node_id]) if c > 0}

    def intensity_range(self, node_id: int, task: str) -> tuple[float, float] | None:
        """(min, max) intensity of the node's training samples of `task`; None where none is known."""
        self._check_node(node_id)
        if self.intensity_ranges is None or task not in self.task_names:
            return None
        lo, hi = self.intensity_ranges[node_id, self.task_names.index(task)].tolist()
        return None if math.isnan(lo) else (lo, hi)

    def _check_node(self, node_id: int) -> None:
        if not 0 <= node_id < self.n_nodes:
            raise ValueError(f"node id {node_id} out of range 0..{self.n_nodes - 1}")

    # ---- routing ----------------------------------------------------------------------------
    def path(self, embeddings: Tensor, check: bool = True) -> Tensor:
        """LongTensor[B, n_levels]: nearest centroid at each level among the chosen parent's children.

        Always in fp32, whatever the autocast state: in bf16 the |x|² − 2x·c + |c|² expansion picks wrong
        leaves. `check=False` skips the non-finite check, a host sync; a non-finite row then still gets
        valid node ids (training stages pass it: such an image also gives a non-finite loss, which the
        spine skips)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._path(embeddings.detach().float(), check)

    def _path(self, x: Tensor, check: bool) -> Tensor:
        if check:
            check_finite(x)
        if x.ndim != 2 or x.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"embeddings shape {tuple(x.shape)}, tree expects [B, {self.centroids.shape[1]}]")
        centroids = self.centroids.to(x.device, non_blocking=True)  # host to device without a stream sync
        origin = centroids[0]  # the data mean: centring keeps sq_dists precise
        x = x - origin
        x_sq = x.pow(2).sum(1)
        cent, parents = centroids - origin, self.parents.to(x.device, non_blocking=True)
        node = torch.zeros(len(x), dtype=torch.long, device=x.device)
        out = [node]
        for l in range(1, self.n_levels):
            ids = torch.arange(self.level_starts[l], self.level_starts[l] + self.level_sizes[l], device=x.device)
            picks = []
            for s in range(0, len(x), CHUNK):
                d = sq_dists(x[s : s + CHUNK], x_sq[s : s + CHUNK], cent[ids])
                d = d.masked_fill(parents[ids][None, :] != node[s : s + CHUNK, None], float("inf"))
                picks.append(ids[d.argmin(1)])
            node = torch.cat(picks)
            out.append(node)
        return torch.stack(out, dim=1)

    # ---- persistence ------------------------------------------------------------------------
    def to_state(self) -> tuple[dict, dict[str, Tensor]]:
        """(JSON-able structure, tensors) — shared by `save` and the model bundle."""
        meta = {"level_sizes": self.level_sizes, "parents": self.parents.tolist(), "counts": self.counts.tolist(),
                "task_names": self.task_names, "task_counts": self.task_counts.tolist()}
        if self.radii is not None:
            meta["radii"] = [float(r) for r in self.radii]  # float32 → JSON → float32 is exact
        if self.intensity_ranges is not None:  # [node][task]: [min, max], null where no intensity is known
            meta["intensity_ranges"] = [[None if math.isnan(lo) else [lo, hi] for lo, hi in node]
                                        for node in self.intensity_ranges.tolist()]
        return meta, {"centroids": self.centroids.contiguous()}

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, Tensor], source: str = "tree") -> "DegradationTree":
        try:
            names = meta["task_names"]
            tc = torch.tensor(meta["task_counts"], dtype=torch.long).view(len(meta["parents"]), len(names))
            ranges = meta.get("intensity_ranges")  # optional: trees before it have none
            if ranges is not None:
                ranges = torch.tensor([[[math.nan] * 2 if r is None else r for r in node] for node in ranges],
                                      dtype=torch.float64).view(len(meta["parents"]), len(names), 2)
            return cls(tensors["centroids"], meta["parents"], meta["level_sizes"], meta["counts"], names, tc,
                       meta.get("radii"), ranges)
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise ValueError(f"{source}: not a valid degradation tree ({type(err).__name__}: {err})") from err

    def save(self, directory: str | Path) -> None:
        """Writes tree.json (structure) and tree.safetensors (centroids), each atomically (temp + rename)."""
        d = ensure_dir(directory)
        meta, tensors = self.to_state()
        with atomic_path(d / "tree.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write(d / "tree.json", json.dumps(meta))

    @classmethod
    def load(cls, directory: str | Path) -> "DegradationTree":
        d = Path(directory)
        meta = json.loads((d / "tree.json").read_text())
        return cls.from_state(meta, load_file(str(d / "tree.safetensors")), source=str(d))
