"""The calibration bank (model/calibration.py): its vote, its file beside a bundle, and `measure`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from unirestorer.model.bundle_schema import BundleError
from unirestorer.model.calibration import (CEILING_QUANTILE, FLOOR_QUANTILE, HARM_SHARE, HELPED_CEILING_FACTOR, K,
                                           PROMOTE_GAIN_DB, PROMOTE_HARM_SHARE, Calibration, bright_ceiling, dark_floor,
                                           measure)
from unirestorer.model.tree import deepest_level
from unirestorer.model.unirestorer import CALIBRATION, CONFIG, UniRestorer, save_calibration

LEAF_PATHS = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 2, 6]])


def bank(points: list[tuple[list[float], int, list[float], int]]) -> Calibration:
    """(embedding, leaf index, path PSNRs, copies) per cluster of identical samples."""
    e = torch.tensor([p for p, _, _, n in points for _ in range(n)])
    paths = torch.stack([LEAF_PATHS[leaf] for _, leaf, _, n in points for _ in range(n)])
    psnr = torch.tensor([s for _, _, s, n in points for _ in range(n)])
    return Calibration(e, paths, psnr, LEAF_PATHS)


def test_a_node_keeps_what_its_neighbours_gained_through_and_refuses_what_it_harmed() -> None:
    cal = bank([([0.0, 0.0], 0, [20.0, 23.0, 26.0], 30),  # leaf 3 gains over node 1, node 1 over the root
                ([10.0, 0.0], 2, [20.0, 24.0, 21.0], 30),  # leaf 5 loses 3 dB to node 2, stays above the root
                ([0.0, 10.0], 3, [20.0, 15.0, 25.0], 30),  # node 2 loses 5 dB to the root, leaf 6 gains 5 over it
                ([10.0, 10.0], 1, [20.0, 15.0, 18.0], 30)])  # node 1 loses 5 dB to the root, leaf 4 loses 2
    v = cal.check(torch.tensor([[0.1, 0.0], [10.0, 0.1], [0.0, 9.9], [10.0, 9.9]]), LEAF_PATHS[[0, 2, 3, 1]])
    assert v.depth.tolist() == [2, 1, 2, 0]  # a refused node does not bar a child that gains over its kept ancestor
    assert v.refused.tolist() == [-1, 5, -1, 4]
    assert v.members.tolist() == [30, 30, 30, 30]  # at the leaf, each measured against the node kept before it
    assert v.gain.tolist() == [3.0, -3.0, 5.0, -2.0]
    assert v.harmed.tolist() == [0, 0, 0, 30]  # harm is a loss against the root too: leaf 5 harmed no one


def test_a_node_that_loses_to_its_parent_only_where_the_parent_restored_well_is_kept() -> None:
    """The seed-1 demo's low-light leaf: against the type it loses on the milder images, which the type had
    already restored, and gains far more on the darker ones. Those neighbours stay above the root (the input):
    the leaf harms none of them, and its mean gain keeps it."""
    cal = bank([([0.0, 0.0], 0, [8.0, 20.0, 12.0], 12),  # the type restored these; the leaf less well
                ([0.0, 0.0], 0, [8.0, 10.0, 22.0], 18)])  # the type barely did; the leaf did
    v = cal.check(torch.zeros(1, 2), LEAF_PATHS[[0]])
    assert v.depth.item() == 2 and v.harmed.item() == 0
    assert v.gain.item() == pytest.approx((12 * -8.0 + 18 * 12.0) / 30)


def test_the_bank_judges_down_to_the_cap_the_other_checks_set() -> None:
    cal = bank([([0.0, 0.0], 0, [20.0, 23.0, 26.0], 30), ([0.0, 10.0], 3, [20.0, 15.0, 25.0], 30)])
    e, paths = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 10.0], [0.0, 10.0]]), LEAF_PATHS[[0, 0, 3, 3]]
    v = cal.check(e, paths, torch.tensor([1, 0, 1, 0]))
    assert v.depth.tolist() == [1, 0, 0, 0]
    assert v.refused.tolist() == [-1, -1, 2, -1]  # node 2 refused at cap 1; at cap 0 nothing is asked of the bank
    assert v.gain.tolist() == [3.0, 0.0, -5.0, 0.0] and v.members.tolist() == [30, 0, 30, 0]


def test_a_level_the_support_bars_is_never_kept_and_the_node_below_it_is_judged_against_the_one_above() -> None:
    """A type node's outer shell bars its own expert only (DegradationTree.supported_levels): the vote skips it."""
    cal = bank([([0.0, 0.0], 0, [20.0, 23.0, 21.0], 30),  # node 1 +3 over the root, leaf 3 -2 under node 1
                ([0.0, 10.0], 3, [20.0, 23.0, 19.0], 30)])  # node 2 +3, leaf 6 -4 under it, -1 under the root
    e, paths = torch.tensor([[0.0, 0.0], [0.0, 10.0]]), LEAF_PATHS[[0, 3]]
    assert cal.check(e, paths).depth.tolist() == [1, 1]
    shell = torch.tensor([[True, False, True]] * 2)
    v = cal.check(e, paths, allowed=shell)
    assert v.depth.tolist() == [2, 0] and v.refused.tolist() == [-1, 6]
    assert v.gain.tolist() == [1.0, -1.0] and v.harmed.tolist() == [0, 30]  # over the root, the node kept
    assert cal.promote(e, paths, torch.tensor([2, 2]), shell).depth.tolist() == [2, 0]


