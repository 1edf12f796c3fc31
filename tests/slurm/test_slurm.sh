#!/usr/bin/env bash
# The batch scripts of jobs/slurm/ on a real Slurm: munged, slurmctld and slurmd as a one-node
# cluster in a temporary folder (tests/slurm/cluster.sh), the tiny job on 2 tasks (2 pipeline
# stages), each run compared with one uninterrupted mpirun run of the same job:
# - train.sbatch under srun --mpi=pmix: SIGTERM to the batch shell only, as --signal=B:TERM@N sends
#   it (scancel --batch): the script passes it on, the ranks checkpoint at the step reached and
#   exit 0, the script requeues the job, the next run resumes from that step;
# - train.sbatch under mpirun: scontrol requeue (SIGTERM to every process of the job): the ranks
#   checkpoint, Slurm requeues the job, the next run resumes from that step;
# - both end COMPLETED, their metrics.jsonl (trimmed and continued on resume) holding exactly the
#   losses, gradient norms and validation loss of the uninterrupted run, bit for bit;
# - eval.sbatch with --dependency=afterok on the second (submitted while it runs, started after
#   it ended, through both of its runs) reproduces the training's final validation loss from
#   the checkpoint; eval_all.sh --dependency=afterok on the first evaluates each checkpoint it
#   kept as a job array;
# - under mpirun again, with a stand-in rank that takes 3 s to save (slow_save_rank.sh): scontrol
#   requeue leaves it that time.
# Every wait has a limit; every daemon stops at exit, failed or not. Slurm missing is a failure.
# Usage: bash tests/slurm/test_slurm.sh BUILD_DIR (as root, from the repository root)
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"
missing=""
for b in munged slurmctld slurmd sbatch scontrol squeue scancel srun; do
  command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || missing="$missing $b"
done
if [ -n "$missing" ]; then
  echo "FAIL Slurm is not installed (not found:$missing): apt-get install slurm-wlm munge" \
    "(scripts/setup.sh --tests installs them)"
  echo "0 passed, 1 failed"
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "FAIL must run as root (it starts munged, slurmctld and slurmd)"
  echo "0 passed, 1 failed"
  exit 1
fi
source tests/slurm/cluster.sh
# QWEN3_KEEP_WORK=1 keeps the folder (job outputs, daemon logs) for a look after a failure
trap 'cluster_stop; if [ -n "${QWEN3_KEEP_WORK:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi' EXIT
trap 'echo "FAIL interrupted"; exit 1' INT TERM HUP

steps=150
tiny=(--set data.train="$data" --set data.valid="$data" --set eval.valid_batches=1
      --set parallel.pipeline_stages=2 --set train.steps=$steps --set train.log_every=1
      --set checkpoint.every=50 --set checkpoint.keep_last=3)
small=(--ntasks-per-node=2 --gpus-per-node=0 --time=10)   # the scripts ask for 8 GPUs

# numbers FILE: each step's loss, learning rate and gradient norm, and the validation loss, of a
# metrics.jsonl
numbers() {
  grep -o '"step":[0-9]*,"\(loss":[^,]*,"lr":[^,]*,"grad_norm":[^,]*\|val_loss":[^,]*\)' "$1" 2>/dev/null
}
# upto SECONDS COMMAND...: cluster_wait, within what is left of the test's 240 s for jobs
upto() {
  local left=$((deadline - SECONDS)) n=$1
  shift
  [ "$left" -lt "$n" ] && n=$left
  [ "$n" -gt 0 ] && cluster_wait "$n" "$@"
}
# lines N FILE: true once FILE has N lines (a run's progress in metrics.jsonl)
lines() { [ "$(cat "$2" 2>/dev/null | wc -l)" -ge "$1" ]; }
# field ID NAME: a field of `scontrol show job`
field() { scontrol show job "$1" 2>/dev/null | grep -o "\b$2=[^ ]*" | head -n 1 | cut -d= -f2; }
# ended ID: true once the job is in a final state (a requeued job passes through PENDING)
ended() {
  case $(field "$1" JobState) in
    COMPLETED | FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE) return 0 ;;
  esac
  return 1
}
# job_ok NAME ID RESTARTS: COMPLETED with exit code 0:0 after RESTARTS restarts
job_ok() {
  local state code restarts
  state=$(field "$2" JobState) code=$(field "$2" ExitCode) restarts=$(field "$2" Restarts)
  ok=0
  [ "$state" = COMPLETED ] && [ "$code" = 0:0 ] && [ "$restarts" = "$3" ] && ok=1
  result $ok "$1: COMPLETED, exit 0:0, restarts $3" \
    "state ${state:-?}, exit ${code:-?}, restarts ${restarts:-?}"
}

