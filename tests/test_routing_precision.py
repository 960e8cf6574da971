"""Routing runs in fp32 whatever the autocast state (bf16 picks other tree nodes): tree paths and extractor
embeddings under CPU bf16 autocast equal the fp32 ones, and a bf16-cast extractor is refused."""

import functools

import pytest
import torch

from unirestorer.model.extractor import DegradationExtractor
from unirestorer.model.kmeans import sq_dists
from unirestorer.model.tree import DegradationTree


@functools.cache
def crowded_tree() -> tuple[DegradationTree, torch.Tensor]:
    """Many leaves among dense points: nearest and second-nearest centroids lie close, as in a real tree."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1500, 64, generator=g) + 3.0
    return DegradationTree.fit(x, k=[1, 4, 16], seed=0), torch.randn(600, 64, generator=g) + 3.0


def test_tree_path_ignores_bf16_autocast():
    tree, queries = crowded_tree()
    reference = tree.path(queries)
    with torch.autocast("cpu", torch.bfloat16):
        leaves = tree.centroids[tree.leaf_ids]
        naive = sq_dists(queries - 3.0, (queries - 3.0).pow(2).sum(1), leaves - 3.0).argmin(1)
        routed = tree.path(queries)
    assert torch.equal(routed, reference)
    # the case is sensitive: the same expansion under autocast (bf16 matmul) picks other leaves
    exact = sq_dists(queries - 3.0, (queries - 3.0).pow(2).sum(1), leaves - 3.0).argmin(1)
    assert (naive != exact).any()
    assert torch.equal(tree.path(queries, check=False), reference)


def test_unchecked_path_gives_valid_ids_for_non_finite_rows():
    tree, queries = crowded_tree()
    queries = queries.clone()
    queries[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        tree.path(queries)
    paths = tree.path(queries, check=False)
    assert paths.shape == (600, 3) and int(paths.min()) >= 0 and int(paths.max()) < tree.n_nodes


def test_extractor_embed_ignores_bf16_autocast_and_refuses_bf16_weights():
    torch.manual_seed(0)
    model = DegradationExtractor(backbone="test_resnet", embed_dim=32, proj_dim=16, crop=32, max_crops=4).eval()
    images = torch.rand(2, 3, 48, 64)
    reference = model.embed(images)
    with torch.autocast("cpu", torch.bfloat16):
        assert model(images).embedding.dtype == torch.bfloat16  # autocast is on for the plain forward
        embedded = model.embed(images)
    assert embedded.dtype == torch.float32 and torch.equal(embedded, reference)
    with pytest.raises(ValueError, match=r"weights are torch.bfloat16: routing needs them in fp32"):
        model.bfloat16().embed(images)


def test_bf16_restore_and_eval_keep_the_fp32_route(tiny_bundle, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from unirestorer.cli import main

    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(src / f"{i}.png")
    routes, images = {}, {}
    for mode in ("fp32", "bf16"):
        args = ["restore", "--weights", tiny_bundle, "--input", str(src), "--output", str(tmp_path / mode),
                "--tile", "0", "--device", "cpu", "--explain"] + (["--bf16"] if mode == "bf16" else [])
        assert main(args) == 0
        printed = capsys.readouterr()
        routes[mode] = sorted(line for line in (printed.out + printed.err).splitlines() if line[:5] in ("0.png", "1.png"))
        images[mode] = np.stack([np.asarray(Image.open(tmp_path / mode / f"{i}.png"), dtype=int) for i in range(2)])
    assert len(routes["fp32"]) == 2 and routes["bf16"] == routes["fp32"]  # same level, node, probabilities
    diff = np.abs(images["bf16"] - images["fp32"])
    assert diff.any() and diff.max() <= 8  # the experts did run in bf16, close to fp32
    out = tmp_path / "eval"
    assert main(["eval", "--weights", tiny_bundle, "--clean", str(src), "--synth", "noise:25", "--device", "cpu",
                 "--bf16", "--json", "--out", str(out), "--classical", "nlmeans", "--grid", "0"]) == 0
    assert "(experts in bf16)" in capsys.readouterr().out and json.loads((out / "results.json").read_text())["bf16"]
