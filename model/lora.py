"""LoRA experts: a frozen base expert plus a trainable rank-r update of every convolution.

Each conv weight W (out, in/groups, kh, kw), read as the matrix (out, in/groups*kh*kw), becomes
W + (alpha/r) * B @ A with B zero-initialised, so a fresh LoRA expert equals its base. The update is
folded into the weight before the conv: one conv per layer, and its cost does not grow with pixels.
A LoRA conv keeps the plain conv's parameter names (`weight`, `bias`) and adds `lora_A`, `lora_B`,
so plain checkpoints load into LoRA experts and a LoRA checkpoint is just the `lora_*` tensors.

A LoRA tree (the paper's variant, `model.lora_rank > 0`): node 0 is a full expert, every other node is
the root's frozen weights plus its own LoRA (`tree_expert`); only the LoRA tensors are trained
(`trainable_parameters`) and stored in a bundle.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .experts import create_expert


class LoRAConv2d(nn.Conv2d):
    """A Conv2d with a frozen weight and a trainable low-rank update of it."""

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )
        self.weight, self.bias = conv.weight, conv.bias
        out_ch, fan_in = self.weight.shape[0], self.weight[0].numel()
        r = min(rank, out_ch, fan_in)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        kw = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, fan_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_ch, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A).view_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.merged_weight(), self.bias)


def _replace(expert: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(expert.get_submodule(parent), child, module)


def has_lora(expert: nn.Module) -> bool:
    return any(isinstance(m, LoRAConv2d) for m in expert.modules())


def lora_settings(expert: nn.Module) -> dict | None:
    """{"rank", "alpha"} of a LoRA expert (add_lora gives every conv the same), None for a plain one."""
    first = next((m for m in expert.modules() if isinstance(m, LoRAConv2d)), None)
    return None if first is None else {"rank": first.rank, "alpha": first.alpha}


def trainable_parameters(expert: nn.Module) -> list[nn.Parameter]:
    """What training may update: a LoRA expert's lora_A/lora_B (its base stays frozen), else every parameter."""
    if not has_lora(expert):
        return list(expert.parameters())
    return [p for n, p in expert.named_parameters() if n.endswith((".lora_A", ".lora_B"))]


def tree_expert(spec: dict, node: int, lora: dict | None) -> nn.Module:
    """Expert of tree node `node`: `create_expert(**spec)`; in a LoRA tree (`lora` = {"rank", "alpha"}) every
    node but the root (0) gets a LoRA, its base to be the root's weights (copied in by the experts stage)."""
    expert = create_expert(**spec)
    return add_lora(expert, lora["rank"], lora["alpha"]) if lora and node != 0 else expert


def add_lora(expert: nn.Module, rank: int = 8, alpha: float = 16) -> nn.Module:
    """Freeze every parameter of `expert` and give each Conv2d a trainable LoRA update (in place)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(expert):
        raise ValueError("expert already has LoRA; merge_lora it first or copy it with init_child_from_parent")
    convs = [(n, m) for n, m in expert.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(expert).__name__} has no Conv2d to put LoRA on")
    expert.requires_grad_(False)
    for name, conv in convs:
        _replace(expert, name, LoRAConv2d(conv, rank, alpha))
    return expert


def merge_lora(expert: nn.Module) -> nn.Module:
    """Fold every LoRA update into its conv weight (in place): a plain expert, same output, for inference."""
    for name, lora in [(n, m) for n, m in expert.named_modules() if isinstance(m, LoRAConv2d)]:
        conv = nn.Conv2d(
            lora.in_channels, lora.out_channels, lora.kernel_size, lora.stride, lora.padding, lora.dilation,
            lora.groups, lora.bias is not None, lora.padding_mode, device="meta",
        )
        conv.weight = nn.Parameter(lora.merged_weight().detach(), requires_grad=lora.weight.requires_grad)
        conv.bias = lora.bias
        _replace(expert, name, conv)
    return expert


def lora_state_dict(expert: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA weights: what a non-root node of a LoRA tree saves (its base is the root)."""
    state = {k: v for k, v in expert.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}
    if not state:
        raise ValueError("expert has no LoRA weights (add_lora was not applied)")
    return state


def load_lora_state_dict(expert: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by `lora_state_dict` into an expert that has LoRA on the same base."""
    expected = set(lora_state_dict(expert))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"LoRA state does not match the expert: missing {missing[:3]}, unexpected {unexpected[:3]}")
    expert.load_state_dict(state, strict=False)


def plain_state_dict(expert: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights under plain names, LoRA (if any) merged in: loads into `create_expert(...)`."""
    state = {k: v for k, v in expert.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, m in expert.named_modules():
        if isinstance(m, LoRAConv2d):
            state[f"{name}.weight"] = m.merged_weight().detach()
    return state


def init_child_from_parent(
    child: nn.Module, parent: nn.Module, mode: Literal["copy", "lora"] = "copy", rank: int = 8, alpha: float = 16
) -> nn.Module:
    """Make `child` (a plain expert of the parent's architecture) start exactly where `parent` is.

    copy: the child gets the parent's full weights (LoRA merged in) and trains all of them.
    lora: the child keeps the parent's frozen base and trains a LoRA on it: a copy of the parent's
      LoRA if it has one (so every node of a LoRA tree has the root as its base, and `rank`/`alpha`
      are the parent's), else a fresh one. Either way the child's output equals the parent's.
    """
    if has_lora(child):
        raise ValueError("child must be a plain expert (built by create_expert), not one with LoRA")
    if mode == "copy":
        child.load_state_dict(plain_state_dict(parent))
        child.requires_grad_(True)
    elif mode == "lora":
        if has_lora(parent):
            first = next(m for m in parent.modules() if isinstance(m, LoRAConv2d))
            add_lora(child, rank=first.rank, alpha=first.alpha)
            child.load_state_dict(parent.state_dict())
        else:
            child.load_state_dict(parent.state_dict())
            add_lora(child, rank=rank, alpha=alpha)
    else:
        raise ValueError(f"mode must be 'copy' or 'lora', got {mode!r}")
    return child
