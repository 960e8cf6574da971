"""Degradation tree: planted clusters, determinism, errors, persistence, path consistency."""

import json
import math

import pytest
import torch

from unirestorer.model.kmeans import AutoK, kmeans, silhouette
from unirestorer.model.tree import DegradationTree, _split_total


def adjusted_rand(a: torch.Tensor, b: torch.Tensor) -> float:
    """Adjusted Rand index from the contingency table (Hubert & Arabie)."""
    _, a = a.unique(return_inverse=True)
    _, b = b.unique(return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    comb = lambda t: (t * (t - 1) / 2).sum()  # noqa: E731
    index, rows, cols, total = comb(table), comb(table.sum(1)), comb(table.sum(0)), math.comb(len(a), 2)
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def planted(subclusters=(3, 3, 3), n=60, dim=8, seed=0):
    """Groups far apart, subclusters inside each group: (points, group label, leaf label, task names)."""
    g = torch.Generator().manual_seed(seed)
    xs, groups, leaves = [], [], []
    for gi, k in enumerate(subclusters):
        centre = torch.randn(dim, generator=g) * 60
        for _ in range(k):
            sub = centre + torch.randn(dim, generator=g) * 8
            xs.append(sub + torch.randn(n, dim, generator=g))
            groups += [gi] * n
            leaves += [len(xs) - 1] * n
    tasks = [f"task{gi}" for gi in groups]
    return torch.cat(xs), torch.tensor(groups), torch.tensor(leaves), tasks


def test_adjusted_rand_reference_values():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand(a, torch.tensor([5, 5, 3, 3, 9, 9])) == pytest.approx(1.0)
    # sklearn.metrics.adjusted_rand_score([0,0,0,1,1,1], [0,0,1,1,2,2]) == 0.24242424...
    assert adjusted_rand(torch.tensor([0, 0, 0, 1, 1, 1]), a) == pytest.approx(0.2424242424)


def test_planted_clusters_recovered_with_given_k():
    x, groups, leaves, tasks = planted()
    tree = DegradationTree.fit(x, [1, 3, 9], tasks=tasks, seed=0)
    paths = tree.path(x)
    assert tree.level_sizes == [1, 3, 9]
    assert adjusted_rand(paths[:, 1], groups) >= 0.95
    assert adjusted_rand(paths[:, 2], leaves) >= 0.95


def test_planted_clusters_recovered_with_auto_k():
    x, groups, leaves, tasks = planted(subclusters=(2, 3, 4))
    spec = [1, AutoK(k_min=2, k_max=4), None]  # level 1: its own bounds; level 2: `auto`
    tree = DegradationTree.fit(x, spec, tasks=tasks, auto=AutoK(k_min=2, k_max=6), seed=1)
    paths = tree.path(x)
    assert tree.level_sizes == [1, 3, 9]
    assert adjusted_rand(paths[:, 2], leaves) >= 0.95
    # every leaf is pure in the planted task; group sizes are sorted largest first
    purity = tree.task_counts.max(1).values / tree.counts.clamp_min(1)
    assert bool((purity[tree.leaf_ids] == 1).all())
    assert tree.counts[1:4].tolist() == sorted(tree.counts[1:4].tolist(), reverse=True)


def test_auto_k_does_not_split_one_blob():
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    tree = DegradationTree.fit(x, [1, None], auto=AutoK(min_silhouette=0.5))
    assert tree.level_sizes == [1, 1]
    assert torch.allclose(tree.centroids[1], x.mean(0))


def test_explicit_per_group_k_and_total_split():
    x, _, _, _ = planted()
    tree = DegradationTree.fit(x, [1, 3, [1, 2, 4]])
    assert tree.level_sizes == [1, 3, 7]
    assert tree.parents.tolist() == [-1, 0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert _split_total(7, [100, 50, 10], level=2) == [4, 2, 1]
    assert sum(_split_total(19, [13, 29, 7, 51, 3, 88, 40], level=2)) == 19
    with pytest.raises(ValueError, match="3 k values for 2 parents"):
        DegradationTree.fit(x, [1, 2, [1, 2, 3]])
    with pytest.raises(ValueError, match="level 0 must be exactly 1"):
        DegradationTree.fit(x, [3, 9])
    with pytest.raises(ValueError, match="2 task labels for 540 embeddings"):
        DegradationTree.fit(x, [1, 3], tasks=["a", "b"])


def test_determinism_by_seed():
    x, _, _, tasks = planted(subclusters=(2, 2, 2, 2), dim=4)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 10  # overlapping: init matters
    a = DegradationTree.fit(x, [1, 4, 8], tasks=tasks, seed=7)
    b = DegradationTree.fit(x, [1, 4, 8], tasks=tasks, seed=7)
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.path(x), b.path(x))
    c1, l1, i1 = kmeans(x, 5, seed=3, restarts=1)
    c2, l2, i2 = kmeans(x, 5, seed=3, restarts=1)
    assert torch.equal(c1, c2) and torch.equal(l1, l2) and i1 == i2


def test_restarts_keep_lowest_inertia():
    x, _, _, _ = planted(subclusters=(2, 2, 2, 2), dim=4)
    single = [kmeans(x, 8, seed=s, restarts=1)[2] for s in range(5)]
    assert kmeans(x, 8, seed=0, restarts=5)[2] <= single[0] + 1e-3


def test_errors_are_clear():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="5 points are fewer than the k=7 clusters"):
        DegradationTree.fit(x, [1, 7])
    dup = torch.cat([torch.zeros(6, 3), torch.ones(4, 3)])
    with pytest.raises(ValueError, match="only 2 distinct points among 10 for k=3: duplicate"):
        DegradationTree.fit(dup, [1, 3])
    bad = torch.randn(20, 3)
    bad[2, 1] = float("nan")
    bad[5] = float("inf")
    with pytest.raises(ValueError, match=r"4 non-finite values \(NaN/Inf\) in 2 of 20 rows"):
        DegradationTree.fit(bad, [1, 2])
    tree = DegradationTree.fit(torch.randn(20, 3), [1, 2])
    with pytest.raises(ValueError, match="1 non-finite"):
        tree.path(torch.tensor([[0.0, float("nan"), 0.0]]))
    with pytest.raises(ValueError, match=r"tree expects \[B, 3\]"):
        tree.path(torch.randn(2, 4))
    with pytest.raises(ValueError, match="not a leaf"):
        tree.leaf_index(0)


