"""bench/gpu_check.sh --dry-run: the GPU proof run's code paths (experts stage with both archs, router,
export, bf16 restore) at tiny sizes on the CPU, so the script still works when a GPU session gets it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions")}
    res = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["dry_run"] and doc["stage_exit_codes"] == {"extractor": 0, "cluster": 0}
    assert [(r["arch"], r["batch"], r["exit_code"]) for r in doc["experts"]] == [("nafnet", 2, 0), ("restormer", 2, 0)]
    for r in doc["experts"]:
        assert r["root_img_s"] > 0 and r["leaf_img_s"] > 0  # both phases logged past their warm-up interval
        assert r["reference_img_s"] is None and r["peak_gib"] is None  # no reference at batch 2, no GPU
    assert doc["router"]["exit_code"] == 0 and doc["router"]["export_exit_code"] == 0
    assert (tmp_path / "bundle" / "bundle.json").is_file()
    restore = doc["restore"]
    assert restore["size"] == 64 and restore["ms"] > 0 and restore["max_abs_diff_vs_fp32"] < 0.1
    tail = res.stdout.strip().splitlines()
    assert tail[-1] == f"summary: {tmp_path / 'gpu_check.json'}"
    assert any(line.startswith("| nafnet-tiny | 2 |") for line in tail) and "dry run" in res.stdout
