"""Test-time local statistics (TLSC, Chu et al., ECCV 2022) for the experts' global operations.

NAFNet's channel attention and Restormer's transposed attention pool over their whole input. Trained on
P-px patches, they learned statistics of P-px windows; on a large image a whole-image pool gives other
statistics, and on tiles each tile gets its own, so tiled and whole-image outputs disagree. With a
window P (the training patch), every pixel's statistics are those of the P-px window centred on it
(moved inside the image at its borders): a pure function of a neighbourhood, the same in a tile as in
the whole image once the tile holds it. An input no larger than the window keeps the global pool exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _box_1d(x: Tensor, k: int, dim: int) -> Tensor:
    """Mean over windows of k along `dim` (length n >= k): windows start at i - (k-1)//2, clamped inside."""
    n = x.shape[dim]
    c = F.pad(x.double().cumsum(dim).movedim(dim, -1), (1, 0)).movedim(-1, dim)  # float64: exact enough sums
    start = (torch.arange(n, device=x.device) - (k - 1) // 2).clamp(0, n - k)
    idx = start.view([-1 if d == dim % x.ndim else 1 for d in range(x.ndim)])
    shape = list(x.shape)
    lo = torch.gather(c, dim, idx.expand(shape))
    hi = torch.gather(c, dim, (idx + k).expand(shape))
    return ((hi - lo) / k).to(x.dtype)


def local_mean(x: Tensor, window: int) -> Tensor:
    """x [B,C,H,W] → per-pixel mean over the window² box around each pixel ([B,C,1,1] global mean where the
    input fits in the window, or window 0)."""
    h, w = x.shape[-2:]
    if window <= 0 or (h <= window and w <= window):
        return x.mean((-2, -1), keepdim=True)
    out = _box_1d(x, min(window, h), -2) if h > 1 else x
    return _box_1d(out, min(window, w), -1)
