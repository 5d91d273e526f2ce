#!/bin/bash
# Submit a cocomix run to slurm as a chain of jobs, each waiting for the stage it reads:
#   prepare -> train-sae (when the config trains its SAE) -> extract-concepts (an array job, one shard per
#   task) -> one pretraining job per student (torchrun on PRETRAIN_NODES nodes; NTP and pause students wait
#   for prepare only) -> eval, steering demo and report (`cocomix run --from eval`).
# The jobs are the run's own plan (`cocomix run --dry-run --json`): every student and seed that `cocomix run`
# would train, and no job for a stage that is already complete. Every stage resumes from its files, so a
# failed, cancelled or preempted chain is fixed by running this script again.
#
#   bash configs/slurm/submit.sh CONFIG.toml [EXTRACT_SHARDS] [PRETRAIN_NODES]
#
# Prints one line per job (`JOB_ID STAGE`). Run it where cocomix is installed (the login node's environment).
set -euo pipefail

# --- site settings: edit them here for your cluster, or set them in the environment ------------------------
: "${COCOMIX_ENV:=.venv/bin/activate}"              # sourced by every job: the environment with cocomix
: "${COCOMIX_PARTITION:=}"                          # empty: the cluster's default partition
: "${COCOMIX_ACCOUNT:=}"                            # empty: your default account
: "${COCOMIX_TIME:=24:00:00}"                       # the time limit of each job
: "${COCOMIX_GPUS_PER_NODE:=8}"                     # 0 on CPU nodes: pretraining then runs gloo ranks
: "${COCOMIX_RANKS_PER_NODE:=$COCOMIX_GPUS_PER_NODE}"  # pretraining processes per node (one per GPU)
: "${COCOMIX_CPUS_PER_RANK:=8}"                     # CPUs per pretraining rank, per shard and per job
: "${COCOMIX_MEM:=64G}"                             # memory per job (per node for pretraining; 0: all)
: "${COCOMIX_LOGS:=logs}"                           # job logs: COCOMIX_LOGS/<job name>-<job id>.out
# -----------------------------------------------------------------------------------------------------------

CONFIG=${1:?usage: submit.sh CONFIG.toml [EXTRACT_SHARDS] [PRETRAIN_NODES]}
SHARDS=${2:-16}
NODES=${3:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "$COCOMIX_RANKS_PER_NODE" -lt 1 ]; then
  echo "submit.sh: COCOMIX_RANKS_PER_NODE must be at least 1 (on CPU nodes, set it with COCOMIX_GPUS_PER_NODE=0)" >&2
  exit 2
fi
export COCOMIX_CONFIG=$CONFIG COCOMIX_ENV COCOMIX_RANKS_PER_NODE
mkdir -p "$COCOMIX_LOGS"

site=(--time="$COCOMIX_TIME" --mem="$COCOMIX_MEM" --output="$COCOMIX_LOGS/%x-%j.out" --kill-on-invalid-dep=yes)
[ -n "$COCOMIX_PARTITION" ] && site+=(--partition="$COCOMIX_PARTITION")
[ -n "$COCOMIX_ACCOUNT" ] && site+=(--account="$COCOMIX_ACCOUNT")
one_gpu=()
[ "$COCOMIX_GPUS_PER_NODE" -gt 0 ] && one_gpu=(--gres=gpu:1)

# The plan: one line per stage, `step stage action after command...`; a stage the config would refuse to
# overwrite stops the submission here, with cocomix's reason.
plan=$(cocomix --config "$CONFIG" run --dry-run --json | python3 -c '
import json, sys
rows = json.load(sys.stdin)["plan"]
for r in rows:
    if r["action"] == "refuse":
        sys.exit("submit.sh: %s is %s; nothing submitted (`cocomix run --dry-run` shows the plan)" % (r["stage"], r["state"]))
for r in rows:
    print(r["step"], r["stage"], r["action"], r["after"] or "-", r["command"])
')

declare -A job=()   # stage -> its job id, for the stages submitted now
after() {           # the dependency on a stage's job, or none when the stage is already complete
  if [ -n "${job[$1]:-}" ]; then echo "--dependency=afterok:${job[$1]}"; fi
}
submit() {          # submit STAGE SBATCH-ARGS...: record and print its job id
  local stage=$1
  shift
  job[$stage]=$(sbatch --parsable "${site[@]}" "$@")
  echo "${job[$stage]} $stage"
}

pretrain_jobs=()
while read -r step stage action upstream command; do
  [ "$action" = skip ] && continue
  cocomix_args=${command#cocomix }
  case $step in
    prepare | train-sae)
      gpus=()
      [ "$step" = train-sae ] && gpus=("${one_gpu[@]}")
      submit "$stage" --job-name="cocomix-$step" --cpus-per-task="$COCOMIX_CPUS_PER_RANK" "${gpus[@]}" \
        $(after "$upstream") --export=ALL,COCOMIX_COMMAND="$cocomix_args" "$HERE/stage.sbatch"
      ;;
    extract-concepts)
      submit "$stage" --job-name=cocomix-extract --array=0-$((SHARDS - 1)) \
        --cpus-per-task="$COCOMIX_CPUS_PER_RANK" "${one_gpu[@]}" $(after "$upstream") "$HERE/extract.sbatch"
      ;;
    pretrain)
      gpus=()
      [ "$COCOMIX_GPUS_PER_NODE" -gt 0 ] && gpus=(--gres=gpu:"$COCOMIX_GPUS_PER_NODE")
      submit "$stage" --job-name="cocomix-$stage" --nodes="$NODES" --ntasks-per-node=1 \
        --cpus-per-task=$((COCOMIX_RANKS_PER_NODE * COCOMIX_CPUS_PER_RANK)) "${gpus[@]}" \
        $(after "$upstream") --export=ALL,COCOMIX_STAGE="$stage",COCOMIX_STUDENT="$cocomix_args" \
        "$HERE/pretrain.sbatch"
      pretrain_jobs+=("${job[$stage]}")
      ;;
    eval)  # eval, the steering demo and the report: one job after every student
      depends=()
      [ ${#pretrain_jobs[@]} -gt 0 ] && depends=(--dependency="afterok:$(IFS=:; echo "${pretrain_jobs[*]}")")
      submit report --job-name=cocomix-report --cpus-per-task="$COCOMIX_CPUS_PER_RANK" "${one_gpu[@]}" \
        "${depends[@]}" --export=ALL,COCOMIX_COMMAND="run --from eval" "$HERE/stage.sbatch"
      ;;
  esac
done <<< "$plan"