def test_too_few_neighbours_through_a_node_is_no_evidence_for_it() -> None:
    cal = bank([([0.0, 0.0], 0, [20.0, 23.0, 26.0], K - 2), ([0.5, 0.0], 1, [20.0, 23.0, 26.0], 2)])
    v = cal.check(torch.zeros(1, 2), LEAF_PATHS[[1]])  # leaf 4: only 2 of the 30 nearest went through it
    assert (v.depth.item(), v.refused.item(), v.members.item()) == (1, 4, 2)


@pytest.mark.parametrize("harmed, depth", [(round(HARM_SHARE * K), 2), (round(HARM_SHARE * K) + 1, 1)])
def test_the_harm_share_is_the_line(harmed: int, depth: int) -> None:
    """A node that gains on average may still harm up to a third of its neighbours, not one more."""
    cal = bank([([0.0, 0.0], 0, [20.0, 23.0, 19.0], harmed), ([0.0, 0.0], 0, [20.0, 23.0, 30.0], K - harmed)])
    v = cal.check(torch.zeros(1, 2), LEAF_PATHS[[0]])
    assert v.depth.item() == depth
    assert v.gain.item() >= 0


@pytest.mark.parametrize("gain, harmed, depth", [(PROMOTE_GAIN_DB + 0.01, round(PROMOTE_HARM_SHARE * K), 2),
                                                 (PROMOTE_GAIN_DB - 0.1, 0, 0),
                                                 (PROMOTE_GAIN_DB + 0.01, round(PROMOTE_HARM_SHARE * K) + 1, 0)])
def test_promotion_takes_only_clear_gains_with_almost_no_harm(gain: float, harmed: int, depth: int) -> None:
    """The bar past the router: a mean gain of at least 1 dB, at most a tenth of the neighbours harmed. The type
    gains nothing here, so the leaf is measured against the root."""
    good = K - harmed
    lift = (gain * K + 1.0 * harmed) / good  # the unharmed gain this much, the harmed lose 1 dB: mean = gain
    cal = bank([([0.0, 0.0], 0, [20.0, 20.0, 19.0], harmed), ([0.0, 0.0], 0, [20.0, 20.0, 20.0 + lift], good)])
    v = cal.promote(torch.zeros(1, 2), LEAF_PATHS[[0]], torch.tensor([2]))
    assert v.depth.item() == depth
    assert v.gain.item() == pytest.approx(gain) and v.harmed.item() == harmed
    assert cal.check(torch.zeros(1, 2), LEAF_PATHS[[0]], torch.tensor([2]), min_gain=gain + 0.01).depth.item() == 0


def test_a_one_node_tree_has_nothing_to_fall_back_from() -> None:
    root = torch.zeros(1, 1, dtype=torch.long)
    cal = Calibration(torch.zeros(4, 2), root.repeat(4, 1), torch.full((4, 1), 30.0), root)
    v = cal.check(torch.ones(3, 2), root.repeat(3, 1))
    assert v.depth.tolist() == [0, 0, 0] and v.refused.tolist() == [-1, -1, -1]


