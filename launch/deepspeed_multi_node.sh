#!/usr/bin/env bash
# Several nodes through the deepspeed launcher and a hostfile (see hostfile.example).
#
#   launch/deepspeed_multi_node.sh HOSTFILE [ENTRY ARGS...]
#   e.g. launch/deepspeed_multi_node.sh launch/hostfile.example experts --config configs/experts.toml
#
# Run it on the first host of HOSTFILE (MASTER_ADDR defaults to that host). The launcher reaches the
# others with pdsh over passwordless ssh; every node needs the same venv path and a shared file system
# for --ckpt-dir. Environment variables to forward go into ./.deepspeed_env (one NAME=value a line).
# Without ssh: run it on every node with NODE_RANK=0, 1, ... (the node's line in HOSTFILE) and the same
# MASTER_ADDR; each node then starts only its own ranks (deepspeed --no_ssh --node_rank).
# ENTRY as in deepspeed_single_node.sh.
set -euo pipefail
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
HOSTFILE=$1; shift
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE does not exist" >&2; exit 2; }
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
ENTRY=${UNIRESTORER_ENTRY:-unirestorer.train}
if [[ $ENTRY == *.py ]]; then TARGET=("$ENTRY"); else TARGET=(--module "$ENTRY"); fi
NO_SSH=()
if [ -n "${NODE_RANK:-}" ]; then NO_SSH=(--no_ssh --node_rank "$NODE_RANK"); fi
exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}" \
  "${NO_SSH[@]}" --no_local_rank "${TARGET[@]}" "$@"