def test_path_consistency_and_ancestors():
    x, _, _, tasks = planted(subclusters=(2, 3, 2))
    tree = DegradationTree.fit(x, [1, 3, 7], tasks=tasks)
    queries = torch.cat([x, torch.randn(50, x.shape[1]) * 80])
    paths = tree.path(queries)
    assert bool((paths[:, 0] == 0).all())
    for l in range(1, tree.n_levels):
        assert torch.equal(tree.parents[paths[:, l]], paths[:, l - 1])
    # level 1 is the nearest level-1 centroid (the root's children are all of level 1)
    d = torch.cdist(queries, tree.centroids[1:4])
    assert torch.equal(paths[:, 1], d.argmin(1) + 1)
    leaf_paths = tree.leaf_paths()
    for leaf in tree.leaf_ids.tolist():
        row = leaf_paths[tree.leaf_index(leaf)].tolist()
        assert row == tree.ancestors(leaf) + [leaf]
        assert tree.parents[leaf] in row
        assert tree.level_of(leaf) == 2
    # counts and compositions agree with routing every sample
    assert tree.counts[0] == len(x)
    assert torch.equal(tree.task_counts.sum(1), tree.counts)
    for l, start in enumerate(tree.level_starts):
        assert tree.counts[start : start + tree.level_sizes[l]].sum() == len(x)


def test_save_load_round_trip(tmp_path):
    x, _, _, tasks = planted()
    tree = DegradationTree.fit(x, [1, 3, 9], tasks=tasks)
    tree.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.json", "tree.safetensors"]
    back = DegradationTree.load(tmp_path)
    assert torch.equal(back.centroids, tree.centroids)
    assert back.level_sizes == tree.level_sizes and back.task_names == tree.task_names
    assert torch.equal(back.parents, tree.parents) and torch.equal(back.task_counts, tree.task_counts)
    assert torch.equal(back.path(x), tree.path(x))
    assert back.composition(4) == tree.composition(4)
    (tmp_path / "tree.json").write_text('{"level_sizes": [1]}')
    with pytest.raises(ValueError, match="not a valid degradation tree"):
        DegradationTree.load(tmp_path)


