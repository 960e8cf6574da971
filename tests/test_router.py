"""Router: selection rule, instruction masks, zero-init gates, gradient paths, noise, losses."""

import pytest
import torch
from torch import nn

from unirestorer.model.router import (
    Router, best_level, cv_squared, dg_loss, gate, image_psnr, instruction_masks, select,
)
from unirestorer.model.tree import DegradationTree

# Tree [1, 2, 4]: node 1 → leaves 3, 4; node 2 → leaves 5, 6.
LEAF_PATHS = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]])


def hand_tree(dim: int = 4) -> DegradationTree:
    """Tasks: node 1 mostly noise, but its leaf 4 is mostly rain; node 2 and its leaves rain; one haze sample."""
    task_counts = torch.tensor([
        [50, 61, 1],  # root
        [30, 10, 0],  # node 1: noise
        [20, 51, 1],  # node 2: rain
        [28, 2, 0],  # leaf 3: noise
        [2, 8, 0],  # leaf 4: rain
        [10, 30, 1],  # leaf 5: rain
        [10, 21, 0],  # leaf 6: rain
    ])
    return DegradationTree(torch.randn(7, dim), [-1, 0, 0, 1, 1, 2, 2], [1, 2, 4],
                           task_counts.sum(1).tolist(), ["haze", "noise", "rain"], task_counts[:, [2, 0, 1]])


def test_selection_rule_on_hand_made_probabilities():
    p_leaf = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1]])
    p_level = torch.tensor([[0.2, 0.3, 0.5], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    r = select(p_leaf.log(), p_level.log(), LEAF_PATHS)
    assert r.leaf.tolist() == [1, 3, 0]
    assert r.level.tolist() == [2, 0, 1]
    assert r.node.tolist() == [4, 0, 1]  # leaf 4; root; parent of leaf 3
    assert torch.allclose(r.g, torch.tensor([0.6 + 0.5, 0.7 + 0.5, 0.4 + 0.6]))
    assert torch.allclose(r.p_leaf, p_leaf) and torch.allclose(r.p_level, p_level)


def test_masks_restrict_leaf_and_level_of_the_chosen_path():
    p_leaf = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    p_level = torch.tensor([[0.2, 0.5, 0.3]])
    leaf_mask = torch.tensor([[True, False, True, True]])
    node_mask = torch.tensor([[True, False, True, True, False, True, True]])  # node 1 forbidden
    r = select(p_leaf.log(), p_level.log(), LEAF_PATHS, leaf_mask, node_mask)
    assert r.leaf.tolist() == [2]  # best allowed leaf, path 0-2-5
    assert r.level.tolist() == [1] and r.node.tolist() == [2]  # node 2 is allowed
    assert torch.allclose(r.p_leaf, torch.tensor([[0.25, 0.0, 0.5, 0.25]]))
    # leaf 0 (path 0-1-3): level 1 would be node 1, which is masked, so the level falls to the leaf
    r = select(torch.tensor([[0.7, 0.1, 0.1, 0.1]]).log(), p_level.log(), LEAF_PATHS, None, node_mask)
    assert r.node.tolist() == [3] and r.level.tolist() == [2]
    assert torch.allclose(r.p_level, torch.tensor([[0.4, 0.0, 0.6]]))


def test_instruction_masks_are_the_subtrees_of_the_tasks_level1_nodes():
    tree = hand_tree()
    leaf_mask, node_mask = instruction_masks(tree)
    haze, noise, rain = 0, 1, 2
    # noise dominates node 1: all of node 1's subtree, leaf 4 included although rain dominates that leaf
    assert leaf_mask[noise].tolist() == [True, True, False, False]
    assert node_mask[noise].tolist() == [True, True, False, True, True, False, False]
    assert leaf_mask[rain].tolist() == [False, False, True, True]
    assert node_mask[rain].tolist() == [True, False, True, False, False, True, True]
    # haze dominates no level-1 node: it takes node 2, which holds its one sample
    assert leaf_mask[haze].tolist() == leaf_mask[rain].tolist() and node_mask[haze].tolist() == node_mask[rain].tolist()
    # a task the tree never saw: any leaf, but only the root expert
    unseen = DegradationTree(tree.centroids, tree.parents.tolist(), tree.level_sizes, tree.counts.tolist(),
                             tree.task_names + ["snow"], torch.cat([tree.task_counts, torch.zeros(7, 1, dtype=torch.long)], 1))
    leaf_mask, node_mask = instruction_masks(unseen)
    assert leaf_mask[3].all() and node_mask[3].tolist() == [True] + [False] * 6


def test_instruction_mode_routes_into_the_task_subtree():
    tree = hand_tree()
    router = Router.from_tree(tree).eval()
    e = torch.randn(6, 4)
    with torch.no_grad():  # favour leaf 3 (noise) and level 1: instruction "rain" must override both
        router.g_d.bias[:4] = torch.tensor([5.0, 0.0, 0.0, 0.0])
        router.g_g.bias[:3] = torch.tensor([0.0, 5.0, 1.0])
    free = router.route(e)
    assert free.node.tolist() == [1] * 6
    rain = router.route(e, "rain")  # leaves 5 and 6 only; the favoured level 1 is rain's node 2
    assert rain.node.tolist() == [2] * 6 and rain.leaf.ge(2).all()
    with torch.no_grad():  # favour the leaf level: the chosen leaf is then inside the subtree
        router.g_g.bias[:3] = torch.tensor([0.0, 1.0, 5.0])
        router.g_d.bias[:4] = torch.tensor([5.0, 0.0, 1.0, 0.0])
    assert router.route(e, "rain").node.tolist() == [5] * 6
    assert router.route(e, "haze").node.tolist() == [5] * 6
    mixed = router.route(e, ["rain", None, "haze", "noise", None, "rain"])
    assert mixed.node.tolist() == [5, 3, 5, 3, 3, 5]
    assert router.route(e, torch.tensor([2, -1, 0, 1, -1, 2])).node.tolist() == mixed.node.tolist()
    with pytest.raises(ValueError, match="3 tasks for a batch of 6"):
        router.route(e, ["rain"] * 3)
    with pytest.raises(ValueError, match=r"task indices must be in -1..2"):
        router.route(e, torch.full((6,), 3))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['snow'\]"):
        router.route(e, "snow")


def test_zero_initialised_gates_give_uniform_probabilities():
    router = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7).eval()
    r = router.route(torch.randn(5, 8))
    assert torch.allclose(r.p_leaf, torch.full((5, 4), 0.25))
    assert torch.allclose(r.p_level, torch.full((5, 3), 1 / 3))
    assert torch.allclose(r.g, torch.full((5,), 0.25 + 1 / 3))


def test_noise_only_in_training():
    router = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7)
    e = torch.randn(16, 8)
    router.train()
    a, b = router.route(e), router.route(e)
    assert not torch.allclose(a.p_leaf, b.p_leaf)
    assert not torch.allclose(a.p_leaf, torch.full_like(a.p_leaf, 0.25))
    router.eval()
    c, d = router.route(e), router.route(e)
    assert torch.equal(c.p_leaf, d.p_leaf) and torch.equal(c.p_level, d.p_level)
    quiet = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7, noisy=False).train()
    assert torch.allclose(quiet.route(e).p_leaf, torch.full((16, 4), 0.25))


