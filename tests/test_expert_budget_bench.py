"""bench/expert_budget.py end to end on a tiny bundle laid out as a demo run: the curve starts at the bundle's own
expert, counts the images it trained on, trains only a copy (the bundle is untouched), and bad input is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unirestorer.model.router import image_psnr
from unirestorer.model.unirestorer import UniRestorer

REPO = Path(__file__).resolve().parent.parent


def save_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def run(tiny_bundle: str, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_bundle, root / "bundle")
    rng = np.random.default_rng(0)
    for i in range(3):
        save_png(root / "photos" / "train" / f"p{i}.png", rng.uniform(0.2, 0.8, (80, 72, 3)).astype(np.float32))
    for i in range(2):
        clean = rng.uniform(0.2, 0.8, (32, 32, 3)).astype(np.float32)
        save_png(root / "heldout" / "clean" / f"c{i}.png", clean)
        save_png(root / "heldout" / "noise" / f"c{i}.png", np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1))
    (root / "eval").mkdir()
    (root / "eval" / "summary.json").write_text(json.dumps({"tasks": {"noise": {"input": 20.5, "classical": 27.25}}}))
    return root


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench" / "expert_budget.py"), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.iterdir()))).hexdigest()


def test_the_curve_starts_at_the_bundles_expert_and_trains_a_copy(run: Path) -> None:
    before = digest(run / "bundle")
    proc = bench(str(run), "--node", "0", "--node", "3", "--task", "noise", "--steps", "3", "--every", "2",
                 "--batch", "2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["reference"] == {"input": 20.5, "classical": 27.25} and doc["patch"] == 64
    model = UniRestorer.load_bundle(run / "bundle").eval()
    from unirestorer.evaluate import load_pairs

    pairs = load_pairs(run / "heldout" / "noise", run / "heldout" / "clean")
    lq = torch.stack([torch.from_numpy(s.lq).permute(2, 0, 1) for s in pairs])
    gt = torch.stack([torch.from_numpy(s.gt).permute(2, 0, 1) for s in pairs])
    for node in (0, 3):
        rows = doc["nodes"][str(node)]
        assert [(r["step"], r["images"]) for r in rows] == [(0, 0), (2, 4), (3, 6)]
        with torch.no_grad():
            start = float(image_psnr(model.expert(node)(lq).clamp(0, 1), gt).clamp(max=50).mean())
        assert rows[0]["psnr"] == pytest.approx(start, abs=1e-4)
        assert rows[-1]["psnr"] != rows[0]["psnr"]  # it trained
    assert digest(run / "bundle") == before


def test_the_table_and_bad_input(run: Path, tmp_path: Path) -> None:
    proc = bench(str(run), "--node", "1", "--task", "noise", "--steps", "1", "--batch", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the run's own table on these crops: input 20.50 · classical 27.25" in proc.stdout
    assert [line.split(" | ")[1] for line in proc.stdout.splitlines() if line.startswith("| 1 | ")] == ["0", "1"]
    bad = bench(str(run), "--node", "99", "--task", "noise", "--steps", "1")
    assert bad.returncode != 0 and "--node 99: the tree has nodes 0..6" in bad.stderr
    missing = bench(str(run), "--node", "1", "--task", "haze", "--steps", "1")
    assert missing.returncode != 0 and "heldout/haze: not found (no held-out haze crops" in missing.stderr