def test_intensity_ranges_by_hand():
    # two level-1 nodes, {0, 1} and {10, 11}: task a known everywhere, b only on x=11 and without intensity
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    tree = DegradationTree.fit(x, [1, 2], tasks=["a", "a", "a", "b"], intensities=[0.2, 0.5, 0.9, None])
    low, high = tree.path(x)[[0, 2], 1].tolist()
    assert tree.intensity_range(0, "a") == (0.2, 0.9) and tree.intensity_range(0, "b") is None  # b: unknown
    assert tree.intensity_range(low, "a") == (0.2, 0.5) and tree.intensity_range(low, "b") is None  # b: none here
    assert tree.intensity_range(high, "a") == (0.9, 0.9) and tree.intensity_range(high, "b") is None
    assert tree.intensity_range(0, "c") is None and tree.intensity_ranges.shape == (3, 2, 2)
    assert DegradationTree.fit(x, [1, 2], tasks=["a"] * 4).intensity_ranges is None  # fitted without them


def test_intensity_ranges_match_every_routed_sample():
    x, _, _, tasks = planted(subclusters=(2, 3, 2))
    g = torch.Generator().manual_seed(5)
    degrees = [None if i % 7 == 0 else round(float(v), 4) for i, v in enumerate(torch.rand(len(x), generator=g))]
    tasks[:60], degrees[:60] = ["task3"] * 60, [None] * 60  # a task whose intensity is never known (real pairs)
    tree = DegradationTree.fit(x, [1, 3, 7], tasks=tasks, intensities=degrees)
    paths = tree.path(x).tolist()
    for node in range(tree.n_nodes):
        for task in tree.task_names:
            held = [d for p, t, d in zip(paths, tasks, degrees) if node in p and t == task and d is not None]
            assert tree.intensity_range(node, task) == ((min(held), max(held)) if held else None)
    assert tree.intensity_range(0, "task3") is None and tree.composition(0)["task3"] == 60
    with pytest.raises(ValueError, match="3 intensities for 420 embeddings"):
        DegradationTree.fit(x, [1, 3], tasks=tasks, intensities=[0.1] * 3)
    with pytest.raises(ValueError, match="no task labels to group them by"):
        DegradationTree.fit(x, [1, 3], intensities=degrees)


def test_intensity_ranges_saved_and_optional(tmp_path):
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    tree = DegradationTree.fit(x, [1, 2], tasks=["a", "a", "a", "b"], intensities=[0.2, 0.5, 0.9, None])
    tree.save(tmp_path)
    meta = json.loads((tmp_path / "tree.json").read_text())
    assert meta["intensity_ranges"][0] == [[0.2, 0.9], None]  # JSON null where nothing is known
    back = DegradationTree.load(tmp_path)
    assert torch.equal(back.intensity_ranges.isnan(), tree.intensity_ranges.isnan())
    assert torch.equal(back.intensity_ranges.nan_to_num(-1), tree.intensity_ranges.nan_to_num(-1))
    del meta["intensity_ranges"]  # a tree saved before them still loads, with no range known
    (tmp_path / "tree.json").write_text(json.dumps(meta))
    old = DegradationTree.load(tmp_path)
    assert old.intensity_ranges is None and old.intensity_range(0, "a") is None
    assert "intensity_ranges" not in old.to_state()[0] and old.composition(0) == tree.composition(0)
    meta["intensity_ranges"] = [[[0.1, 0.2]]] * 3  # one task's range where the tree has two
    (tmp_path / "tree.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a valid degradation tree"):
        DegradationTree.load(tmp_path)