# --- the uninterrupted run (mpirun, no Slurm) ----------------------------------------------
timeout 120 $MPIRUN -np 2 "$train" "$job" "${tiny[@]}" --set output_dir="$work/ref" >"$log" 2>&1
rc=$?
ref=$(numbers "$work/ref/metrics.jsonl")
ok=0
[ $rc = 0 ] && [ "$(echo "$ref" | grep -c '"loss"')" = $steps ] && echo "$ref" | grep -q val_loss && ok=1
result $ok "reference: $steps steps and a validation under mpirun, no Slurm" "exit $rc"

# --- the cluster ---------------------------------------------------------------------------
mkdir -p "$work/cluster"
t0=$SECONDS
if cluster_start "$work/cluster" 2>"$log"; then
  pass "munged, slurmctld and slurmd up, the node idle ($((SECONDS - t0)) s, $(nproc --all) CPUs, $cluster_addr)"
else
  result 0 "starting the cluster"
  finish
  exit 1
fi
export QWEN3_TRAIN=$train
deadline=$((SECONDS + 240))

# job 1 (srun) and job 2 (mpirun) train; job 3 evaluates job 2's last checkpoint after it; job 4
# waits for job 1, then submits an array over job 1's checkpoints
: >"$log"
j1=$(sbatch --parsable "${small[@]}" -J srun-train -o "$work/j1.out" \
  jobs/slurm/train.sbatch "$job" "${tiny[@]}" --set output_dir="$work/j1" 2>>"$log")
j2=$(QWEN3_LAUNCHER=mpirun sbatch --parsable "${small[@]}" -J mpirun-train -o "$work/j2.out" \
  jobs/slurm/train.sbatch "$job" "${tiny[@]}" --set output_dir="$work/j2" 2>>"$log")
j3=$(sbatch --parsable "${small[@]}" -J eval-latest -o "$work/j3.out" --dependency=afterok:"$j2" \
  jobs/slurm/eval.sbatch "$job" "$work/j2/checkpoints" "${tiny[@]}" 2>>"$log")
j4=$(bash jobs/slurm/eval_all.sh "${small[@]}" --output="$work/array-%A_%a.out" \
  --dependency=afterok:"$j1" "$work/j1/checkpoints" "$job" "${tiny[@]}" 2>>"$log")
ok=0
[ -n "$j1" ] && [ -n "$j2" ] && [ -n "$j3" ] && [ -n "$j4" ] && ok=1
result $ok "sbatch: train (srun) $j1, train (mpirun) $j2, eval afterok:$j2 $j3, eval_all afterok:$j1 $j4"

# --- the interruptions, each once its run is some way in ------------------------------------
# steps_in FILE: the steps logged in a metrics.jsonl
steps_in() { grep -c '"loss"' "$1" 2>/dev/null; }
ok=0
upto 60 lines 30 "$work/j1/metrics.jsonl" && scancel --batch --signal=TERM "$j1" && ok=1
s1=$(steps_in "$work/j1/metrics.jsonl")
result $ok "job $j1 (srun): SIGTERM to the batch shell only (scancel --batch) after $s1 steps"
ok=0
upto 90 lines 30 "$work/j2/metrics.jsonl" && [ "$(field "$j3" Reason)" = Dependency ] &&
  scontrol requeue "$j2" && ok=1
s2=$(steps_in "$work/j2/metrics.jsonl")
result $ok "job $j2 (mpirun): scontrol requeue after $s2 steps (job $j3 waiting on it)"
# job 1's next run, once some way in: preempted by a job of partition urgent (GraceTime:
# SIGTERM to the tasks of srun steps only)
again() { [ "$(field "$j1" Restarts)" = 1 ] && [ "$(field "$j1" JobState)" = RUNNING ] && lines 60 "$work/j1/metrics.jsonl"; }
ok=0 j5=""
upto 90 again && j5=$(sbatch --parsable -p urgent -n 2 -J urgent -o "$work/j5.out" --wrap "sleep 1") && ok=1
s3=$(steps_in "$work/j1/metrics.jsonl")
result $ok "job $j1 (srun), next run: preempted by job ${j5:-?} of a higher partition after $s3 steps"

upto 150 ended "$j2"
upto 60 ended "$j1"
upto 60 ended "$j3"

