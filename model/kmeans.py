"""Chunked k-means, k-means++ seeding and the silhouette score: the clustering the degradation tree is built from.

Everything runs in torch on the points' device, in chunks, so millions of embeddings fit a GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK = 65536  # points per distance block: bounds memory at CHUNK x k distances


@dataclass(frozen=True)
class AutoK:
    """Bounds for choosing a parent's k from the data."""

    k_min: int = 2
    k_max: int = 8
    min_cluster_size: int = 8
    min_silhouette: float = 0.25  # below this the parent is not split (keeps one child)
    sample: int = 2048  # points used for the silhouette score


def check_finite(x: Tensor, what: str = "embeddings") -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{what} contain {int(bad.sum())} non-finite values (NaN/Inf) "
            f"in {int(bad.any(dim=1).sum())} of {len(x)} rows"
        )


def sq_dists(x: Tensor, x_sq: Tensor, c: Tensor) -> Tensor:
    """[n, k] squared distances as |x|^2 - 2x.c + |c|^2: one matmul (the fast path on CPU and GPU).

    Callers centre x first (k-means subtracts the mean) so that the expansion keeps its precision.
    """
    return torch.addmm(x_sq[:, None], x, c.T, alpha=-2).add_(c.pow(2).sum(1)).clamp_min_(0)


def _nearest(x: Tensor, x_sq: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """Index of and squared distance to the nearest row of c, for every row of x (chunked)."""
    labels, d2 = [], []
    for s in range(0, len(x), CHUNK):
        m = sq_dists(x[s : s + CHUNK], x_sq[s : s + CHUNK], c).min(dim=1)
        labels.append(m.indices)
        d2.append(m.values)
    return torch.cat(labels), torch.cat(d2)


def _kmeanspp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator, node: str) -> Tensor:
    """k-means++ seeding: each new centre drawn with probability proportional to D^2.

    Distances within float rounding of zero count as zero, so duplicate points are never drawn twice.
    """

    def dist_to(i: Tensor) -> Tensor:
        d = (x_sq - 2 * (x @ x[i].squeeze(0)) + x_sq[i]).clamp_min_(0)
        return d.masked_fill_(d <= 1e-6 * (x_sq + x_sq[i]), 0.0)

    first = torch.randint(len(x), (1,), generator=gen, device=x.device)
    centres, d2 = [first], dist_to(first)
    for _ in range(1, k):
        cum = d2.double().cumsum(0)
        if cum[-1] <= 0:
            distinct = len(torch.unique(x, dim=0))
            raise ValueError(
                f"{node}: only {distinct} distinct points among {len(x)} for k={k}: "
                "duplicate embeddings make that many clusters impossible"
            )
        r = torch.rand(1, generator=gen, device=x.device, dtype=torch.float64) * cum[-1]
        i = torch.searchsorted(cum, r, right=True).clamp_max(len(x) - 1)
        centres.append(i)
        d2 = torch.minimum(d2, dist_to(i))
    return x[torch.cat(centres)]


def kmeans(
    x: Tensor, k: int, *, seed: int = 0, restarts: int = 4, iters: int = 100, tol: float = 1e-6,
    node: str = "k-means", init: Tensor | None = None,
) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means with k-means++ seeding and restarts; returns (centroids, labels, inertia).

    `init` [k, d] replaces the seeding (one run from those centres). Deterministic for a seed on CPU. An
    emptied cluster is re-seeded at the farthest point.
    """
    x = x.float()
    check_finite(x, f"{node}: embeddings")
    if len(x) < k:
        raise ValueError(f"{node}: {len(x)} points are fewer than the k={k} clusters asked for")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    mean = x.mean(0)
    x = x - mean
    x_sq = x.pow(2).sum(1)
    scale = x_sq.mean().clamp_min(1e-12)
    best: tuple[Tensor, Tensor, float] | None = None
    if init is not None and init.shape != (k, x.shape[1]):
        raise ValueError(f"{node}: init centres of shape {tuple(init.shape)}, expected ({k}, {x.shape[1]})")
    for _ in range(1 if init is not None else restarts):
        c = init.to(x) - mean if init is not None else _kmeanspp(x, x_sq, k, gen, node)
        for _ in range(iters):
            labels, d2 = _nearest(x, x_sq, c)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, labels, x)
            empty = counts == 0
            if empty.any():
                far = d2.topk(int(empty.sum())).indices
                sums[empty], counts[empty] = x[far], 1
            new = sums / counts[:, None]
            shift = (new - c).pow(2).sum(1).max()
            c = new
            if shift <= tol * scale:
                break
        labels, d2 = _nearest(x, x_sq, c)
        inertia = float(d2.sum())
        if best is None or inertia < best[2]:
            best = (c + mean, labels, inertia)
    assert best is not None
    return best


def silhouette(x: Tensor, labels: Tensor) -> float:
    """Mean silhouette coefficient (0 for singleton clusters), O(n^2): pass a sample."""
    k = int(labels.max()) + 1
    d = torch.cdist(x, x)
    onehot = torch.nn.functional.one_hot(labels, k).to(d.dtype)
    counts = onehot.sum(0)
    sums = d @ onehot  # [n, k]: summed distance from each point to each cluster
    own = counts[labels]
    a = sums.gather(1, labels[:, None]).squeeze(1) / (own - 1).clamp_min(1)
    b = (sums / counts.clamp_min(1)).masked_fill(onehot.bool() | (counts == 0), float("inf")).min(1).values
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    return float(s.masked_fill(own <= 1, 0.0).mean())


def auto_k(x: Tensor, auto: AutoK, seed: int, node: str) -> tuple[Tensor, Tensor]:
    """Best-silhouette clustering within bounds; one cluster when nothing splits well."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    sample = torch.randperm(len(x), generator=gen, device=x.device)[: auto.sample]
    best: tuple[float, Tensor, Tensor] | None = None
    distinct = len(torch.unique(x, dim=0))
    for k in range(auto.k_min, min(auto.k_max, distinct) + 1):
        if len(x) < k * auto.min_cluster_size:
            break
        c, labels, _ = kmeans(x, k, seed=seed, node=node)
        if torch.bincount(labels, minlength=k).min() < auto.min_cluster_size:
            continue
        score = silhouette(x[sample], labels[sample])
        if score >= auto.min_silhouette and (best is None or score > best[0]):
            best = (score, c, labels)
    if best is None:
        return x.mean(0, keepdim=True), torch.zeros(len(x), dtype=torch.long, device=x.device)
    return best[1], best[2]
