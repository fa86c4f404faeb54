#!/usr/bin/env bash
# Submit slurm/train.sbatch with nodes and GPUs per node as parameters; prints the job id.
#
#   NODES=2 GPUS_PER_NODE=8 slurm/submit.sh [sbatch options --] [train.py overrides]
#   NODES=2 GPUS_PER_NODE=8 slurm/submit.sh --time=24:00:00 -p gpu -- name=run1 model=sdxl_base
#   NODES=2 GPUS_PER_NODE=0 slurm/submit.sh -- name=cpu_test ...        # CPU: TASKS_PER_NODE tasks (1)
#
# Sets --ntasks-per-node = GPUS_PER_NODE (Lightning refuses --ntasks), --gpus-per-node, and the log
# <SGM_JOB_ROOT>/<job name>-<job id>.out beside the job's folder. sbatch also reads SBATCH_PARTITION,
# SBATCH_TIMELIMIT, SBATCH_ACCOUNT, ... from the environment. Parameters (environment):
#   NODES (1)  GPUS_PER_NODE (8)  TASKS_PER_NODE (CPU only, 1)  JOB_NAME (sgm)
#   SGM_JOB_ROOT (<cwd>/outputs/slurm)  PYTHON (python)  SIGNAL_SECONDS (USR1 this long before the time limit: 180)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export SGM_JOB_ROOT=${SGM_JOB_ROOT:-$PWD/outputs/slurm} SGM_REPO=$REPO GPUS_PER_NODE PYTHON=${PYTHON:-python}

SBATCH_OPTIONS=()
if [[ " $* " == *" -- "* ]]; then
  while [ "$1" != "--" ]; do SBATCH_OPTIONS+=("$1"); shift; done
  shift
fi

if [ "$GPUS_PER_NODE" -gt 0 ]; then
  RESOURCES=(--ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE")
else
  RESOURCES=(--ntasks-per-node="${TASKS_PER_NODE:-1}")
fi

mkdir -p "$SGM_JOB_ROOT"
sbatch --parsable --job-name="${JOB_NAME:-sgm}" --nodes="$NODES" "${RESOURCES[@]}" \
  --signal="USR1@${SIGNAL_SECONDS:-180}" --output="$SGM_JOB_ROOT/%x-%j.out" \
  "${SBATCH_OPTIONS[@]}" "$REPO/slurm/train.sbatch" "$@"
