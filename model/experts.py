"""Expert registry: every tree node is one complete restoration network built here by name + preset.

Presets run from `tiny` (CPU tests and the demo, well under 1M parameters) to `paper`:
Restormer as in the UniRestorer paper (26.1M), NAFNet as NAFNet-width32 on GoPro (17.1M).
"""

from __future__ import annotations

from torch import nn

from .nafnet import NAFNet
from .restormer import Restormer

ARCHITECTURES: dict[str, type[nn.Module]] = {"restormer": Restormer, "nafnet": NAFNet}

EXPERTS: dict[str, dict[str, dict]] = {
    "restormer": {
        "tiny": dict(dim=12, blocks=(1, 1, 1, 1), refinement_blocks=1, heads=(1, 1, 2, 4), ffn_expansion=2.0),
        "small": dict(dim=24, blocks=(2, 2, 2, 4), refinement_blocks=2, heads=(1, 2, 4, 8), ffn_expansion=2.66),
        "paper": dict(dim=48, blocks=(4, 6, 6, 8), refinement_blocks=4, heads=(1, 2, 4, 8), ffn_expansion=2.66),
    },
    "nafnet": {
        "tiny": dict(width=8, enc_blocks=(1, 1, 1, 1), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
        "small": dict(width=16, enc_blocks=(1, 1, 2, 8), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
        "paper": dict(width=32, enc_blocks=(1, 1, 1, 28), middle_blocks=1, dec_blocks=(1, 1, 1, 1)),
    },
}


def create_expert(name: str, preset: str = "tiny", **overrides) -> nn.Module:
    """Build expert `name` with the kwargs of `preset`, any of them replaced by `overrides`.

    The network maps B x C x H x W to the same shape for any H, W (it pads and crops inside).
    """
    if name not in EXPERTS:
        raise ValueError(f"unknown expert {name!r}; known: {sorted(EXPERTS)}")
    if preset not in EXPERTS[name]:
        raise ValueError(f"unknown preset {preset!r} for expert {name!r}; known: {sorted(EXPERTS[name])}")
    return ARCHITECTURES[name](**{**EXPERTS[name][preset], **overrides})