def test_a_path_the_tree_does_not_have_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sample 1's path \[0, 2, 3\] is not a root-to-leaf path"):
        Calibration(torch.zeros(2, 2), torch.tensor([[0, 1, 3], [0, 2, 3]]), torch.zeros(2, 3), LEAF_PATHS)


def test_the_dark_floor_is_the_airlight_haze_adds_to_every_pixel() -> None:
    g = torch.Generator().manual_seed(0)
    clear = torch.rand(1, 3, 40, 40, generator=g) * 0.8 + 0.2
    clear[..., :20, :20] = 0.0  # a shadow over a quarter of the photo
    t, airlight = 0.6, 0.9
    hazy = clear * t + airlight * (1 - t)  # I = J t + A (1 - t)
    specks = hazy.clone()
    specks[..., 30, 30:33] = 0.0  # three black pixels: their 7x7 windows cover 63 of 1600, under 5 %
    floors = dark_floor(torch.cat([clear, hazy, specks, torch.full((1, 3, 40, 40), 0.3)]))
    assert floors[0] == 0.0
    torch.testing.assert_close(floors[1:], torch.tensor([airlight * (1 - t)] * 2 + [0.3]))


def floor_bank() -> Calibration:
    """Node 1 restored 40 samples with floors 0.20-0.59 and 10 with floor 0 that its leaf 3 then harmed; leaf 4
    restored only 2; node 2 and leaf 5 restored 20 with floor 0.5."""
    paths = LEAF_PATHS[[0] * 50 + [1] * 2 + [2] * 20]
    psnr = torch.tensor([[20.0, 25.0, 30.0]] * 40 + [[20.0, 25.0, 20.0]] * 10 + [[20.0, 25.0, 30.0]] * 22)
    floors = torch.cat([0.2 + 0.01 * torch.arange(40.0), torch.zeros(10), torch.full((2,), 0.3), torch.full((20,), 0.5)])
    return Calibration(torch.zeros(len(paths), 2), paths, psnr, LEAF_PATHS, floors=floors)


def test_a_node_takes_only_images_whose_floor_reaches_that_of_the_samples_it_did_not_harm() -> None:
    cal = floor_bank()
    # node 1 kept its 52 samples (10 of floor 0: its minimum is 0); leaf 3 harmed those 10, so they do not count
    expected = [-torch.inf, 0.0, 0.5, 0.2 + 0.01 * 39 * FLOOR_QUANTILE, -torch.inf, 0.5, -torch.inf]
    torch.testing.assert_close(cal.floor_min, torch.tensor(expected))  # root, leaf 4 (2 < min_members), leaf 6: none
    depth, outside, by_ceiling = cal.light_depth(torch.tensor([0.5, 0.1, 0.6, 0.4, 0.0]), torch.zeros(5),
                                                 LEAF_PATHS[[0, 0, 1, 2, 2]])  # no ceilings in this bank: any passes
    assert depth.tolist() == [2, 1, 2, 0, 0] and outside.tolist() == [-1, 3, -1, 2, 2] and not by_ceiling.any()
    no_floors = Calibration(cal.embeddings, cal.paths, cal.psnr, LEAF_PATHS)
    assert no_floors.light_depth(torch.zeros(2), torch.zeros(2), LEAF_PATHS[[0, 2]])[0].tolist() == [2, 2]


