#!/usr/bin/env bash
# N CPU ranks (gloo) on this machine through the same deepspeed launcher: the form the demo and tests use.
#
#   launch/cpu_ranks.sh N [ENTRY ARGS...]        e.g. MASTER_PORT=29611 launch/cpu_ranks.sh 2 experts --config ...
#
# One thread per rank unless OMP_NUM_THREADS is set. ENTRY as in deepspeed_single_node.sh.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
export DS_ACCELERATOR=cpu
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$(dirname "${BASH_SOURCE[0]}")/deepspeed_single_node.sh" "$@"
