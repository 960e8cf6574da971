"""The standard CUDA speedups, in one place for training and inference: TF32 matmuls and convolutions
(bf16 autocast covers most ops; TF32 speeds up what stays fp32), cudnn autotuning (shapes repeat: a few
batch sizes of one patch size, or one image size), fused optimizer kernels. Nothing changes on CPU."""

from __future__ import annotations

import torch


def configure(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def optimizer_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for torch.optim.Adam / AdamW: the fused kernel on CUDA (one launch for all params)."""
    return {"fused": True} if device.type == "cuda" else {}