def test_gradients_reach_gates_only_through_g_and_never_the_experts():
    torch.manual_seed(0)
    router = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7).train()
    router.leaf_paths.copy_(LEAF_PATHS)
    experts = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(7)]
    x, gt = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    r = router.route(torch.randn(4, 8))
    with torch.no_grad():
        out = torch.cat([experts[n](x[i : i + 1]) for i, n in enumerate(r.node.tolist())])
    y = gate(out, r.g)
    assert torch.equal(y, out)  # the value is exactly the expert's output
    r.g.retain_grad()
    (y - gt).abs().mean().backward()
    assert all(p.grad is None for e in experts for p in e.parameters())
    for lin in (router.g_d, router.g_g):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    # dL/dg_i = <dL/dy_i, out_i> / g_i: the loss reaches the router through g and nothing else
    dl_dy = torch.sign(out - gt) / out.numel()
    assert torch.allclose(r.g.grad, (dl_dy * out).flatten(1).sum(1) / r.g.detach(), atol=1e-7)
    # without the gate nothing differentiable is left: the argmax choice itself carries no gradient
    assert not (out - gt).abs().mean().requires_grad and r.node.grad_fn is None


def test_losses_match_formulas():
    e_d, e_g, u = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 2.0]])
    expected = (0.5 * 4 + 0.0 + 0.0 + 0.5 * 2) / 2
    assert dg_loss(e_d, e_g, u).item() == pytest.approx(expected)
    assert cv_squared(torch.full((4, 3), 1 / 3).sum(0)).item() == pytest.approx(0.0)
    assert cv_squared(torch.tensor([2.0, 0.0])).item() == pytest.approx(2.0)  # var 2, mean^2 1



def test_level_target_is_the_coarsest_level_within_the_margin_of_the_best() -> None:
    psnr = torch.tensor([[30.0, 30.0, 29.0],   # tie: the coarser
                         [25.0, 28.0, 31.0],   # the leaf by far
                         [27.8, 27.9, 28.0],   # root within 0.3 dB of the best
                         [20.0, 27.8, 28.0],   # level 1 within 0.3 dB, the root not
                         [28.0, 27.0, 26.0]])  # the root is best
    assert best_level(psnr).tolist() == [0, 2, 2, 2, 0]
    assert best_level(psnr, margin_db=0.3).tolist() == [0, 2, 0, 1, 0]
    assert best_level(psnr, margin_db=100.0).tolist() == [0] * 5  # any margin this wide: always the root
    assert image_psnr(torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), 0.6)).tolist() == pytest.approx([20.0] * 2)


def test_supervision_flags_default_off():
    e, u = torch.randn(6, 8), torch.randn(6, 8)
    plain = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7).train()
    total, parts = plain.loss(plain.route(e), torch.tensor(0.5), u)
    assert set(parts) == {"l1", "dg", "aux"}
    assert total.item() == pytest.approx(0.5 + 0.1 * parts["dg"].item() + 0.01 * parts["aux"].item(), rel=1e-5)
    sup = Router(dim=8, n_leaves=4, n_levels=3, n_nodes=7, leaf_ce_weight=1.0, level_ce_weight=0.5).train()
    r = sup.route(e)
    with pytest.raises(ValueError, match="needs leaf_target"):
        sup.loss(r, torch.tensor(0.5), u)
    total, parts = sup.loss(r, torch.tensor(0.5), u, torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long))
    assert {"leaf_ce", "level_ce"} <= set(parts)
    total.backward()
    assert sup.g_d.weight.grad.abs().sum() > 0 and sup.h_d[0].weight.grad.abs().sum() > 0


def test_head_shapes_follow_the_paper():
    router = Router(dim=16, n_leaves=19, n_levels=3, n_nodes=27)
    for head in (router.h_d, router.h_g):
        linears = [m for m in head if isinstance(m, nn.Linear)]
        assert len(linears) == 5 and all(m.bias is None for m in linears[:4]) and linears[4].bias is not None
        assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in head) == 4
        assert isinstance(head[-1], nn.BatchNorm1d)
    assert router.g_d.out_features == 38 and router.g_g.out_features == 6
    assert not any("expert" in name for name, _ in router.named_parameters())
