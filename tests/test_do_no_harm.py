"""Do no harm, on a tiny model trained here in seconds: clean and noisy photo crops, a tree over their
embeddings, every expert trained on its node's images, the router on the frozen experts with the margin
level target. A clean image comes back nearly unchanged; an image of a family the tree never saw falls
back to a coarser expert than the in-distribution images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import TINY_EXPERT, TINY_EXTRACTOR
from unirestorer.model.experts import create_expert
from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.router import Router, image_psnr
from unirestorer.model.tree import TRUSTED_FRACTION, DegradationTree
from unirestorer.model.unirestorer import UniRestorer, dispatch

pytestmark = pytest.mark.usefixtures("one_thread")
CROP = 32
PHOTOS = ("astronaut", "coffee", "rocket", "chelsea")


def photo_crops(names: tuple[str, ...], per_photo: int, seed: int) -> torch.Tensor:
    """Random CROP-px crops of scikit-image's bundled photos, [N, 3, CROP, CROP] in [0, 1]."""
    import skimage.data

    rng = np.random.default_rng(seed)
    out = []
    for name in names:
        img = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 255
        for _ in range(per_photo):
            y, x = rng.integers(0, img.shape[0] - CROP), rng.integers(0, img.shape[1] - CROP)
            out.append(torch.from_numpy(img[y : y + CROP, x : x + CROP]).permute(2, 0, 1))
    return torch.stack(out)


def noisy(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + torch.randn(x.shape, generator=g) * 25 / 255).clamp(0, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[UniRestorer, torch.Tensor]:
    """(the trained model, reloaded from its bundle; the root's PSNR on clean test crops before training)"""
    torch.manual_seed(0)
    gt = photo_crops(PHOTOS, 8, seed=0)
    lq = torch.cat([gt, noisy(gt, 1)])
    gt = torch.cat([gt, gt])
    tasks = ["clean"] * (len(lq) // 2) + ["noise"] * (len(lq) // 2)
    extractor = DegradationExtractor(**TINY_EXTRACTOR).eval()
    with torch.no_grad():
        e = extractor.embed(lq)
    tree = DegradationTree.fit(e, [1, 2, 4], tasks=tasks, seed=0)
    paths = tree.path(e)
    experts = {n: create_expert(**TINY_EXPERT) for n in range(tree.n_nodes)}
    with torch.no_grad():  # a fresh tiny NAFNet is close to identity: start far from it, so training must learn it
        for expert in experts.values():
            for p in expert.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    clean_test = photo_crops(PHOTOS, 3, seed=5)
    untrained = image_psnr(dispatch(clean_test, torch.zeros(len(clean_test), dtype=torch.long), experts), clean_test)
    for node, expert in experts.items():  # each expert on its node's images, the PSNR loss, as the stage trains
        members = (paths == node).any(1).nonzero().squeeze(1)
        opt = torch.optim.Adam(expert.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(node)
        for _ in range(30):
            idx = members[torch.randint(len(members), (8,), generator=g)]
            loss = -image_psnr(expert(lq[idx]), gt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        expert.eval()
    router = Router.from_tree(tree, leaf_ce_weight=1.0, level_ce_weight=1.0, level_margin_db=0.3)
    model = UniRestorer(extractor, tree, router, experts, expert_specs={n: TINY_EXPERT for n in experts})
    opt = torch.optim.Adam(router.parameters(), lr=3e-3)
    for step in range(20):
        model.train()
        idx = torch.randperm(len(lq), generator=torch.Generator().manual_seed(step))[:16]
        loss, _ = model.router_loss(lq[idx], gt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("trained")
    model.eval().save_bundle(path)
    return UniRestorer.load_bundle(path), untrained


def test_a_clean_image_comes_back_nearly_unchanged(trained: tuple[UniRestorer, torch.Tensor]) -> None:
    model, untrained = trained
    clean = photo_crops(PHOTOS, 3, seed=5)  # crops trained on by nothing
    out, routes = model.restore(clean)
    psnr = image_psnr(out, clean)
    assert untrained.max() < 30.0 < 33.0 < psnr.min(), (untrained.tolist(), psnr.tolist(), routes)


def test_an_unseen_family_falls_back_to_a_coarser_level(trained: tuple[UniRestorer, torch.Tensor]) -> None:
    """Low light (the image at 15 % exposure) is in neither the training data nor the tree; clean and noisy
    crops (σ 25) are."""
    trained = copy.deepcopy(trained[0])
    with torch.no_grad():  # a router that prefers the leaves (seconds of training make the root win everything):
        trained.router.g_g.bias[: trained.tree.n_levels] = torch.tensor([-4.0, -4.0, 4.0])  # the support check decides
    x = photo_crops(PHOTOS, 3, seed=7)
    seen = torch.cat([x, noisy(x, 8)])
    dark = x * 0.15
    seen_levels = torch.tensor([r["level"] for r in trained.restore(seen)[1]], dtype=torch.float)
    unseen = trained.restore(dark)[1]
    unseen_levels = torch.tensor([r["level"] for r in unseen], dtype=torch.float)
    assert unseen_levels.mean() < seen_levels.mean(), (seen_levels.tolist(), unseen_levels.tolist())
    assert all(r["support"][1] > TRUSTED_FRACTION for r in unseen if r["level"] == 0 and r["router_level"] > 0)
    with torch.no_grad():  # the fallback is what the root does: exactly its output
        root = dispatch(dark, torch.zeros(len(dark), dtype=torch.long), trained._pool())
    fell = [i for i, r in enumerate(unseen) if r["level"] == 0]
    assert fell and torch.allclose(trained.restore(dark)[0][fell], root[fell], atol=1e-6)