# check NAME ID OUT SAID MIN...: job ID completed after one restart for each MIN; run i stopped
# on its signal at a step >= MIN_i with a checkpoint and run i+1 resumed from that very step
# (SAID 1: the output says so, which mpirun's does not: it stops passing on the ranks' output
# once it gets SIGTERM itself); and metrics.jsonl holds the numbers of the uninterrupted run
check() {
  local name=$1 id=$2 out=$3 said=$4 n got i=0 prev=0
  shift 4
  job_ok "$name" "$id" $#
  for min in "$@"; do
    i=$((i + 1))
    n=$(grep -o "resuming from $work/$out/checkpoints/step_[0-9]*" "$work/$out.out" | sed -n "${i}p" | sed 's/.*step_0*//')
    ok=0
    [ -n "$n" ] && [ "$n" -ge "${min:-0}" ] && [ "$n" -gt "$prev" ] &&
      grep -q "resumed at step $n " "$work/$out.out" && ok=1
    # the signal's checkpoint, not a periodic one: the output says so, or (mpirun, interrupted
    # near step 30) it is not one of the periodic steps
    if [ "$said" = 1 ]; then
      grep -q "stopped by a signal after step $n; checkpoint saved" "$work/$out.out" || ok=0
    else
      [ $((n % 50)) != 0 ] || ok=0
    fi
    log=$work/$out.out result $ok "$name: run $i saved a checkpoint at step ${n:-?} on the signal (sent after step $min), run $((i + 1)) resumed from it"
    prev=${n:-0}
  done
  got=$(numbers "$work/$out/metrics.jsonl")
  ok=0
  [ "$got" = "$ref" ] && ok=1
  result $ok "$name: metrics.jsonl = the uninterrupted run's, bit for bit ($(echo "$got" | grep -c '"loss"') steps and the validation)" \
    "$(diff <(echo "$ref") <(echo "$got") | head -n 4 | tr '\n' ';')"
}
check "srun" "$j1" j1 1 "$s1" "$s3"
ok=0
[ "$(grep -c "slurm: the ranks checkpointed on a signal; requeueing job $j1" "$work/j1.out")" = 2 ] && ok=1
log=$work/j1.out result $ok "srun: the batch script requeued its job after each stop (SIGTERM to it; preemption)"
check "mpirun" "$j2" j2 0 "$s2"

# --- the evaluation after job 2 --------------------------------------------------------------
job_ok "eval afterok" "$j3" 0
s3=$(date -d "$(field "$j3" StartTime)" +%s 2>/dev/null)
e2=$(date -d "$(field "$j2" EndTime)" +%s 2>/dev/null)
ok=0
[ -n "$s3" ] && [ -n "$e2" ] && [ "$s3" -ge "$e2" ] && ok=1
result $ok "eval afterok: started after the training's last run ended"
v_ref=$(echo "$ref" | grep val_loss)
v3=$(numbers "$work/j2/eval/step_$(printf %08d $steps)/metrics.jsonl")
ok=0
[ -n "$v3" ] && [ "$v3" = "$v_ref" ] && ok=1
log=$work/j3.out result $ok "eval afterok: the checkpoint of step $steps gives the training's validation loss (${v3:-none})" \
  "the training's: $v_ref"

# --- the job array after job 1: each checkpoint job 1 kept -----------------------------------
upto 60 ended "$j4"
arr=$(tail -n 1 "$work/j1/eval-all-$j4.out" 2>/dev/null | grep -x '[0-9]*')
upto 60 eval '[ -n "$arr" ] && [ -z "$(squeue -h -j "$arr" 2>/dev/null)" ]'
completed=0
[ -n "$arr" ] && completed=$(scontrol show job "$arr" 2>/dev/null | grep -c 'JobState=COMPLETED')
ok=1 seen=""
for d in "$work"/j1/checkpoints/step_*; do
  s=${d##*step_}
  numbers "$work/j1/eval/step_$s/metrics.jsonl" | grep -q "^\"step\":$((10#$s)),\"val_loss\"" || ok=0
  seen="$seen $((10#$s))"
done
[ "$completed" = 3 ] && [ "$(echo $seen | wc -w)" = 3 ] || ok=0
log=$work/j1/eval-all-$j4.out result $ok \
  "eval_all afterok: job array ${arr:-?} evaluated each checkpoint kept (steps$seen; $completed tasks COMPLETED)"

# --- mpirun leaves the ranks time to save after its own SIGTERM -------------------------------
# (the tiny job saves in milliseconds, within mpirun's default second before it kills its ranks;
# a stand-in rank takes 3 s)
mkdir -p "$work/slow"
j6=$(QWEN3_LAUNCHER=mpirun QWEN3_TRAIN=tests/slurm/slow_save_rank.sh QWEN3_FAKE_DIR=$work/slow \
  sbatch --parsable "${small[@]}" -J slow-save -o "$work/j6.out" jobs/slurm/train.sbatch x.pb 2>"$log")
ok=0
upto 60 eval '[ -e "$work/slow/ready.0" ] && [ -e "$work/slow/ready.1" ]' && scontrol requeue "$j6" &&
  upto 60 ended "$j6" && [ -e "$work/slow/saved.0" ] && [ -e "$work/slow/saved.1" ] &&
  [ "$(field "$j6" Restarts)" = 1 ] && [ "$(field "$j6" JobState)" = COMPLETED ] && ok=1
log=$work/j6.out result $ok "mpirun, scontrol requeue: ranks that take 3 s to save get them (QWEN3_SAVE_GRACE), the job requeued and completed"

finish
