"""Expert backbones (every registered expert x CPU-sized preset) and LoRA experts."""

from __future__ import annotations

import copy

import pytest
import torch

from unirestorer.model.experts import EXPERTS, create_expert
from unirestorer.model.lora import (
    LoRAConv2d,
    add_lora,
    init_child_from_parent,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    plain_state_dict,
)

CPU_PRESETS = ("tiny", "small")  # "paper" is only constructed: 17-26M params is too slow for a CPU forward here
CASES = [(name, preset) for name in EXPERTS for preset in EXPERTS[name] if preset in CPU_PRESETS]
PAPER_PARAMS = {"restormer": (26.0e6, 26.2e6), "nafnet": (17.0e6, 17.2e6)}  # Restormer 26.13M, NAFNet-w32 GoPro 17.11M

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py



def n_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def test_every_expert_has_cpu_and_paper_presets() -> None:
    assert set(EXPERTS) == {"restormer", "nafnet"}
    for name, presets in EXPERTS.items():
        assert {"tiny", "small", "paper"} <= set(presets), name
        assert n_params(create_expert(name, "tiny")) < 500_000, f"{name} tiny must stay well under 1M"


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_preset_parameter_count(name: str) -> None:
    low, high = PAPER_PARAMS[name]
    assert low <= n_params(create_expert(name, "paper")) <= high


def test_restormer_paper_preset_is_the_papers_config() -> None:
    cfg = EXPERTS["restormer"]["paper"]
    assert (cfg["dim"], cfg["blocks"], cfg["refinement_blocks"], cfg["heads"], cfg["ffn_expansion"]) == (
        48, (4, 6, 6, 8), 4, (1, 2, 4, 8), 2.66)


