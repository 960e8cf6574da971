"""Assembled UniRestorer: restore, instruction mode, router loss, bundle round trip."""

import json

import pytest
import torch
from torch import nn

from unirestorer.model.bundle_schema import BundleError
from unirestorer.model.calibration import Calibration
from unirestorer.model.experts import create_expert
from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.lora import init_child_from_parent
from unirestorer.model.router import Router, image_psnr, task_subtrees
from unirestorer.model.tree import TRUSTED_FRACTION, DegradationTree
from unirestorer.model.fallback import EXPOSURE_SHIFT, GUARD_SIDE
from unirestorer.model.unirestorer import UniRestorer, dispatch

SPEC = {"name": "nafnet", "preset": "tiny"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class PoolExtractor(nn.Module):
    """Stand-in extractor: per-channel mean and std → linear embedding (the API `embed` is all we need)."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.config = {"dim": dim}
        self.proj = nn.Linear(6, dim)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1))


def images(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Two 'tasks' the stand-in can see: dark images and noisy images."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 16, 16, generator=g) * 0.2 + 0.4
    dark = base * 0.2
    noisy = (base + torch.randn(base.shape, generator=g) * 0.3).clamp(0, 1)
    return torch.cat([dark, noisy]), ["dark"] * n + ["noise"] * n


def build(seed: int = 0, lora_leaf: bool = False) -> UniRestorer:
    torch.manual_seed(seed)
    extractor = PoolExtractor().eval()
    x, tasks = images(40, seed)
    with torch.no_grad():
        tree = DegradationTree.fit(extractor.embed(x), [1, 2, 4], tasks=tasks, seed=seed,
                                   intensities=[None] * 40 + [i / 40 for i in range(40)])  # dark: unknown
    experts = {n: create_expert(**SPEC) for n in range(tree.n_nodes)}
    for expert in experts.values():  # tiny NAFNet starts near identity; perturb so experts differ
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    if lora_leaf:  # leaf 3 as a LoRA on the root with a non-zero update: the bundle stores only its LoRA
        experts[3] = init_child_from_parent(create_expert(**SPEC), experts[0], mode="lora")
        with torch.no_grad():
            for name, p in experts[3].named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    router = Router.from_tree(tree)
    with torch.no_grad():  # spread routing over levels and leaves; BatchNorm statistics of the data
        router.g_d.weight.normal_(0, 1.0)
        router.g_g.weight.normal_(0, 1.0)
        for bn in (router.h_d[-1], router.h_g[-1]):
            bn.momentum = None  # cumulative average: one pass gives the exact statistics
        router.train().route(extractor.embed(x))
    specs = {n: SPEC for n in experts}
    return UniRestorer(extractor, tree, router, experts, expert_specs=specs).eval()


def test_restore_uses_exactly_the_routed_expert():
    model = build()
    x, _ = images(4, seed=5)
    y, routes = model.restore(x)
    assert y.shape == x.shape and len(routes) == len(x)
    for i, r in enumerate(routes):
        with torch.no_grad():
            ref = model.expert(r["node"])(x[i : i + 1])[0]
        assert torch.allclose(y[i], ref, atol=1e-5)
        assert r["node"] == model.tree.leaf_paths()[r["leaf"] - model.tree.level_starts[-1], r["level"]]
        assert r["composition"] == model.tree.composition(r["node"])
        assert len(r["top_leaves"]) == 3 and sum(r["p_level"]) == pytest.approx(1.0, abs=1e-5)
    y1, r1 = model.restore(x[2])
    assert y1.shape == x[2].shape and r1["node"] == routes[2]["node"]
    assert len({r["node"] for r in routes}) > 1  # the test exercises more than one expert
    with pytest.raises(ValueError, match=r"got shape \(1, 16, 16\)"):
        model.restore(x[0, :1])


def test_gated_forward_equals_restore_and_trains_only_the_router():
    model = build()
    x, _ = images(4, seed=6)
    model.tree.radii = None  # the support check is restore's alone; the router trains on its own choice
    y_restore, _ = model.restore(x)
    y, route = model(x)
    assert torch.equal(y, y_restore)
    model.train()
    assert model.router.training and not model.extractor.training
    assert not any(m.training for m in model.experts.modules())
    gt = torch.rand_like(x)
    total, parts = model.router_loss(x, gt)
    assert set(parts) == {"l1", "dg", "aux"} and torch.isfinite(total)
    total.backward()
    assert model.router.g_d.weight.grad.abs().sum() > 0 and model.router.h_g[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.experts.parameters())
    assert all(p.grad is None for p in model.extractor.parameters())


def test_level_supervision_uses_the_frozen_experts():
    model = build()
    model.router = Router.from_tree(model.tree, level_ce_weight=1.0, leaf_ce_weight=1.0)
    x, _ = images(1, seed=7)
    gt = x.clamp(0, 1)
    paths = model.tree.path(model.embed(x))
    psnr = model.level_psnr(x, gt, paths)
    for i in range(len(x)):
        for l in range(3):
            with torch.no_grad():
                mse = (model.expert(int(paths[i, l]))(x[i : i + 1]) - gt[i : i + 1]).pow(2).mean()
            assert psnr[i, l].item() == pytest.approx(-10 * torch.log10(mse).item(), abs=1e-4)
    model.train()
    _, parts = model.router_loss(x, gt)
    assert {"leaf_ce", "level_ce"} <= set(parts)


def test_instruction_mode_through_restore():
    model = build()
    x, _ = images(4, seed=8)
    subtree = task_subtrees(model.tree)
    for t, name in enumerate(model.tree.task_names):
        assert subtree[t].any()  # both tasks own a level-1 node here
        _, routes = model.restore(x, task=name)
        for r in routes:  # the leaf and the expert both lie in the task's subtree (or the expert is the root)
            assert subtree[t, r["leaf"]]
            assert r["node"] == 0 or subtree[t, r["node"]]


class Shift(nn.Module):
    """A stand-in expert whose error on an image is known: x + shift."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


def routed_minus_oracle(model: UniRestorer, x: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean PSNR of the best expert on each image's path minus that of the routed one."""
    model.eval()
    with torch.no_grad():
        e = model.embed(x)
        routed = dispatch(x, model.router.route(e).node, model._pool())
        oracle = model.level_psnr(x, gt, model.tree.path(e)).max(1).values
    return float((oracle - image_psnr(routed, gt)).mean())


def test_router_supervision_narrows_the_gap_to_the_oracle():
    """Dark images are restored best by the root, noisy ones by their leaf (experts x+0.1 / x / x-0.1 per
    level). The paper's loss only asks whether a brighter output would help; supervision from the
    experts' measured errors learns which level restores best."""
    x, _ = images(16, seed=3)
    gt = torch.cat([x[:16] + 0.1, x[16:] - 0.1])
    gaps = {}
    for mode, weight in (("paper", 0.0), ("supervised", 1.0)):
        model = build()
        model.experts = nn.ModuleDict({str(n): Shift((0.1, 0.0, -0.1)[model.tree.level_of(n)])
                                       for n in range(model.tree.n_nodes)})
        torch.manual_seed(0)
        model.router = Router.from_tree(model.tree, leaf_ce_weight=weight, level_ce_weight=weight)
        opt = torch.optim.Adam(model.router.parameters(), lr=1e-2)
        for _ in range(60):
            model.train()
            loss, _ = model.router_loss(x, gt)
            opt.zero_grad()
            loss.backward()
            opt.step()
        gaps[mode] = routed_minus_oracle(model, x, gt)
    assert gaps["supervised"] < 0.1 < gaps["paper"], gaps  # dB


def test_bundle_round_trip_gives_identical_outputs(tmp_path):
    model = build(lora_leaf=True)
    x, _ = images(4, seed=9)
    before, routes = model.restore(x)
    model.save_bundle(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.json", "weights.safetensors"]
    config = json.loads((tmp_path / "bundle.json").read_text())
    assert config["experts"]["3"] == {**SPEC, "lora": {"rank": 8, "alpha": 16, "base": 0}}
    assert config["experts"]["2"] == SPEC and config["router"]["n_leaves"] == 4
    back = UniRestorer.load_bundle(tmp_path, build_extractor=PoolExtractor)
    after, routes_back = back.restore(x)
    assert torch.allclose(after, before, atol=1e-6) and routes_back == routes
    assert torch.equal(back.tree.centroids, model.tree.centroids)
    assert config["tree"]["intensity_ranges"][0] == [None, [0.0, 39 / 40]]  # [node][task]: dark unknown, noise
    assert torch.equal(back.tree.intensity_ranges.nan_to_num(-1), model.tree.intensity_ranges.nan_to_num(-1))
    # the LoRA leaf came back as the root + its LoRA
    assert torch.equal(back.expert(3).state_dict()["intro.lora_B"], model.expert(3).state_dict()["intro.lora_B"])
    probe = x[:1]
    with torch.no_grad():
        assert torch.allclose(back.expert(3)(probe), model.expert(3)(probe), atol=1e-5)
    config["tree"]["intensity_ranges"][1][1] = [0.5]  # a range is [min, max]
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"tree\.intensity_ranges: .* is not a valid"):
        UniRestorer.load_bundle(tmp_path, build_extractor=PoolExtractor)
    del config["tree"]["intensity_ranges"]  # a bundle from before them: loads, restores the same, no range known
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    old = UniRestorer.load_bundle(tmp_path, build_extractor=PoolExtractor)
    assert old.tree.intensity_ranges is None and old.tree.intensity_range(0, "noise") is None
    assert torch.allclose(old.restore(x)[0], before, atol=1e-6)


def test_bundle_errors(tmp_path):
    model = build()
    with pytest.raises(FileNotFoundError, match="bundle file missing"):
        UniRestorer.load_bundle(tmp_path, build_extractor=PoolExtractor)
    model.save_bundle(tmp_path)
    config = json.loads((tmp_path / "bundle.json").read_text())
    config["experts"]["2"] = {"name": "nafnet", "preset": "tiny", "width": 16}
    (tmp_path / "bundle.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'experts\.2\.\S+' has shape .* the model expects"):
        UniRestorer.load_bundle(tmp_path, build_extractor=PoolExtractor)
    unnamed = UniRestorer(model.extractor, model.tree, model.router, dict(model._pool()))
    with pytest.raises(ValueError, match=r"needs expert_specs .* node\(s\) \[0, 1, 2"):
        unnamed.save_bundle(tmp_path / "other")
    with pytest.raises(ValueError, match=r"no expert for tree node\(s\) \[6\]"):
        UniRestorer(model.extractor, model.tree, model.router, {n: model.expert(n) for n in range(6)})


def test_dispatch_keeps_batch_order_and_gradients():
    experts = {0: lambda t: t * 2, 5: lambda t: t + 1}
    x = torch.arange(4.0).view(4, 1).requires_grad_()
    y = dispatch(x, torch.tensor([5, 0, 5, 0]), experts)
    assert y.squeeze(1).tolist() == [1.0, 2.0, 3.0, 6.0]
    y.sum().backward()
    assert x.grad.squeeze(1).tolist() == [1.0, 2.0, 1.0, 2.0]


def test_bundle_with_the_real_extractor_and_default_builders(tmp_path):
    torch.manual_seed(0)
    extractor = DegradationExtractor(embed_dim=16, proj_dim=8, crop=16, max_crops=2).eval()
    x, tasks = images(6, seed=10)
    tree = DegradationTree.fit(extractor.embed(x), [1, 2, 3], tasks=tasks)
    experts = {n: create_expert(**SPEC) for n in range(tree.n_nodes)}
    model = UniRestorer(extractor, tree, Router.from_tree(tree), experts, expert_specs={n: SPEC for n in experts})
    before, routes = model.eval().restore(x)
    model.save_bundle(tmp_path)
    after, routes_back = UniRestorer.load_bundle(tmp_path).restore(x)
    assert torch.equal(after, before) and routes_back == routes


def test_support_check_falls_back_to_the_deepest_node_that_holds_the_image():
    """An embedding inside every node on its path keeps the router's level; one outside its leaf's radius but
    inside its level-1 node's goes to level 1; one far from all the training data goes to the root. With a
    task given (instruction mode) the router's level stands."""
    model = build()
    tree = model.tree
    x, _ = images(40, seed=0)  # the embeddings the tree was fitted on
    e = model.embed(x)
    paths = tree.path(e)
    d = tree.distances(e, paths)
    assert torch.equal(tree.radii, tree.support_radii(e))
    for node in range(1, tree.n_nodes):  # each radius is the 99th percentile of its members' distances
        members = d[paths[:, tree.level_of(node)] == node, tree.level_of(node)]
        assert tree.radii[node].item() == pytest.approx(members.quantile(0.99).item(), rel=1e-5)
    assert (d <= tree.radii[paths]).all(1).float().mean() > 0.9  # nearly all lie in their whole path's support
    assert [tree.trusted_fraction(n) for n in range(tree.n_nodes)] == [1.0] + [TRUSTED_FRACTION] * 2 + [1.0] * 4
    inside = (d <= tree.trusted_radii()[paths]).all(1)  # a type node's trusted core, the whole support below it
    assert tree.supported_depth(e, paths)[inside].tolist() == [2] * int(inside.sum())
    beyond = tree.beyond(e, paths)
    type_radius = tree.radii[paths[:, 1]]
    shell = (d[:, 1] > TRUSTED_FRACTION * type_radius) & (d[:, 1] <= type_radius) & ~beyond[:, 1]
    leaf_holds = (d[:, 2] <= tree.radii[paths[:, 2]]) | beyond[:, 2]
    depth = tree.supported_depth(e, paths)
    assert (shell & leaf_holds).any() and (depth[shell & leaf_holds] == 2).all()  # a type's outer shell: its leaves
    assert (shell & ~leaf_holds).any() and (depth[shell & ~leaf_holds] == 0).all()  # but never the type itself

    model.router.g_g.bias.data[:] = torch.tensor([-5.0, -5.0, 5.0, 0.0, 0.0, 0.0])  # the router always picks leaves
    leaf_of = model.router.leaf_paths
    far = model.restore_route(torch.full((1, 3, 16, 16), 0.97))  # bright and flat: like nothing in training
    assert far["router_level"] == 2 and far["level"] == 0 and far["node"] == 0
    assert "fallback" in far and "outside the trusted support of node" in far["fallback"]
    assert f"trusted within {TRUSTED_FRACTION}x" in far["fallback"]
    assert far["support"][1] > 1.0
    own = model.router.route(e).leaf + tree.level_starts[-1] == paths[:, -1]  # the router picked its own leaf
    i = int((own & (tree.supported_depth(e, paths) == 2)).nonzero()[0])  # held by every node on its path
    near = model.restore_route(x[i : i + 1])
    assert near["router_level"] == near["level"] == 2 and "fallback" not in near
    assert near["node"] == int(leaf_of[near["leaf"] - tree.level_starts[-1], 2])
    told = model.restore_route(torch.full((1, 3, 16, 16), 0.97), task="dark")
    assert told["level"] == told["router_level"] == 2

    centre = tree.centroids[paths[0, 1]]  # level-1 centroid: inside level 1, outside the leaf when radii shrink
    tree.radii = tree.radii.clone()
    tree.radii[tree.level_starts[2]:] = 1e-6
    depth = tree.supported_depth(centre[None], paths[:1])
    assert depth.tolist() == [1]


def own_leaf_router(model: UniRestorer) -> None:
    """Make the router pick each image's own leaf at the leaf level, as a trained one would."""
    tree, router_route = model.tree, model.router.route
    model.router.g_g.bias.data[:] = torch.tensor([-5.0, -5.0, 5.0, 0.0, 0.0, 0.0])  # the router always picks leaves

    def own_leaf(e: torch.Tensor, task=None):
        route = router_route(e, task)
        route.leaf = tree.path(e)[:, -1] - tree.level_starts[-1]
        return route

    model.router.route = own_leaf


def test_clear_evidence_takes_an_image_past_the_support_but_not_into_a_types_outer_shell():
    """No leaf's support holds the images here. The calibration bank's clear gains (promotion's bar) take them to
    their leaf all the same, and `--explain` says so; weak gains leave them where the support stops them. A type
    node's own outer shell stays barred whatever its neighbours gained. Past the support the exposure guard
    runs: a leaf that brightens the image is barred."""
    model = build()
    tree = model.tree
    own_leaf_router(model)
    for n in range(tree.n_nodes):
        model.experts[str(n)] = Shift(0.0)
    x, _ = images(40, seed=0)
    e = model.embed(x)
    paths = tree.path(e)
    tree.radii = tree.radii.clone()
    tree.radii[tree.level_starts[2]:] = 1e-6  # no leaf holds any image
    core = (tree.supported_levels(e, paths)[:, 1]).tolist()  # the type's trusted core holds these
    d, radius = tree.distances(e, paths)[:, 1], tree.radii[paths[:, 1]]
    shell = ((d > TRUSTED_FRACTION * radius) & (d <= radius) & ~tree.beyond(e, paths)[:, 1]).tolist()
    assert any(core) and any(shell)
    capped = [1 if c else 0 for c in core]
    assert model.route(x).level.tolist() == capped  # no bank: the support decides

    def banked(psnr: list[float]) -> torch.Tensor:
        model.calibration = Calibration(e, paths, torch.tensor([psnr]).repeat(len(e), 1), tree.leaf_paths())
        return model.route(x)

    route = banked([20.0, 25.0, 30.0])  # +5 dB a level, no one harmed
    assert route.level.tolist() == [2] * len(x) and torch.equal(route.node, paths[:, 2])
    assert route.past_support.all() and torch.equal(route.promoted, paths[:, 2])
    info = model.restore(x[:1])[1][0]
    near = torch.cdist(e[:1], e).topk(30, largest=False).indices[0]
    through = int((paths[near, 2] == paths[0, 2]).sum())
    assert info["fallback"] == (
        f"router chose level 2; the image lies outside the support the tree trusts for node {int(paths[0, 2])}, but "
        f"of the 30 calibration samples nearest to it, {through} went through node {int(paths[0, 2])}, which gained {5.0 * (2 - capped[0]):+.2f} dB on average (at least 1) over the node "
        f"kept above it and harmed 0 of them (> 0.5 dB), so level 2 (node {int(paths[0, 2])}) restores it")
    assert banked([20.0, 20.4, 20.8]).level.tolist() == capped  # 0.8 dB in all: not clear
    # the type +5 dB, its leaves back at the root: its core keeps the type, and so does the evidence past its
    # support, but not its outer shell
    assert banked([20.0, 25.0, 20.0]).level.tolist() == [0 if s else 1 for s in shell]
    i = shell.index(True)
    model.experts[str(int(paths[i, 2]))] = Shift(0.2)  # brightens, but the bank vouches for it: the guard yields
    route = banked([20.0, 25.0, 30.0])
    assert int(route.level[i]) == 2 and int(route.exposure_node[i]) == -1


def test_a_leaf_in_its_types_outer_shell_runs_only_where_it_keeps_the_exposure():
    """The exposure guard: in a type's outer shell a leaf may restore the image only if its expert moves the mean
    luminance by at most EXPOSURE_SHIFT (measured on the image shrunk to GUARD_SIDE); else the image falls back,
    here to the root, since the shell bars the type's own expert. In the trusted core, or with a task named, the
    guard does not run."""
    model = build()
    tree = model.tree
    own_leaf_router(model)
    for n in range(tree.n_nodes):
        model.experts[str(n)] = Shift(0.0)  # keeps the exposure: the guard lets it run
    x, _ = images(40, seed=0)
    e = model.embed(x)
    route = model.route(x)
    paths = model.router.leaf_paths[route.leaf]
    shell = tree.in_shell(e, paths)[:, 2] & (route.level == 2)
    core = ~tree.in_shell(e, paths)[:, 2] & (route.level == 2)
    assert torch.equal(route.shell, tree.in_shell(e, paths).gather(1, route.level[:, None]).squeeze(1))
    assert shell.any() and core.any() and (route.exposure_node == -1).all()
    i, j = int(shell.nonzero()[0]), int(core.nonzero()[0])
    leaf = int(route.node[i])
    model.experts[str(leaf)] = Shift(0.2)  # brightens everything it restores
    model.experts[str(int(route.node[j]))] = Shift(0.2)
    guarded = model.route(x)
    assert int(guarded.level[i]) == 0 and int(guarded.exposure_node[i]) == leaf
    assert float(guarded.exposure_shift[i]) == pytest.approx(float((x[i] + 0.2).clamp(0, 1).mul(
        torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0).mean() - x[i].mul(
        torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0).mean()), abs=1e-5)
    assert float(guarded.exposure_shift[i]) > EXPOSURE_SHIFT
    assert int(guarded.level[j]) == 2  # the trusted core: not guarded
    _, info = model.restore(x[i : i + 1])
    assert info[0]["level"] == 0 and info[0]["fallback"].startswith(
        f"router chose level 2; node {leaf} lies in a type's outer shell for it, where a dark photo and low light "
        f"look alike, and its expert would move the image's mean luminance by ")
    assert int(model.route(x[i : i + 1], task=tree.task_names[0]).level[0]) == 2  # the user named the degradation
    paths = tree.path(e)  # the guard yields to the bank's clear evidence (promotion's bar), not to a weak vote
    for leaf_psnr, level in ((30.0, 2), (20.5, 0)):  # the type is barred in its shell: the leaf against the root
        model.calibration = Calibration(e, paths, torch.tensor([[20.0, 25.0, leaf_psnr]]).repeat(len(e), 1),
                                        tree.leaf_paths())
        assert int(model.route(x[i : i + 1]).level[0]) == level
    model.calibration = None
    big = x[i : i + 1].repeat(1, 1, 2 * GUARD_SIDE // 16, 2 * GUARD_SIDE // 16)  # the same statistics, 512 px a side
    assert bool(tree.in_shell(model.embed(big), paths[i : i + 1])[0, 2])
    assert int(model.route(big).level[0]) == 0


def test_an_image_a_clean_leaf_holds_falls_back_from_another_familys_leaf():
    """The stand-in's dark images play the clean task: a router forced to a noise leaf is overruled for the
    images a clean leaf's support holds (their level falls to the deepest node both paths share, and the
    explanation says why); the noisy images keep the noise leaf; a named task keeps the router's level."""
    model = build()
    tree = model.tree
    tree.task_names[tree.task_names.index("dark")] = "clean"
    leaves = tree.leaf_ids.tolist()
    clean_leaves = tree.clean_leaves().tolist()
    noise_leaf = next(n for n in leaves if tree.dominant_task()[n] == tree.task_names.index("noise"))
    assert clean_leaves and set(clean_leaves) | {n for n in leaves if n not in clean_leaves} == set(leaves)
    with torch.no_grad():  # every image to that noise leaf, at the leaf level
        model.router.g_d.bias.data[:] = -20.0
        model.router.g_d.bias.data[noise_leaf - tree.level_starts[-1]] = 20.0
        model.router.g_g.bias.data[:] = torch.tensor([-20.0, -20.0, 20.0, 0.0, 0.0, 0.0])
    tree.radii = tree.radii.clone()
    tree.radii[tree.ancestors(noise_leaf)[1:] + [noise_leaf]] = 1e3  # the noise path holds everything: only
    x, tasks = images(40, seed=0)  # the clean check can send an image back
    e = model.embed(x)
    routes = model.restore(x)[1]
    fell = kept = 0
    for r, emb, task in zip(routes, e, tasks):
        assert r["router_level"] == 2 and r["path"][2] == noise_leaf
        held = [c for c in clean_leaves if (emb - tree.centroids[c]).norm() <= tree.radii[c]]
        if held:
            shared = max(sum(a == b for a, b in zip(tree.ancestors(c) + [c], r["path"])) for c in held) - 1
            assert r["level"] == shared < 2 and r["node"] == r["path"][shared], r
            assert "inside the training support of clean node" in r["fallback"], r
            fell += task == "dark"
        else:
            assert r["level"] == 2 and "fallback" not in r, r
            kept += task == "noise"
    assert fell >= 35 and kept >= 35, (fell, kept)
    told = model.restore(x[:40], task="noise")[1]
    assert all(r["level"] == 2 for r in told)
