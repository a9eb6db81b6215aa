#!/bin/bash
# InfiFPO preference stage on the fused Phi-4, source log-probs precomputed offline: every node
# trains the student (TEACHER_NODES=0).
#
#   mkdir -p logs && NODES=4 sbatch --nodes=4 launch/fpo_14b.sh [key=value ...]
#
# Check the layout first: megatron-fusion plan --config configs/recipes/fpo_14b.yaml --nodes 4 --gpus-per-node 8
#SBATCH --job-name=fpo14b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
source "${REPO_DIR}/launch/common.sh"

CONFIG="${CONFIG:-configs/recipes/fpo_14b.yaml}"
STAGE="${STAGE:-fpo}"
TEACHER_NODES="${TEACHER_NODES:-0}"
mf_slurm_main "$@"
