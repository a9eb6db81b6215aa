#!/bin/bash
# Fusion stage (CE + ULD + GLD) of Qwen2.5-Coder-14B, Qwen2.5-14B and Mistral-Small-24B into
# Phi-4, on NODES nodes x 8 GPUs; the last TEACHER_NODES nodes serve the online teachers.
#
#   mkdir -p logs && NODES=3 TEACHER_NODES=2 sbatch --nodes=3 launch/fuse_14b.sh [key=value ...]
#   DRY_RUN=1 SLURM_JOB_ID=1 SLURM_JOB_NUM_NODES=3 MASTER_ADDR=n1 bash launch/fuse_14b.sh  # print only
#
# Check the layout first: megatron-fusion plan --config configs/recipes/fuse_14b.yaml --nodes 3 \
#   --gpus-per-node 8 --teacher-nodes 2 (it says whether the teachers keep up with the student).
# Knobs: see launch/common.sh and docs/cluster.md.
#SBATCH --job-name=fuse14b
#SBATCH --nodes=3
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

CONFIG="${CONFIG:-configs/recipes/fuse_14b.yaml}"
STAGE="${STAGE:-fuse}"
NODES="${NODES:-${SLURM_JOB_NUM_NODES:-3}}"
TEACHER_NODES="${TEACHER_NODES:-$((NODES * 2 / 3))}"   # online teachers: 2 of every 3 nodes (plan: balanced)
mf_slurm_main "$@"
