#!/bin/bash
# One node, no Slurm: torchrun --standalone over this machine's GPUs (GPUS_PER_NODE, default:
# all that nvidia-smi lists). Online teachers take the ranks their config gives them.
#
#   CONFIG=configs/recipes/fuse_14b.yaml bash launch/run_local.sh train.steps=10
#   DRY_RUN=1 GPUS_PER_NODE=8 CONFIG=configs/recipes/fuse_14b.yaml bash launch/run_local.sh   # print only
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
source "${REPO_DIR}/launch/common.sh"

: "${CONFIG:?set CONFIG, e.g. CONFIG=configs/recipes/fuse_14b.yaml}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [[ "${GPUS_PER_NODE}" -ge 1 ]] || { echo "run_local.sh: no GPU found; set GPUS_PER_NODE" >&2; exit 2; }
fi
export CONFIG GPUS_PER_NODE NODES=1
unset TEACHER_NODES MASTER_ADDR
[[ -n "${STAGE:-}" ]] && export STAGE
[[ -n "${RUN_DIR:-}" ]] && export RUN_DIR
mf_network_defaults
cd "${REPO_DIR}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  exec "${PYTHON:-python}" -m megatron_fusion.launcher torchrun --dry-run -- "$@"
fi
exec "${PYTHON:-python}" -m megatron_fusion.launcher torchrun -- "$@"
