#!/usr/bin/env bash
# Evaluate a weights bundle on the real test sets (../shared/data/test from the repo root) and
# write one markdown table: every set, the input and the four model baselines, PSNR / SSIM.
#
#   bench/real_eval.sh WEIGHTS [OUT_DIR]
#
# Sets: CBSD68 with Gaussian noise sigma 15/25/50 (seed 0), Rain100L (Y channel, BasicSR
# convention for rain), LOL eval15 (RGB), Kodak24 with synthetic degradations (seed 0).
# Everything else is the PromptIR convention: RGB, float, centre crop to a multiple of 16.
# Environment: DATA (test-set folder), EVAL_ARGS (extra flags for every `unirestorer eval`, e.g.
# "--device cpu --limit 2"), UNIRESTORER (the command; default `unirestorer`,
# else the repo's .venv/bin/unirestorer).
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 WEIGHTS [OUT_DIR]" >&2
    exit 2
fi
WEIGHTS=$1
OUT=${2:-runs/real_eval}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$ROOT/../shared/data/test}
read -r -a EXTRA <<< "${EVAL_ARGS:-}"
if [[ -z ${UNIRESTORER:-} ]]; then
    if command -v unirestorer > /dev/null; then
        UNIRESTORER=unirestorer
    elif [[ -x $ROOT/.venv/bin/unirestorer ]]; then
        UNIRESTORER=$ROOT/.venv/bin/unirestorer
    else
        echo "error: no \`unirestorer\` command: install the package (pip install -e .) or set UNIRESTORER" >&2
        exit 1
    fi
fi
read -r -a CMD <<< "$UNIRESTORER"

if [[ ! -d $DATA ]]; then
    echo "error: test data folder $DATA not found (expected ../shared/data/test next to the repo; set DATA=...)" >&2
    exit 1
fi
for set in CBSD68 Kodak24 Rain100L/input Rain100L/target LOL/low LOL/high; do
    if [[ ! -d $DATA/$set ]]; then
        echo "error: $DATA/$set is missing" >&2
        exit 1
    fi
done
if [[ ! -f $WEIGHTS/bundle.json ]]; then
    echo "error: $WEIGHTS is not a weights bundle (no bundle.json)" >&2
    exit 1
fi

mkdir -p "$OUT"
TABLE=$OUT/results.md
rm -f "$TABLE"
run() {  # NAME FOLDER_NAME ARGS...
    local name=$1 dir=$2
    shift 2
    echo "== $name" >&2
    "${CMD[@]}" eval --weights "$WEIGHTS" "$@" --name "$name" --out "$OUT/$dir" --summary "$TABLE" --json \
        ${EXTRA[@]+"${EXTRA[@]}"}
}

for sigma in 15 25 50; do
    run "CBSD68 noise σ$sigma" "cbsd68_s$sigma" --clean "$DATA/CBSD68" --synth "noise:$sigma" --seed 0
done
run "Rain100L" rain100l --pairs "$DATA/Rain100L/input" "$DATA/Rain100L/target" --task rain --y-channel
run "LOL eval15" lol --pairs "$DATA/LOL/low" "$DATA/LOL/high" --task lowlight
for spec in noise:25 blur:2 jpeg:20 rain haze snow lowlight mixed; do
    run "Kodak24 $spec" "kodak24_${spec//:/}" --clean "$DATA/Kodak24" --synth "$spec" --seed 0
done

{
    echo
    echo "Weights: $WEIGHTS. Conventions: RGB float, centre crop to a multiple of 16, scikit-image PSNR/SSIM"
    echo "(data_range 1), per-image means; Rain100L on BT.601 Y. Synthetic degradations drawn with seed 0."
} >> "$TABLE"
echo "wrote $TABLE" >&2
cat "$TABLE"
