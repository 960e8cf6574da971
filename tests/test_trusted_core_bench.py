"""bench/trusted_core.py: its bins on hand-made numbers, and end to end on a tiny bundle (the crops it builds,
the pairs it bins, the clear error for a folder without photos)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from trusted_core import bins  # noqa: E402


def test_bins_count_harm_and_gain_per_distance_band_over_the_nodes_given() -> None:
    ratio = np.array([[0.1, 0.3, 0.95], [0.1, 0.45, 2.0], [0.1, 0.35, 0.85]])  # column 0: the root, not among the nodes given
    gain = np.array([[-9.0, 2.0, -1.0], [-9.0, -0.6, 5.0], [-9.0, 4.0, 0.2]])
    rows = {(r["from"], r["to"]): r for r in bins(ratio, gain, np.ones(3, bool), [1, 2])}
    assert rows[(0.0, 0.4)] == {"from": 0.0, "to": 0.4, "pairs": 2, "harm": 0.0, "gain": 3.0}
    assert rows[(0.4, 0.5)]["pairs"] == 1 and rows[(0.4, 0.5)]["harm"] == 1.0 and rows[(0.4, 0.5)]["gain"] == -0.6
    assert rows[(0.9, 1.0)] == {"from": 0.9, "to": 1.0, "pairs": 1, "harm": 1.0, "gain": -1.0}
    assert rows[(0.8, 0.9)]["gain"] == pytest.approx(0.2) and rows[(0.8, 0.9)]["harm"] == 0.0
    assert rows[(0.5, 0.6)] == {"from": 0.5, "to": 0.6, "pairs": 0, "harm": None, "gain": None}
    assert sum(r["pairs"] for r in rows.values()) == 5  # 2.0 lies outside every band
    kept = {(r["from"], r["to"]): r for r in bins(ratio, gain, np.array([True, False, True]), [1, 2])}
    assert kept[(0.4, 0.5)]["pairs"] == 0 and kept[(0.0, 0.4)]["pairs"] == 2
    node_2 = {(r["from"], r["to"]): r for r in bins(ratio, gain, np.ones(3, bool), [2])}
    assert node_2[(0.8, 0.9)]["pairs"] == node_2[(0.9, 1.0)]["pairs"] == 1 and node_2[(0.0, 0.4)]["pairs"] == 0


def test_the_bundle_is_measured_on_every_synthetic_task_of_its_tree(tiny_bundle: str, tmp_path: Path) -> None:
    from skimage import data
    from skimage.io import imsave

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        imsave(photos / f"{name}.png", getattr(data, name)()[:96, :96])
    cmd = [sys.executable, str(REPO / "bench" / "trusted_core.py"), tiny_bundle, "--photos", str(photos),
           "--per-task", "2", "--crop", "32", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["tasks"] == ["noise"]  # the tiny tree's "dark" is no task of the degradation library
    assert doc["crops"] == 2 * 1 * 2 and doc["trusted_fraction"] == 0.7
    assert doc["type"]["nodes"] == [1, 2] and doc["finer"]["nodes"] == [3, 4, 5, 6]  # the tiny tree [1, 2, 4]
    for group in ("type", "finer"):
        assert [r["from"] for r in doc[group]["all"]] == [0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        assert doc[group]["all"] == doc[group]["without_clean"]  # no clean task in this tree
        for r in doc[group]["all"]:
            assert r["pairs"] == 0 or (0.0 <= r["harm"] <= 1.0 and np.isfinite(r["gain"]))

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(cmd[:4] + [str(empty)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and f"error: {empty}: no photos" in proc.stderr
