#!/usr/bin/env bash
# Evaluates every checkpoint of a run: one job array of jobs/slurm/eval.sbatch, a task per step
# directory. From the repository root:
#   bash jobs/slurm/eval_all.sh [sbatch options] CHECKPOINT_DIR JOB.pb [qwen3-train options]
# CHECKPOINT_DIR: the run's checkpoint directory (output_dir/checkpoints by default). The sbatch
# options (every argument before CHECKPOINT_DIR; each starts with -, give values as --opt=value)
# go to the array's sbatch. With --dependency=afterok:TRAIN_JOB, a one-task job waits for the
# training and submits the array when it ends, so that the array covers the checkpoints the
# training kept (checkpoint.keep_last, 3 by default; 0 keeps all). Prints the id of the job it
# submitted (the array's, or that of the job that will submit it).
set -euo pipefail
usage="usage: bash jobs/slurm/eval_all.sh [sbatch options] CHECKPOINT_DIR JOB.pb [qwen3-train options]"
opts=() after=""
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case $1 in
    --dependency=*) after=${1#--dependency=} ;;
    *) opts+=("$1") ;;
  esac
  shift
done
ckdir=${1:?$usage}
job=${2:?$usage}
shift 2
here=$(dirname "$0")

if [ -n "$after" ]; then
  # the array is made when the training has ended: a one-task job that runs this script again
  # (the array's own settings come from sbatch, not from this job's SLURM_ variables)
  wrap=$(printf '%q ' bash "$here/eval_all.sh" "${opts[@]}" "$ckdir" "$job" "$@")
  exec sbatch --parsable --job-name=qwen3-eval-all --dependency="$after" --ntasks=1 \
    --time=00:10:00 --output="$(dirname "$ckdir")/eval-all-%j.out" --wrap="$wrap"
fi

unset $(compgen -v SLURM_ | grep -vx SLURM_CONF) 2>/dev/null || true
# the step directories there now, oldest first (an interrupted save's .tmp is not one)
list=$(dirname "$ckdir")/eval/checkpoints.$$.txt
mkdir -p "$(dirname "$list")"
find "$ckdir" -mindepth 1 -maxdepth 1 -type d -name 'step_*' ! -name '*.tmp' | sort >"$list"
n=$(wc -l <"$list")
[ "$n" -gt 0 ] || { echo "eval_all: $ckdir holds no step_* directory" >&2; exit 1; }
echo "eval_all: $n checkpoints of $ckdir (list in $list)" >&2
exec sbatch --parsable --array="0-$((n - 1))" "${opts[@]}" "$here/eval.sbatch" "$job" "@$list" "$@"
