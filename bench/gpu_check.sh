#!/usr/bin/env bash
# One command for the first session lent a GPU (issue 12); ≤ 8 min on one H200, no network.
#
#   bash bench/gpu_check.sh                  # on the GPU machine: wheels, CUDA test files, bench/gpu_check.py
#   bash bench/gpu_check.sh --dry-run        # on a CPU machine: the same code paths at tiny sizes (CI runs it)
#   bash bench/gpu_check.sh --prepare-wheels # on the CPU side, before the run: build wheels/ to carry
#
# The GPU image has torch, timm, accelerate, einops, tensorboard, safetensors, scikit-image, opencv and
# pytest but no deepspeed and no webdataset. --prepare-wheels builds them as pure-Python wheels
#   pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 webdataset==1.0.2 -w wheels/
# plus their dependencies an image like that may lack: hjson, py-cpuinfo, braceexpand (pure Python) and
# pydantic, msgpack, ninja as binary wheels for each Python in GPU_PYTHON_VERSIONS (default 3.10-3.13),
# about 15 MB; carry wheels/ (git-ignored) with the working tree. On the GPU machine pip installs from
# wheels/ only what is missing (--no-index --find-links). DeepSpeed's ops compile at run time; this run
# needs none (torch's fused AdamW).
# Results: $OUT/gpu_check.json (OUT defaults to runs/gpu_check) and a table printed last.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
OUT_DIR="${OUT:-runs/gpu_check}"
mode=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) mode=dry ;;
    --prepare-wheels) mode=wheels ;;
    *) echo "usage: bash bench/gpu_check.sh [--dry-run | --prepare-wheels]" >&2; exit 2 ;;
  esac
done

if [ "$mode" = wheels ]; then
  "$PY" -m pip wheel --no-deps --no-build-isolation deepspeed==0.19.8 webdataset==1.0.2 hjson py-cpuinfo \
    braceexpand -w wheels/
  for version in ${GPU_PYTHON_VERSIONS:-3.10 3.11 3.12 3.13}; do
    "$PY" -m pip download --only-binary=:all: --python-version "$version" --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels/ pydantic msgpack ninja
  done
  ls -l wheels/ && du -sh wheels/
  exit 0
fi

if ! "$PY" -c "import deepspeed, webdataset, unirestorer.train" 2>/dev/null; then
  if ! ls wheels/*.whl >/dev/null 2>&1; then
    echo "error: deepspeed/webdataset/unirestorer not importable and no wheels/ to install them from;" \
         "run 'bash bench/gpu_check.sh --prepare-wheels' where the package index is, and carry wheels/" >&2
    exit 2
  fi
  echo "[gpu_check] installing the carried wheels and this checkout (no network)"
  "$PY" -m pip install -q --no-index --find-links wheels/ deepspeed==0.19.8 webdataset==1.0.2
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
  "$PY" -c "import deepspeed, webdataset, unirestorer.train" || {
    echo "error: still not importable after installing wheels/ (a dependency above is missing: add its wheel)" >&2
    exit 2
  }
fi

if [ "$mode" = gpu ]; then
  echo "[gpu_check] a. test files whose code paths change on CUDA (world size 1)"
  "$PY" -m pytest -q -x tests/test_cuda.py tests/test_routing_precision.py tests/test_parallel.py \
    tests/test_restore.py -m "not slow" -p no:cacheprovider
  echo "[gpu_check] b-e. experts stage, router, export, restore latency"
  exec "$PY" bench/gpu_check.py --out "$OUT_DIR"
fi
exec "$PY" bench/gpu_check.py --out "$OUT_DIR" --dry-run
