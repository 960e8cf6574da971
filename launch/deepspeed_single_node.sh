#!/usr/bin/env bash
# One node, NUM_GPUS ranks, through the deepspeed launcher.
#
#   launch/deepspeed_single_node.sh NUM_GPUS [ENTRY ARGS...]
#   e.g. launch/deepspeed_single_node.sh 8 experts --config configs/experts.toml train.lr=2e-4
#
# ENTRY: $UNIRESTORER_ENTRY, a module (default unirestorer.train) or a .py file; the arguments follow it.
# Ranks come from the environment (RANK/LOCAL_RANK/WORLD_SIZE), so --local_rank is not passed.
# MASTER_PORT (default 29500) must differ between runs sharing a node. Needs `deepspeed` on PATH
# (activate the venv). DS_ACCELERATOR=cpu gives gloo CPU ranks (see cpu_ranks.sh).
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
NUM_GPUS=$1; shift
ENTRY=${UNIRESTORER_ENTRY:-unirestorer.train}
if [[ $ENTRY == *.py ]]; then TARGET=("$ENTRY"); else TARGET=(--module "$ENTRY"); fi
exec deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank "${TARGET[@]}" "$@"
