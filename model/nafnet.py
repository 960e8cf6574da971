"""NAFNet (Chen et al., ECCV 2022): the fast expert.

A U-Net of activation-free blocks: the nonlinearity is SimpleGate (split channels, multiply), and
the only attention is a simplified channel attention (global pool, 1x1 conv, rescale). With
`stat_window` P (the training patch) the pool is local at test time (TLSC, model/local_stats.py): each
pixel is rescaled by its P-px neighbourhood's statistics, so tiles agree with the whole image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from .local_stats import local_mean


class SimpleGate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return a * b


class LocalAvgPool(nn.Module):
    """Mean over the `window`-px box around each pixel; the global mean (AdaptiveAvgPool2d(1)) when the input
    fits in the window or window is 0."""

    def __init__(self, window: int = 0) -> None:
        super().__init__()
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_mean(x, self.window)


class NAFBlock(nn.Module):
    """Two residual branches (spatial mixing, then channel FFN), each scaled by a zero-init gain."""

    def __init__(self, c: int, dw_expand: int = 2, ffn_expand: int = 2, window: int = 0) -> None:
        super().__init__()
        dw, ffn = c * dw_expand, c * ffn_expand
        self.norm1 = LayerNorm2d(c)
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.gate = SimpleGate()
        self.sca = nn.Sequential(LocalAvgPool(window), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.norm2 = LayerNorm2d(c)
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.conv2(self.conv1(self.norm1(inp))))
        x = self.conv3(x * self.sca(x))
        y = inp + x * self.beta
        x = self.conv5(self.gate(self.conv4(self.norm2(y))))
        return y + x * self.gamma


def _blocks(c: int, n: int, window: int) -> nn.Sequential:
    return nn.Sequential(*(NAFBlock(c, window=window) for _ in range(n)))


class NAFNet(nn.Module):
    """Image -> restored image of the same size (residual on the input)."""

    def __init__(
        self,
        in_chans: int = 3,
        width: int = 32,
        enc_blocks: tuple[int, ...] = (1, 1, 1, 28),
        middle_blocks: int = 1,
        dec_blocks: tuple[int, ...] = (1, 1, 1, 1),
        stat_window: int = 0,
    ) -> None:
        """`stat_window`: the training patch in input pixels (0: pool the whole input, as trained on patches)."""
        super().__init__()
        if len(enc_blocks) != len(dec_blocks):
            raise ValueError(f"NAFNet needs as many decoder as encoder levels: {enc_blocks} vs {dec_blocks}")
        self.multiple = 2 ** len(enc_blocks)
        self.intro = nn.Conv2d(in_chans, width, 3, padding=1)
        self.encoders, self.downs = nn.ModuleList(), nn.ModuleList()
        c = width
        win = [max(1, stat_window >> level) if stat_window else 0 for level in range(len(enc_blocks) + 1)]
        for level, n in enumerate(enc_blocks):
            self.encoders.append(_blocks(c, n, win[level]))
            self.downs.append(nn.Conv2d(c, 2 * c, 2, stride=2))
            c *= 2
        self.middle = _blocks(c, middle_blocks, win[-1])
        self.ups, self.decoders = nn.ModuleList(), nn.ModuleList()
        for i, n in enumerate(dec_blocks):
            self.ups.append(nn.Sequential(nn.Conv2d(c, c * 2, 1, bias=False), nn.PixelShuffle(2)))
            c //= 2
            self.decoders.append(_blocks(c, n, win[len(dec_blocks) - 1 - i]))
        self.ending = nn.Conv2d(width, in_chans, 3, padding=1)
        # start as the identity (the output is residual on the input): a short training run then improves on
        # its input instead of first unlearning a random residual, which smeared mildly degraded images
        nn.init.zeros_(self.ending.weight)
        nn.init.zeros_(self.ending.bias)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        m = self.multiple
        x = self.intro(F.pad(image, (0, -w % m, 0, -h % m), mode="replicate"))
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
        return self.ending(x)[..., :h, :w] + image
