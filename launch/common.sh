# Shared by the launch scripts (sourced, not run). Environment knobs in, one srun/torchrun out.
#
# Knobs: NODES, GPUS_PER_NODE, TEACHER_NODES, CONFIG, STAGE, RUN_DIR, RUN_NAME, WANDB_MODE,
# WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_ID, LOG_ROOT, PYTHON, CONTAINER_IMAGE,
# CONTAINER_MOUNTS, MASTER_PORT, NCCL_* / TORCH_* (any value already set wins), DRY_RUN=1
# (print the commands instead of running them), DRY_RUN_SIGNAL=USR1 (dry run: deliver that
# signal to this script after "starting" srun, to exercise the requeue path).
# Anything after the script name is passed to the trainer as dotted.key=value overrides.

mf_run() {  # run a command, or print it under DRY_RUN=1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

mf_network_defaults() {
  # Sensible NCCL defaults for InfiniBand / RoCE H100/H800 clusters; set any of them before
  # sbatch to change it (e.g. NCCL_IB_HCA=mlx5_0,mlx5_3 or NCCL_IB_GID_INDEX=3 on RoCE).
  : "${NCCL_DEBUG:=WARN}"
  : "${NCCL_IB_DISABLE:=0}"
  : "${NCCL_IB_TIMEOUT:=22}"              # 4.096us * 2^22 ~ 17 s before an IB retry
  : "${NCCL_IB_RETRY_CNT:=7}"
  : "${NCCL_IB_QPS_PER_CONNECTION:=4}"
  : "${NCCL_NVLS_ENABLE:=1}"
  : "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}" # a hung collective fails the job instead of idling
  : "${TORCH_NCCL_AVOID_RECORD_STREAMS:=1}"
  : "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"     # Megatron: TP/SP comm overlap needs ordered kernels
  : "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"
  export NCCL_DEBUG NCCL_IB_DISABLE NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_IB_QPS_PER_CONNECTION \
    NCCL_NVLS_ENABLE TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_AVOID_RECORD_STREAMS \
    CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF
  [[ -n "${NCCL_IB_HCA:-}" ]] && export NCCL_IB_HCA
  [[ -n "${NCCL_SOCKET_IFNAME:-}" ]] && export NCCL_SOCKET_IFNAME
  [[ -n "${NCCL_IB_GID_INDEX:-}" ]] && export NCCL_IB_GID_INDEX
  return 0
}

mf_requeue() {  # USR1 from Slurm (--signal=B:USR1@300): save, stop, requeue into the same run.dir
  trap - USR1
  echo "[launch] $(date -u +%FT%TZ) USR1: job ${SLURM_JOB_ID} is near its time limit; checkpoint and requeue"
  MF_REQUEUED=1
  # Forward to the job steps (not this batch shell): every rank stops at the next step boundary
  # and saves; torchrun ignores USR1 (megatron_fusion.launcher).
  mf_run scancel --signal=USR1 "${SLURM_JOB_ID}"
  if [[ -n "${MF_SRUN_PID:-}" ]]; then
    wait "${MF_SRUN_PID}" || true
  fi
  mf_run scontrol requeue "${SLURM_JOB_ID}"
}

mf_slurm_main() {  # the body of an sbatch script; "$@" = trainer overrides
  : "${SLURM_JOB_ID:?run this under sbatch (or set DRY_RUN=1 and SLURM_* to test it)}"
  : "${CONFIG:?set CONFIG}"
  NODES="${NODES:-${SLURM_JOB_NUM_NODES:-1}}"
  GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
  PYTHON="${PYTHON:-python}"
  export NODES GPUS_PER_NODE CONFIG
  [[ -n "${STAGE:-}" ]] && export STAGE
  [[ -n "${TEACHER_NODES:-}" ]] && export TEACHER_NODES
  [[ -n "${RUN_DIR:-}" ]] && export RUN_DIR
  [[ -n "${RUN_NAME:-}" ]] && export RUN_NAME
  export WANDB_MODE="${WANDB_MODE:-online}"
  [[ -n "${WANDB_PROJECT:-}" ]] && export WANDB_PROJECT
  [[ -n "${WANDB_ENTITY:-}" ]] && export WANDB_ENTITY
  [[ -n "${WANDB_RUN_ID:-}" ]] && export WANDB_RUN_ID
  if [[ -n "${SLURM_JOB_NUM_NODES:-}" && "${SLURM_JOB_NUM_NODES}" != "${NODES}" ]]; then
    echo "[launch] error: NODES=${NODES} but the allocation has ${SLURM_JOB_NUM_NODES} nodes (sbatch --nodes=${NODES})" >&2
    return 2
  fi

  # One log directory per job, one sub-directory per (re)start of it.
  LOG_DIR="${LOG_ROOT:-${REPO_DIR}/logs}/${SLURM_JOB_NAME:-megatron-fusion}-${SLURM_JOB_ID}/attempt-${SLURM_RESTART_COUNT:-0}"
  export LOG_DIR
  mf_run mkdir -p "${LOG_DIR}"

  # sed -n 1p reads to the end: `head -n 1` can SIGPIPE scontrol, which pipefail turns into an exit
  MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | sed -n 1p)}"
  MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
  export MASTER_ADDR MASTER_PORT
  mf_network_defaults

  local srun=(srun --nodes="${NODES}" --ntasks-per-node=1 --kill-on-bad-exit=1
              --output="${LOG_DIR}/node-%n.log" --chdir="${REPO_DIR}")
  [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun+=(--cpus-per-task="${SLURM_CPUS_PER_TASK}")
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then  # pyxis/enroot
    srun+=(--container-image="${CONTAINER_IMAGE}" --container-workdir="${REPO_DIR}"
           --container-mounts="${CONTAINER_MOUNTS:-${REPO_DIR}:${REPO_DIR}}")
  fi
  srun+=("${PYTHON}" -m megatron_fusion.launcher torchrun -- "$@")

  echo "[launch] job ${SLURM_JOB_ID} attempt ${SLURM_RESTART_COUNT:-0}: ${NODES} nodes x ${GPUS_PER_NODE} GPUs," \
       "teacher nodes ${TEACHER_NODES:-from config}, config ${CONFIG}, logs ${LOG_DIR}"
  MF_REQUEUED=0
  trap mf_requeue USR1
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    mf_run "${srun[@]}"
    echo "# torchrun on each node (rendered for node 0):"
    (cd "${REPO_DIR}" && "${PYTHON}" -m megatron_fusion.launcher torchrun --dry-run -- "$@") || return $?
    [[ -n "${DRY_RUN_SIGNAL:-}" ]] && kill -s "${DRY_RUN_SIGNAL}" $$
    return 0
  fi
  # srun in the background: bash runs a trap only between commands, and `wait` is interruptible.
  "${srun[@]}" &
  MF_SRUN_PID=$!
  local rc=0
  wait "${MF_SRUN_PID}" || rc=$?
  while kill -0 "${MF_SRUN_PID}" 2>/dev/null; do  # the trap interrupted wait: srun still runs
    rc=0; wait "${MF_SRUN_PID}" || rc=$?
  done
  if [[ "${MF_REQUEUED}" == 1 ]]; then
    echo "[launch] requeued; the next attempt resumes from the latest checkpoint in run.dir"
    return 0
  fi
  return "${rc}"
}
