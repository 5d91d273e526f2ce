#!/bin/bash
# Submit a cocomix run to slurm as a chain of jobs, each waiting for the one before:
#   prepare (CPU) -> extract-concepts (GPU array job, one shard per task) -> pretrain (torchrun on
#   multi-GPU nodes, one job per objective) -> eval, steering demo and report (`cocomix run --from eval`).
# Every stage resumes from its files, so a failed or preempted job is fixed by submitting the chain again:
# finished stages are skipped.
#
#   bash configs/slurm/submit.sh configs/paper-69m.toml [EXTRACT_SHARDS] [PRETRAIN_NODES]
#
# Edit the #SBATCH lines of the .sbatch files (partition, account, time) for your cluster, and activate
# the environment where cocomix is installed in COCOMIX_ENV (sourced by every job).
set -euo pipefail

CONFIG=${1:?usage: submit.sh CONFIG.toml [EXTRACT_SHARDS] [PRETRAIN_NODES]}
SHARDS=${2:-16}
NODES=${3:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export COCOMIX_CONFIG=$CONFIG COCOMIX_ENV=${COCOMIX_ENV:-.venv/bin/activate}

# The objectives of the run, read from the config the way cocomix reads it (run this script where cocomix
# is installed, e.g. after `source .venv/bin/activate` on the login node).
OBJECTIVES=$(python -c "from pipelines.config import load_config; print(*load_config('$CONFIG').run.objectives)")

prepare=$(sbatch --parsable --job-name=cocomix-prepare --cpus-per-task=16 --mem=64G --time=12:00:00 \
  --wrap "source $COCOMIX_ENV && cocomix --config $CONFIG prepare")

extract=$(sbatch --parsable --dependency=afterok:$prepare --array=0-$((SHARDS - 1)) \
  "$HERE/extract.sbatch")

pretrain=""
for objective in $OBJECTIVES; do
  case $objective in
    cocomix | kd) after=$extract ;;  # these read concepts.zarr
    *) after=$prepare ;;
  esac
  job=$(sbatch --parsable --dependency=afterok:$after --nodes="$NODES" --export=ALL,OBJECTIVE="$objective" \
    "$HERE/pretrain.sbatch")
  pretrain="$pretrain:$job"
done

finish=$(sbatch --parsable --dependency=afterok$pretrain --job-name=cocomix-report --gres=gpu:1 \
  --time=6:00:00 --wrap "source $COCOMIX_ENV && cocomix --config $CONFIG run --from eval")

echo "submitted: prepare $prepare, extract $extract (x$SHARDS), pretrain${pretrain//:/ }, report $finish"
