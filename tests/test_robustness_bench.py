"""bench/robustness.py --quick end to end on a tiny bundle: every shift set, its table row recomputed from the
per-image records, and the sets built as documented (clean = the image itself, camera noise never trained on,
unseen families none of the bundle's tasks holds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
TEST_DATA = REPO.parent / "shared" / "data" / "test"
SETS = ["clean", "mild", "heavy", "camera_noise", "rain_other", "lowlight_real", "unseen_mix", "unseen_family"]


@pytest.fixture(scope="module")
def result(tiny_bundle: str, tmp_path_factory) -> tuple[dict, str, Path]:
    if not TEST_DATA.is_dir():  # the test images ship beside the repository (../shared); CI has them
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{TEST_DATA} not found")
    out = tmp_path_factory.mktemp("robustness")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "robustness.py"), tiny_bundle, "--quick", "--json",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr, out


def test_every_set_is_scored_and_the_json_is_what_was_written(result) -> None:
    doc, stderr, out = result
    assert list(doc["sets"]) == SETS and doc["quick"] and doc["harm_db"] == 0.5
    assert json.loads((out / "robustness.json").read_text()) == doc
    assert "| set | n | input | classical | root | leaf | router | routed | oracle |" in (out / "robustness.md").read_text()
    assert {p.name for p in (out / "grids").iterdir()} == {f"{s}.png" for s in SETS}
    assert all(f"[robustness] {s}: 2 images" in stderr for s in SETS)


def test_rows_follow_from_the_per_image_records(result) -> None:
    doc, _, out = result
    table = (out / "robustness.md").read_text().splitlines()
    for name, row in doc["sets"].items():
        images = doc["images"][name]
        assert row["n"] == len(images) == 2
        harmed = sum(r["routed_psnr"] < r["input_psnr"] - 0.5 for r in images)
        line = next(t for t in table if t.startswith(f"| {name} |"))
        assert f"| {100 * harmed / 2:.1f} % ({harmed}/2) |" in line  # the rate with its count
        for col in ("input", "classical", "root", "leaf", "router", "routed", "oracle"):
            assert row[col] == pytest.approx(np.mean([r[f"{col}_psnr"] for r in images]))
        harm = np.mean([r["routed_psnr"] < r["input_psnr"] - 0.5 for r in images])
        assert row["harm_rate"] == pytest.approx(harm)
        assert row["levels"] == np.bincount([r["level"] for r in images], minlength=3).tolist()
        # routed is a node on the path, the oracle the best of them; the tiny bundle has no calibration bank, so
        # nothing is promoted past the router's level
        for r in images:
            assert r["routed_psnr"] == pytest.approx(r["path_psnr"][r["level"]])
            assert r["oracle_psnr"] == pytest.approx(max(r["path_psnr"])) and r["level"] <= r["router_level"]
            assert r["classical_psnr"] >= r["input_psnr"] - 20  # a floor exists for every image


def test_sets_are_built_as_documented(result) -> None:
    doc = result[0]
    assert all(r["input_psnr"] == 50.0 for r in doc["images"]["clean"])  # the clean input is its ground truth
    mild = [r["input_psnr"] for r in doc["images"]["mild"]]
    heavy = [r["input_psnr"] for r in doc["images"]["heavy"]]
    assert min(mild) > max(heavy)  # the same families (noise, blur first), below vs above the training range
    assert [r["name"].split("_")[0] for r in doc["images"]["rain_other"]] == ["1", "10"]  # Rain100L, sorted by name
    from unirestorer.data_shards.degradations import DEGRADATIONS
    from unirestorer.shifts import UNSEEN_MIXES

    assert "camera_noise_eval" not in DEGRADATIONS  # the camera set's pipeline is never a training degradation
    assert not {"blur+noise", "haze+rain", "lowlight+blur+noise"} & set(UNSEEN_MIXES)  # bench/quality.py's mixtures


def test_unseen_families_are_those_no_training_task_holds() -> None:
    from unirestorer.shifts import unseen_families

    assert unseen_families(["blur", "clean", "haze", "lowlight", "noise", "rain"]) == ("jpeg", "snow")  # the demo
    assert unseen_families(["blur+noise", "clean", "haze+rain", "lowlight+blur+noise"]) == ("jpeg", "snow")
    assert unseen_families(["dark", "noise"]) == ("blur", "jpeg", "rain", "haze", "lowlight", "snow")  # the tiny bundle
    assert unseen_families(["noise", "mixed"]) == ()  # "mixed" draws from every family


def test_the_unseen_family_set_cycles_through_the_unseen_families_or_is_left_out(capsys) -> None:
    if not TEST_DATA.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{TEST_DATA} not found")
    from robustness import shift_sets

    (unseen,) = shift_sets(TEST_DATA, 3, 64, 0, True, ("unseen_family",), ["blur", "clean", "haze", "noise", "rain"])
    assert [[c["family"] for c in s.label["components"]] for s in unseen.samples] == [["jpeg"], ["lowlight"], ["snow"]]
    assert unseen.tasks == [None] * 3  # no classical floor: the input is the floor
    every = ["noise", "blur", "jpeg", "rain", "haze", "lowlight", "snow"]
    assert [s.name for s in shift_sets(TEST_DATA, 1, 64, 0, True, None, every)] == SETS[:-1]
    assert "unseen_family: left out, the bundle trained every family" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no unseen_family set: the bundle trained every family of the library"):
        shift_sets(TEST_DATA, 1, 64, 0, True, ("unseen_family",), every)