def test_silhouette_matches_hand_computation():
    x = torch.tensor([[0.0], [1.0], [10.0], [12.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # point 0: a=1, b=11 → 10/11; point 1: a=1, b=10 → 0.9; point 2: a=2, b=9.5; point 3: a=2, b=11.5
    expected = (10 / 11 + 0.9 + 7.5 / 9.5 + 9.5 / 11.5) / 4
    assert silhouette(x, labels) == pytest.approx(expected, rel=1e-5)


def hand_tree(task_names: list[str]) -> DegradationTree:
    """root 0; level 1: nodes 1, 2; leaves 3, 4 under 1 and 5, 6 under 2. Leaf 4 is mostly clean (when "clean"
    is a task), leaf 5 mostly haze; every radius 1."""
    centroids = torch.tensor([[0.0, 0], [-5, 0], [5, 0], [-6, 1], [-4, -1], [4, 1], [6, -1]])
    counts = torch.zeros(7, len(task_names), dtype=torch.long)
    counts[[3, 4, 5, 6], 0] = torch.tensor([9, 1, 1, 9])  # task 0 dominates leaves 3 and 6
    counts[[4, 5], 1] = torch.tensor([8, 2])  # task 1 ("clean" below) dominates leaf 4
    counts[5, 2] = 9  # task 2 ("haze") dominates leaf 5
    counts[[1, 2]] = counts[[3, 5]] + counts[[4, 6]]
    counts[0] = counts[[1, 2]].sum(0)
    return DegradationTree(centroids, [-1, 0, 0, 1, 1, 2, 2], [1, 2, 4], counts.sum(1).tolist(), task_names, counts,
                           radii=[10.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0])


def test_a_clean_leaf_caps_the_level_at_its_common_ancestor_with_the_path():
    tree = hand_tree(["noise", "clean", "haze"])
    assert tree.clean_leaves().tolist() == [4]
    near_clean = torch.tensor([[-4.3, -0.8], [-4.3, -0.8], [-4.3, -0.8], [6.0, -1.0]])
    paths = torch.tensor([[0, 2, 5], [0, 1, 3], [0, 1, 4], [0, 2, 6]])  # haze leaf, a sibling, its own path, far
    depth, claim = tree.clean_claim(near_clean, paths)
    assert depth.tolist() == [0, 1, 2, 2]  # common ancestor with leaf 4: the root, node 1, itself; far: no cap
    assert claim.tolist() == [4, 4, -1, -1]
    edge = torch.tensor([[-4.0, 0.0], [-4.0, 0.001]])  # exactly on the radius (inside), just beyond it
    assert tree.clean_claim(edge, paths[:2])[0].tolist() == [0, 2]
    no_clean = hand_tree(["noise", "rain", "haze"])  # no clean task: nothing is capped
    assert no_clean.clean_leaves().tolist() == []
    assert no_clean.clean_claim(near_clean, paths)[0].tolist() == [2, 2, 2, 2]
    no_clean.radii = None
    assert no_clean.clean_claim(near_clean, paths)[1].tolist() == [-1] * 4


def test_a_node_holds_what_lies_past_it_as_seen_from_the_clean_leaf():
    """Leaf 6 (6, -1) and its parent 2 (5, 0) seen from the clean leaf 4 (-4, -1): past a node on that ray and
    within its radius of it is the node's degradation, heavier than trained, and held; outside the support on
    the clean side (milder) or off the ray (another family) is not. Without a clean leaf nothing is. A type node
    (level 1) holds by its radius only its trusted core (TRUSTED_FRACTION of it), a leaf all of its radius."""
    tree = hand_tree(["noise", "clean", "haze"])
    points = torch.tensor([[8.0, -1.0],  # on the ray past leaf 6, outside every radius but the root's: held
                           [8.0, 1.5],  # past both, 2.5 off the leaf's ray (radius 1), 1.16 off node 2's (radius 3)
                           [4.0, -0.5],  # short of leaf 6, outside it; in the trusted core of node 2 (0.37 r)
                           [1.0, -1.0],  # short of both, outside both
                           [2.5, 0.0],  # short of type node 2, inside its radius but in its outer shell (0.83 r)
                           [6.0, -0.2],  # past node 2 (held), in leaf 6's outer shell (0.8 r), not past it: held
                           [6.5, -1.8]])  # in leaf 6 (0.94 r) and node 2's outer shell (0.78 r); past both
    path = torch.tensor([[0, 2, 6]] * len(points))
    assert (tree.distances(points, path)[:, 1:] > tree.radii[path][:, 1:]).tolist() == [
        [True, True], [True, True], [False, True], [True, True], [False, True], [False, False], [False, False]]
    assert tree.beyond(points, path)[:, 1:].tolist() == [[True, True], [True, False], [False, False], [False, False],
                                                         [False, False], [True, False], [True, True]]
    assert tree.supported_depth(points, path).tolist() == [2, 1, 1, 0, 0, 2, 2]
    no_clean = hand_tree(["noise", "rain", "haze"])
    assert not no_clean.beyond(points, path).any()
    # the last point, with no clean leaf to see it past them: node 2's outer shell bars node 2's own expert, not
    # leaf 6's, which holds the point (the old rule sent it to the root)
    assert no_clean.supported_levels(points, path)[-1].tolist() == [True, False, True]
    assert no_clean.supported_depth(points, path).tolist() == [0, 0, 1, 0, 0, 2, 2]
    own = torch.tensor([[0, 1, 4]])  # the clean leaf itself holds nothing past it: it has no ray
    assert tree.beyond(torch.tensor([[-1.0, -1.0]]), own)[0, 2].item() is False