def test_the_brightness_ceiling_is_what_low_light_dims() -> None:
    g = torch.Generator().manual_seed(0)
    photo = torch.rand(1, 3, 40, 40, generator=g)
    lamp = photo * 0.2
    lamp[..., 30, 30:33] = 1.0  # three white pixels: 3 of 1600, under 5 %
    red = torch.zeros(1, 3, 40, 40)
    red[:, 0] = 1.0
    ceilings = bright_ceiling(torch.cat([photo, photo * 0.2, lamp, red]))
    torch.testing.assert_close(ceilings[1], ceilings[0] * 0.2)  # dimmed 5x: 5x lower
    assert abs(float(ceilings[2] - ceilings[1])) < 1e-3  # the lamp moves it by three ranks, not to white
    torch.testing.assert_close(ceilings[3], torch.tensor(0.299))  # luminance, BT.601 weights
    luma = (photo * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten()
    assert float((luma <= ceilings[0]).float().mean()) == pytest.approx(0.95, abs=1 / 1600)


def test_a_node_takes_only_images_whose_highlights_reach_those_of_the_samples_it_did_not_harm() -> None:
    floors_only = floor_bank()
    ceilings = torch.cat([0.4 + 0.01 * torch.arange(40.0), torch.full((10,), 0.05), torch.full((22,), 0.3)])
    cal = Calibration(floors_only.embeddings, floors_only.paths, floors_only.psnr, LEAF_PATHS,
                      floors=floors_only.floors, ceilings=ceilings)
    # node 1: 52 samples kept, 10 of them dim (0.05); leaf 3 harmed those 10; node 2 and leaf 5: 0.3
    expected = [-torch.inf, 0.05, 0.3, 0.4 + 0.01 * 39 * CEILING_QUANTILE, -torch.inf, 0.3, -torch.inf]
    torch.testing.assert_close(cal.ceiling_min, torch.tensor(expected))
    floors = torch.tensor([0.5, 0.5, 0.5, 0.1, 0.5])
    depth, outside, by_ceiling = cal.light_depth(floors, torch.tensor([0.9, 0.2, 0.04, 0.2, 0.2]),
                                                 LEAF_PATHS[[0, 0, 0, 2, 2]])
    # a dim image stops above leaf 3, a dimmer one above node 1; where both refuse at one node, the floor says so
    assert depth.tolist() == [2, 1, 0, 0, 0] and outside.tolist() == [-1, 3, 1, 2, 2]
    assert by_ceiling.tolist() == [False, True, True, False, True]


def test_a_node_that_brightened_only_dim_images_takes_no_image_with_bright_highlights() -> None:
    """The converse of the ceiling minimum, for low light: node 1 and leaf 3 helped 30 dim samples (ceilings
    0.05-0.195); leaf 5 helped 30 bright ones (0.9), node 2 helped none of them (+0.2 dB)."""
    paths = LEAF_PATHS[[0] * 30 + [2] * 30]
    psnr = torch.tensor([[10.0, 20.0, 30.0]] * 30 + [[20.0, 20.2, 25.0]] * 30)
    ceilings = torch.cat([0.05 + 0.005 * torch.arange(30.0), torch.full((30,), 0.9)])
    cal = Calibration(torch.zeros(60, 2), paths, psnr, LEAF_PATHS, ceilings=ceilings)
    dim = HELPED_CEILING_FACTOR * (0.05 + 0.005 * 29 * (1 - CEILING_QUANTILE))
    expected = [torch.inf, dim, torch.inf, dim, torch.inf, HELPED_CEILING_FACTOR * 0.9, torch.inf]
    torch.testing.assert_close(cal.ceiling_max, torch.tensor(expected))  # node 2: helped none; leaves 4, 6: no samples
    depth, outside, by_ceiling = cal.light_depth(torch.zeros(4), torch.tensor([0.3, 0.5, 1.0, 1.0]),
                                                 LEAF_PATHS[[0, 0, 0, 2]])
    # a dim image a little brighter than all of them still goes down to leaf 3; one with a stop more light does
    # not reach node 1; the bright one goes down to leaf 5, which brightened nothing
    assert depth.tolist() == [2, 0, 0, 2] and outside.tolist() == [-1, 1, 1, -1]
    assert by_ceiling.tolist() == [False, True, True, False]


def tree_images() -> torch.Tensor:
    """The images the tiny bundle's tree was fitted on (conftest.build_tiny_unirestorer): inside its support."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(12, 3, 24, 24, generator=g) * 0.6 + 0.2
    return torch.cat([(base + torch.randn(base.shape, generator=g) * 0.2).clamp(0, 1), base * 0.2])


def harming_bank(model: UniRestorer) -> Calibration:
    """The tree's own images, each losing 3 dB at level 1 against the root."""
    e = model.embed(tree_images())
    paths = model.tree.path(e)
    return Calibration(e, paths, torch.tensor([[30.0, 27.0, 28.0]]).repeat(len(e), 1), model.tree.leaf_paths())


def copied(tiny_bundle: str, tmp_path) -> tuple:
    """A copy of the tiny bundle to calibrate, its model, and the images its tree was fitted on."""
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    return folder, UniRestorer.load_bundle(folder), tree_images()


def test_a_calibrated_bundle_round_trips_and_falls_back_where_the_bank_says(tiny_bundle, tmp_path) -> None:
    folder, model, x = copied(tiny_bundle, tmp_path)
    before = model.route(x)
    assert int(before.level.max()) > 0  # the tiny router picks deeper levels for some images
    save_calibration(folder, harming_bank(model))
    loaded = UniRestorer.load_bundle(folder)
    assert torch.equal(loaded.calibration.paths, harming_bank(model).paths)
    route = loaded.route(x)
    assert route.level.tolist() == [0] * len(x) and route.node.tolist() == [0] * len(x)
    _, info = loaded.restore(x)
    deeper = [i for i, lvl in enumerate(before.level.tolist()) if lvl > 0]
    for i in deeper:  # the bank holds 24 samples, fewer than k: all of them vote
        assert "of the 24 calibration samples nearest to it, " in info[i]["fallback"]
        # the node of the router's level, against the root: level 1 lost 3 dB, the leaves 2
        loss = {1: "-3.00", 2: "-2.00"}[int(before.level[i])]
        assert f"gained {loss} dB on average over node 0" in info[i]["fallback"]
    # routes for a named task keep the router's level: the user named the degradation
    assert torch.equal(loaded.route(x, "noise").level, model.route(x, "noise").level)


def allowed_levels(model: UniRestorer, e: torch.Tensor, route) -> torch.Tensor:
    """[B, n_levels] the levels the support allows, less the node the exposure guard barred (the tiny bundle's
    untrained experts move the exposure by about 0.08, more than EXPOSURE_SHIFT)."""
    allowed = model.tree.supported_levels(e, model.router.leaf_paths[route.leaf])
    for i in (route.exposure_node >= 0).nonzero().squeeze(1).tolist():
        allowed[i, model.tree.level_of(int(route.exposure_node[i]))] = False
    return allowed


def test_clear_gains_take_an_image_past_the_router_and_the_support(tiny_bundle, tmp_path) -> None:
    """Clear gains (5 dB a level) take every image as deep as the levels open to evidence and the clean check
    allow, past the router and past the support, and the exposure guard yields to them (the tiny bundle's
    untrained experts move the exposure by about 0.08); weak gains (0.8 dB in all) promote nothing."""
    folder, model, x = copied(tiny_bundle, tmp_path)
    e = model.embed(x)
    paths = model.tree.path(e)

    def routed(psnr: list[float]) -> tuple[UniRestorer, object]:
        save_calibration(folder, Calibration(e, paths, torch.tensor([psnr]).repeat(len(e), 1), model.tree.leaf_paths()))
        loaded = UniRestorer.load_bundle(folder)
        return loaded, loaded.route(x)

    loaded, route = routed([20.0, 20.4, 20.8])
    route_paths = loaded.router.leaf_paths[route.leaf]
    allowed = allowed_levels(loaded, e, route)
    hard = deepest_level(allowed, loaded.tree.clean_claim(e, route_paths)[0])
    assert torch.equal(route.level, deepest_level(allowed, torch.minimum(route.router_level, hard)))
    assert (route.promoted == -1).all()
    _, info = loaded.restore(x)
    assert not any("(at least 1)" in i.get("fallback", "") for i in info)

    loaded, route = routed([20.0, 25.0, 30.0])
    route_paths = loaded.router.leaf_paths[route.leaf]
    open_levels = loaded.tree.open_to_evidence(e, route_paths)
    reach = deepest_level(open_levels, loaded.tree.clean_claim(e, route_paths)[0])
    supported = deepest_level(loaded.tree.supported_levels(e, route_paths))
    assert torch.equal(route.level, reach) and (route.exposure_node == -1).all()
    assert bool((route.past_support & (route.level > supported)).any())  # past the support for some images
    held = loaded.tree.supported_levels(e, route_paths).gather(1, route.level[:, None])[:, 0]
    assert torch.equal(route.past_support, (route.promoted >= 0) & ~held)
    _, info = loaded.restore(x)
    for i in (route.promoted >= 0).nonzero().squeeze(1).tolist():  # the bank's 24 samples, fewer than k, all vote
        node, level = int(route.node[i]), int(route.level[i])
        through = int((paths[:, level] == node).sum())
        above = int(deepest_level(open_levels[i : i + 1], torch.tensor([level - 1])))  # a barred type node is skipped
        past = f"the image lies outside the support the tree trusts for node {node}, but " if route.past_support[i] else ""
        assert info[i]["fallback"] == (
            f"router chose level {int(route.router_level[i])}; {past}of the 24 calibration samples nearest to it, "
            f"{through} went through node {node}, which gained {5.0 * (level - above):+.2f} dB on average (at least 1) "
            f"over the node kept above it and harmed 0 of them (> 0.5 dB), so level {level} (node {node}) restores it")
    # a named task keeps the router's level: the user named the degradation
    assert torch.equal(loaded.route(x, "noise").level, model.route(x, "noise").level)


LIGHT = {  # per check: the bank's statistic, its function, the bank's value that refuses every test image, the reason
    "floor": ("floors", dark_floor, 0.95, "its dark channel floor {v:.3f} lies below 0.950, that of all but 5% of the "
                                          "calibration samples node {node} did not harm (haze lifts every pixel"),
    "ceiling": ("ceilings", bright_ceiling, 0.99, "its brightness ceiling {v:.3f} lies below 0.990, that of all but 1% "
                                                  "of the calibration samples node {node} did not harm (low light dims "
                                                  "every pixel"),
    "helped ceiling": ("ceilings", bright_ceiling, 0.01, "its brightness ceiling {v:.3f} lies above 0.020, 2 times "
                                                         "that of all but 1% of the calibration samples node {node} "
                                                         "helped (it brightened dim images only"),
}


@pytest.mark.parametrize("check", sorted(LIGHT))
def test_images_darker_dimmer_or_brighter_than_what_a_node_restored_stop_above_it(check, tiny_bundle, tmp_path) -> None:
    stat, of, refusing, says = LIGHT[check]
    folder, model, x = copied(tiny_bundle, tmp_path)
    e = model.embed(x)
    paths, gaining = model.tree.path(e), torch.tensor([[20.0, 25.0, 30.0]]).repeat(len(e), 1)
    model.calibration = Calibration(e, paths, gaining, model.tree.leaf_paths())
    without = model.route(x).level
    assert int(without.max()) > 0  # the vote keeps some images below the root
    # the bank's samples all had the refusing floor (ceiling), or one that passes every image: 0, or for ceilings
    # 0 and 1 in turn (no minimum, and a maximum that bounds nothing); the other statistic 0
    passing = torch.zeros(len(e)) if stat == "floors" else (torch.arange(len(e)) % 2).float()
    for value in (passing, torch.full((len(e),), refusing)):
        light = {"floors": torch.zeros(len(e)), "ceilings": (torch.arange(len(e)) % 2).float()} | {stat: value}
        save_calibration(folder, Calibration(e, paths, gaining, model.tree.leaf_paths(), **light))
        loaded = UniRestorer.load_bundle(folder)
        assert torch.equal(getattr(loaded.calibration, stat), light[stat])
        assert (loaded.calibration.floor_quantile, loaded.calibration.ceiling_quantile) == (FLOOR_QUANTILE,
                                                                                            CEILING_QUANTILE)
        route = loaded.route(x)
        assert torch.equal(route.level, without if value is passing else torch.zeros_like(without))
    _, info = loaded.restore(x)
    values = of(x)
    assert float(values.max()) < refusing if check != "helped ceiling" else float(values.min()) > 2 * refusing
    held = model.tree.supported_levels(e, model.router.leaf_paths[route.leaf]).gather(1, without[:, None])[:, 0]
    assert bool((held & (without > 0)).any())
    for i in without.nonzero().squeeze(1).tolist():
        node = int(model.router.leaf_paths[int(route.leaf[i])][1])
        if held[i]:  # within the support the light check is what stops the image
            assert info[i]["fallback"].startswith(f"router chose level {int(route.router_level[i])}; "
                                                  + says.format(v=float(values[i]), node=node))
        else:  # only the bank's evidence took it past the support: the text names the light or the support check
            assert (says.format(v=float(values[i]), node=node) in info[i]["fallback"]
                    or "the image lies outside the trusted support of node" in info[i]["fallback"])


def test_save_bundle_keeps_the_bank_and_an_interrupted_recalibration_leaves_a_loadable_bundle(
        tiny_bundle, tmp_path, monkeypatch) -> None:
    import unirestorer.model.unirestorer as unirestorer_module

    model = UniRestorer.load_bundle(tiny_bundle)
    model.calibration = harming_bank(model)
    model.save_bundle(tmp_path / "b")
    loaded = UniRestorer.load_bundle(tmp_path / "b")
    for name in ("embeddings", "paths", "psnr"):
        assert torch.equal(getattr(loaded.calibration, name), getattr(model.calibration, name))

    def crash(*args, **kwargs) -> None:
        raise OSError("disk full")

    smaller = Calibration(*(getattr(model.calibration, n)[:10] for n in ("embeddings", "paths", "psnr")),
                          model.tree.leaf_paths())
    monkeypatch.setattr(unirestorer_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_calibration(tmp_path / "b", smaller)
    assert UniRestorer.load_bundle(tmp_path / "b").calibration is None  # not a bundle that no longer loads


def test_an_unknown_calibration_key_is_refused(tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    save_calibration(folder, harming_bank(UniRestorer.load_bundle(folder)))
    refused(folder, {"radius": 2}, "calibration: unknown key 'radius'")


def test_a_missing_or_damaged_bank_is_refused_naming_the_file(tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    model = UniRestorer.load_bundle(folder)
    save_calibration(folder, harming_bank(model))
    (folder / CALIBRATION).rename(tmp_path / "moved")
    with pytest.raises(BundleError, match=f"calibration is set but {folder / CALIBRATION} is missing"):
        UniRestorer.load_bundle(folder)
    (tmp_path / "moved").rename(folder / CALIBRATION)
    refused(folder, {"samples": 25}, r"calibration.safetensors: tensor 'embeddings' has shape \(24, 16\)")
    refused(folder, {"k": 0}, "calibration: samples, k and min_members must be >= 1")


def refused(folder, change: dict, match: str) -> None:
    """Loading fails with `match` once bundle.json's calibration entry takes `change`; the entry is then restored."""
    original = (folder / CONFIG).read_text()
    config = json.loads(original)
    (folder / CONFIG).write_text(json.dumps(config | {"calibration": {**config["calibration"], **change}}))
    with pytest.raises(BundleError, match=match):
        UniRestorer.load_bundle(folder)
    (folder / CONFIG).write_text(original)


def test_a_bank_whose_floors_or_ceilings_do_not_match_its_entry_is_refused(tiny_bundle, tmp_path) -> None:
    folder = tmp_path / "b"
    shutil.copytree(tiny_bundle, folder)
    model = UniRestorer.load_bundle(folder)
    bank = harming_bank(model)
    save_calibration(folder, bank)  # no floors, no ceilings
    refused(folder, {"floor_quantile": 0.05}, "calibration.safetensors: tensor 'floors' is missing")
    save_calibration(folder, Calibration(bank.embeddings, bank.paths, bank.psnr, model.tree.leaf_paths(),
                                         floors=torch.zeros(len(bank))))
    refused(folder, {"floor_quantile": 0.7}, r"floor_quantile 0.7 .*in \[0, 0.5\)")
    refused(folder, {"ceiling_quantile": 0.01}, "calibration.safetensors: tensor 'ceilings' is missing")
    save_calibration(folder, Calibration(bank.embeddings, bank.paths, bank.psnr, model.tree.leaf_paths(),
                                         floors=torch.zeros(len(bank)), ceilings=torch.ones(len(bank))))
    refused(folder, {"ceiling_quantile": 0.5}, r"ceiling_quantile 0.5 in \[0, 0.5\)")
    UniRestorer.load_bundle(folder)  # restored: loads


def test_measure_records_every_path_experts_psnr(tiny_bundle) -> None:
    model = UniRestorer.load_bundle(tiny_bundle)
    torch.manual_seed(2)
    gt = torch.rand(5, 3, 24, 24)
    lq = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    seen = []
    cal = measure(model, [{"lq": lq[:3], "gt": gt[:3]}, {"lq": lq[3:], "gt": gt[3:]}], 4,
                  model.tree.leaf_paths(), on_batch=seen.append)
    assert seen == [3, 1] and len(cal) == 4
    paths = model.tree.path(model.embed(lq[:4]))
    assert torch.equal(cal.paths, paths)
    torch.testing.assert_close(cal.psnr, model.level_psnr(lq[:4], gt[:4], paths).clamp(max=50))
    torch.testing.assert_close(cal.floors, dark_floor(lq[:4]))
    torch.testing.assert_close(cal.ceilings, bright_ceiling(lq[:4]))
