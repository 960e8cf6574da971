"""`restore --level / --node / --explain --json`: the node that runs and the record of why, from the model's route."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unirestorer.cli import main
from unirestorer.explain import holds, node_label
from unirestorer.model.unirestorer import UniRestorer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convs on 2 shared cores (tests/conftest.py)


def restore(bundle: str, src: Path, out: Path, *extra: str) -> int:
    return main(["restore", "--weights", bundle, "--input", str(src), "--output", str(out), "--tile", "0",
                 "--device", "cpu", *extra])


@pytest.fixture
def photo(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / "p.png")
    return src


def test_level_runs_that_node_of_the_routed_path(tiny_bundle, photo, tmp_path, capsys):
    model = UniRestorer.load_bundle(tiny_bundle)
    records, pngs = {}, {}
    for level in ("auto", "0", "1", "2"):
        out = tmp_path / f"level{level}"
        assert restore(tiny_bundle, photo, out, "--level", level, "--explain", "--json") == 0
        records[level] = json.loads((out / "p.png.json").read_text())
        pngs[level] = (out / "p.png").read_bytes()
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("p.png: level "))
    auto = records["auto"]
    path = auto["path"]
    assert len(path) == 3 and path[0] == 0 and path[-1] == auto["leaf"] and auto["ran"] == auto["node"] in path
    assert [records[str(l)]["ran"] for l in range(3)] == path  # --level picks from the route, not a new one
    assert all(r["path"] == path and r["node"] == auto["node"] for r in records.values())
    assert len({pngs[str(l)] for l in range(3)}) == 3  # three different experts ran
    assert pngs["auto"] == pngs[str(auto["level"])]
    for n in path:  # what each node holds, from the tree
        held = auto["holds"][str(n)]
        assert held["composition"] == model.tree.composition(n) and held["level"] == path.index(n)
        assert held["dominant"] == max(held["composition"], key=held["composition"].get)
        span = model.tree.intensity_range(n, held["dominant"])
        assert held["intensity"] == (list(span) if span else None)
        shown = f" ({span[0]:.2f}-{span[1]:.2f})" if span else ""
        assert f"{n} {held['dominant']} {held['share']:.0%}{shown}" in line
    assert len(auto["top_leaves"]) == 3 and sum(auto["p_level"]) == pytest.approx(1, abs=1e-5)
    assert auto["image"] == "p.png" and auto["output"] == "p.png"
    assert f"path: 0 {auto['holds']['0']['dominant']}" in line and "top leaves: leaf" in line and "p(level)" in line

    out = tmp_path / "node"  # --node: any node; the record still shows the routed path
    assert restore(tiny_bundle, photo, out, "--node", str(path[1]), "--explain", "--json") == 0
    rec = json.loads((out / "p.png.json").read_text())
    assert rec["ran"] == path[1] and (out / "p.png").read_bytes() == pngs["1"]


def test_level_and_json_errors(tiny_bundle, photo, tmp_path, capsys):
    assert restore(tiny_bundle, photo, tmp_path / "a", "--level", "3") == 2
    assert "--level 3: this tree has levels 0..2" in capsys.readouterr().err
    assert restore(tiny_bundle, photo, tmp_path / "a", "--node", "7") == 2
    assert "--node 7: this tree has nodes 0..6" in capsys.readouterr().err
    assert restore(tiny_bundle, photo, tmp_path / "a", "--json") == 2
    assert "pass --explain too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        restore(tiny_bundle, photo, tmp_path / "a", "--level", "fine")
    assert "expected auto or a level number" in capsys.readouterr().err
    out = tmp_path / "b"
    out.mkdir()
    (out / "p.png.json").write_text("{}")  # an existing record is not replaced without --overwrite
    assert restore(tiny_bundle, photo, out, "--explain", "--json") == 2
    assert "p.png.json already exists" in capsys.readouterr().err and not (out / "p.png").exists()


def test_holds_gives_the_dominant_tasks_intensity_range(tiny_bundle, photo, tmp_path, capsys):
    model = UniRestorer.load_bundle(tiny_bundle)  # the tiny tree: 'noise' at 0.05, 0.10, ..., 0.60, 'dark' unknown
    held = {n: holds(model, n) for n in range(model.tree.n_nodes)}
    noise = next(n for n, h in held.items() if h["level"] == 1 and h["composition"] == {"noise": 12})
    assert held[noise]["intensity"] == [0.05, 0.6]
    assert node_label(noise, held[noise]) == f"{noise} noise 100% (0.05-0.60)"
    assert all(h["intensity"] is None for h in held.values() if h["dominant"] == "dark")
    assert held[0]["dominant"] == "dark" and held[0]["intensity"] is None  # a 12/12 tie: the first task wins

    old = tmp_path / "old_bundle"  # a bundle written before the ranges: still loads and explains, intensity None
    shutil.copytree(tiny_bundle, old)
    config = json.loads((old / "bundle.json").read_text())
    del config["tree"]["intensity_ranges"]
    (old / "bundle.json").write_text(json.dumps(config))
    before = UniRestorer.load_bundle(old)
    assert before.tree.intensity_ranges is None and holds(before, noise)["intensity"] is None
    assert node_label(noise, holds(before, noise)) == f"{noise} noise 100%"
    out = tmp_path / "out"
    assert restore(str(old), photo, out, "--explain", "--json") == 0
    rec = json.loads((out / "p.png.json").read_text())
    assert all(h["intensity"] is None for h in rec["holds"].values()) and rec["path"][0] == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("p.png: level "))
    assert not re.search(r"\(\d\.\d\d-\d\.\d\d\)", line) and "path: 0 dark 50% > " in line