def test_unknown_names_and_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown expert 'unet'"):
        create_expert("unet")
    with pytest.raises(ValueError, match="unknown preset 'huge' for expert 'nafnet'"):
        create_expert("nafnet", "huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        create_expert("restormer", "tiny", heads=(1, 1, 1, 5))


def test_overrides_replace_preset_kwargs() -> None:
    wide = create_expert("nafnet", "tiny", width=16)
    assert wide.intro.out_channels == 16
    assert n_params(wide) > n_params(create_expert("nafnet", "tiny"))


@pytest.mark.parametrize("name,preset", CASES)
@pytest.mark.parametrize("size", [(37, 53), (8, 8), (5, 3)])
def test_shape_preserved_for_any_size(name: str, preset: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    expert = create_expert(name, preset).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = expert(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,preset", CASES)
def test_an_untrained_expert_is_the_identity(name: str, preset: str) -> None:
    """Residual experts start as the identity (zero output conv): training improves on the input."""
    x = torch.rand(2, 3, 24, 20)
    with torch.no_grad():
        assert torch.equal(create_expert(name, preset)(x), x)


@pytest.mark.parametrize("name,preset", CASES)
def test_gradient_reaches_every_parameter(name: str, preset: str) -> None:
    torch.manual_seed(0)
    expert = create_expert(name, preset)
    for name_, p in expert.named_parameters():  # zero-init gains and output convs would block the gradients
        if name_.endswith(("beta", "gamma")) or name_.startswith(("ending.", "output.")):
            torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, 3, 24, 20)
    (expert(x) - x.flip(-1)).abs().mean().backward()
    missing = [n for n, p in expert.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:5]


@pytest.mark.parametrize("name,preset", CASES)
def test_eval_is_deterministic_and_residual(name: str, preset: str) -> None:
    torch.manual_seed(0)
    expert = create_expert(name, preset).eval()
    x = torch.rand(1, 3, 33, 17)
    with torch.no_grad():
        assert torch.equal(expert(x), expert(x))
        # the output conv sees only the padded/cropped features: zeroing it must return the input exactly
        last = expert.output if name == "restormer" else expert.ending
        torch.nn.init.zeros_(last.weight)
        if last.bias is not None:
            torch.nn.init.zeros_(last.bias)
        assert torch.equal(expert(x), x)


# ---------------------------------------------------------------- LoRA


def perturb_lora(expert: torch.nn.Module, seed: int = 1) -> None:
    """Stand-in for training: give every LoRA weight a nonzero value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_lora_freezes_base_and_starts_equal(name: str) -> None:
    torch.manual_seed(0)
    base = create_expert(name, "tiny").eval()
    for p in base.parameters():  # a trained base, not the identity an untrained expert is
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(1, 3, 19, 23)
    with torch.no_grad():
        ref = base(x)
    lora = add_lora(copy.deepcopy(base)).eval()
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in base.modules())
    assert sum(isinstance(m, LoRAConv2d) for m in lora.modules()) == n_convs
    with torch.no_grad():
        assert torch.equal(lora(x), ref)  # B = 0 at init
    lora.train()
    (lora(x) - x).abs().mean().backward()
    assert all(p.grad is None for n, p in lora.named_parameters() if not n.endswith((".lora_A", ".lora_B")))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_merged_lora_equals_unmerged(name: str) -> None:
    torch.manual_seed(0)
    lora = add_lora(create_expert(name, "tiny")).eval()
    perturb_lora(lora)
    x = torch.rand(2, 3, 21, 30)
    with torch.no_grad():
        unmerged = lora(x)
        plain = create_expert(name, "tiny").eval()
        plain.load_state_dict(plain_state_dict(lora))
        merged = merge_lora(lora)
        assert not any(isinstance(m, LoRAConv2d) for m in merged.modules())
        assert not torch.allclose(unmerged, x, atol=1e-3)  # the perturbation changed the output
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(EXPERTS))
def test_lora_state_dict_holds_only_lora_and_is_small(name: str) -> None:
    lora = add_lora(create_expert(name, "paper"))  # the ratio that matters is the paper's
    state = lora_state_dict(lora)
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert set(state) == {n for n, p in lora.named_parameters() if p.requires_grad}
    base = sum(v.numel() for k, v in lora.state_dict().items() if k not in state)
    ratio = sum(v.numel() for v in state.values()) / base
    assert 0.01 < ratio < 0.08, ratio  # measured: restormer 6.0%, nafnet 5.8%


def test_lora_state_round_trip_and_mismatch_error() -> None:
    torch.manual_seed(0)
    base = create_expert("nafnet", "tiny")
    trained = add_lora(copy.deepcopy(base)).eval()
    perturb_lora(trained)
    fresh = add_lora(copy.deepcopy(base)).eval()
    load_lora_state_dict(fresh, lora_state_dict(trained))
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    other = add_lora(create_expert("restormer", "tiny"))
    with pytest.raises(ValueError, match="LoRA state does not match"):
        load_lora_state_dict(other, lora_state_dict(trained))
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora_state_dict(base)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(trained)


@pytest.mark.parametrize("mode", ["copy", "lora"])
@pytest.mark.parametrize("parent_has_lora", [False, True])
def test_child_from_parent_starts_identical(mode: str, parent_has_lora: bool) -> None:
    torch.manual_seed(0)
    root = create_expert("restormer", "tiny")
    parent = add_lora(root, rank=4, alpha=8) if parent_has_lora else root
    if parent_has_lora:
        perturb_lora(parent)
    parent.eval()
    child = init_child_from_parent(create_expert("restormer", "tiny"), parent, mode).eval()
    x = torch.rand(1, 3, 20, 28)
    with torch.no_grad():
        assert torch.allclose(child(x), parent(x), atol=1e-6)
    trainable = {n for n, p in child.named_parameters() if p.requires_grad}
    if mode == "copy":
        assert trainable == {n for n, _ in child.named_parameters()}
    else:
        assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
        ranks = {m.rank for m in child.modules() if isinstance(m, LoRAConv2d)}
        assert ranks == ({4} if parent_has_lora else {8})
    # the child's weights are its own: training it leaves the parent untouched
    with torch.no_grad():
        before = parent(x)
        next(p for p in child.parameters() if p.requires_grad).add_(1.0)
        assert torch.equal(parent(x), before)
    with pytest.raises(ValueError, match="mode must be"):
        init_child_from_parent(create_expert("restormer", "tiny"), parent, "share")  # type: ignore[arg-type]
