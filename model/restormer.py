"""Restormer (Zamir et al., CVPR 2022): the UniRestorer paper's default expert.

A 4-level U-Net of transformer blocks whose attention is *transposed* (MDTA: channels attend to
channels, so cost is linear in pixels) and whose feed-forward is gated depth-wise (GDFN). With
`stat_window` P (the training patch) the attention's channel products and norms are taken over each
pixel's P-px neighbourhood at test time (TLSC, model/local_stats.py), so tiles agree with the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import LayerNorm2d
from torch import nn

from .local_stats import local_mean


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention: a C/heads x C/heads attention map per head."""

    def __init__(self, dim: int, heads: int, bias: bool, window: int = 0) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=bias)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias)
        self.proj = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        if self.window and (h > self.window or w > self.window):
            return self.proj(self._local(q, k, v))
        q, k, v = (rearrange(t, "b (n c) h w -> b n c (h w)", n=self.heads) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        out = rearrange(attn @ v, "b n c (h w) -> b (n c) h w", h=h, w=w)
        return self.proj(out)

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention with every pixel's C x C map from its window: means of q_i·k_j over norms, one query
        channel at a time (memory of one [B, C, H, W] map per step, not C of them)."""
        win = self.window
        q, k, v = (rearrange(t, "b (n c) h w -> b n c h w", n=self.heads) for t in (q, k, v))
        b, n, c, h, w = q.shape

        def box(t: torch.Tensor) -> torch.Tensor:  # window mean of [b, n, c, h, w]
            return local_mean(t.flatten(1, 2), win).view(b, n, -1, h, w)

        # F.normalize's eps on the window's L2 norm (sqrt of area x mean square)
        area = min(win, h) * min(win, w)
        qn, kn = ((box(t * t) * area).sqrt().clamp_min(1e-12) for t in (q, k))
        temp = self.temperature.view(1, n, 1, 1, 1)
        rows = []
        for i in range(c):
            logits = box(q[:, :, i : i + 1] * k) * area / (qn[:, :, i : i + 1] * kn) * temp
            rows.append((logits.softmax(dim=2) * v).sum(dim=2))
        return rearrange(torch.stack(rows, dim=2), "b n c h w -> b (n c) h w")


class GDFN(nn.Module):
    """Gated-Dconv feed-forward: GELU(dwconv(a)) * dwconv(b)."""

    def __init__(self, dim: int, expansion: float, bias: bool) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dw(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(a) * b)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_expansion: float, bias: bool, window: int = 0) -> None:
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-5)
        self.attn = MDTA(dim, heads, bias, window)
        self.norm2 = LayerNorm2d(dim, eps=1e-5)
        self.ffn = GDFN(dim, ffn_expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


def _stage(dim: int, depth: int, heads: int, ffn: float, bias: bool, window: int) -> nn.Sequential:
    return nn.Sequential(*(TransformerBlock(dim, heads, ffn, bias, window) for _ in range(depth)))


def _down(dim: int) -> nn.Sequential:
    """Halve resolution, double channels (conv to C/2, then pixel-unshuffle x4 channels)."""
    return nn.Sequential(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


def _up(dim: int) -> nn.Sequential:
    """Double resolution, halve channels (conv to 2C, then pixel-shuffle /4 channels)."""
    return nn.Sequential(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))


class Restormer(nn.Module):
    """Image -> restored image of the same size (residual on the input)."""

    def __init__(
        self,
        in_chans: int = 3,
        dim: int = 48,
        blocks: tuple[int, int, int, int] = (4, 6, 6, 8),
        refinement_blocks: int = 4,
        heads: tuple[int, int, int, int] = (1, 2, 4, 8),
        ffn_expansion: float = 2.66,
        bias: bool = False,
        stat_window: int = 0,
    ) -> None:
        """`stat_window`: the training patch in input pixels (0: attend over the whole input)."""
        super().__init__()
        if len(blocks) != 4 or len(heads) != 4:
            raise ValueError(f"Restormer needs 4 levels: got blocks={blocks}, heads={heads}")
        if dim % 2 or any(dim * 2**i % heads[i] for i in range(4)):
            raise ValueError(f"Restormer dim {dim} must be even and level widths divisible by heads {heads}")
        d = [dim, dim * 2, dim * 4, dim * 8]
        win = [max(1, stat_window >> level) if stat_window else 0 for level in range(4)]
        self.multiple = 8  # three 2x downsamplings
        self.patch_embed = nn.Conv2d(in_chans, dim, 3, padding=1, bias=bias)
        self.enc1 = _stage(d[0], blocks[0], heads[0], ffn_expansion, bias, win[0])
        self.down1 = _down(d[0])
        self.enc2 = _stage(d[1], blocks[1], heads[1], ffn_expansion, bias, win[1])
        self.down2 = _down(d[1])
        self.enc3 = _stage(d[2], blocks[2], heads[2], ffn_expansion, bias, win[2])
        self.down3 = _down(d[2])
        self.latent = _stage(d[3], blocks[3], heads[3], ffn_expansion, bias, win[3])
        self.up3 = _up(d[3])
        self.reduce3 = nn.Conv2d(d[3], d[2], 1, bias=bias)
        self.dec3 = _stage(d[2], blocks[2], heads[2], ffn_expansion, bias, win[2])
        self.up2 = _up(d[2])
        self.reduce2 = nn.Conv2d(d[2], d[1], 1, bias=bias)
        self.dec2 = _stage(d[1], blocks[1], heads[1], ffn_expansion, bias, win[1])
        self.up1 = _up(d[1])  # level 1 keeps the concatenated 2*dim channels (as in the paper)
        self.dec1 = _stage(d[1], blocks[0], heads[0], ffn_expansion, bias, win[0])
        self.refinement = _stage(d[1], refinement_blocks, heads[0], ffn_expansion, bias, win[0])
        self.output = nn.Conv2d(d[1], in_chans, 3, padding=1, bias=bias)
        nn.init.zeros_(self.output.weight)  # start as the identity, as NAFNet does (model/nafnet.py)
        if bias:
            nn.init.zeros_(self.output.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        m = self.multiple
        x = F.pad(image, (0, -w % m, 0, -h % m), mode="replicate")
        e1 = self.enc1(self.patch_embed(x))
        e2 = self.enc2(self.down1(e1))
        e3 = self.enc3(self.down2(e2))
        z = self.latent(self.down3(e3))
        d3 = self.dec3(self.reduce3(torch.cat([self.up3(z), e3], dim=1)))
        d2 = self.dec2(self.reduce2(torch.cat([self.up2(d3), e2], dim=1)))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        out = self.output(self.refinement(d1))
        return out[..., :h, :w] + image
