# Sourced by the batch scripts of jobs/slurm/ (which cd to the submission directory, the
# repository root, first). It starts qwen3-train on every task of the allocation and passes the
# signals Slurm sends to the batch shell on to the ranks.
#
# Launcher (QWEN3_LAUNCHER=auto|srun|mpirun, auto by default): `srun --mpi=pmix` when this Slurm
# has the PMIx plugin (`srun --mpi=list`), `mpirun` inside the allocation otherwise (Open MPI
# reads the allocation from Slurm's environment).
#
# Signals. qwen3-train treats SIGTERM and SIGUSR1 alike: every rank finishes the step, the ranks
# checkpoint, and exit 0. What reaches the ranks depends on who sends what:
# - `--signal=B:TERM@N` (N seconds before the time limit) and `scancel --batch` signal the batch
#   shell only: the trap below forwards SIGUSR1 to srun or mpirun, which pass it to every rank.
#   SIGUSR1 rather than SIGTERM because srun answers its own SIGTERM by killing its tasks at once
#   ("forcing job termination") and mpirun by aborting the job (SIGKILL to the ranks
#   odls_base_sigkill_timeout seconds later); both forward SIGUSR1 untouched.
# - `scontrol requeue`, preemption without GraceTime, `scancel` and the time limit itself send
#   SIGTERM to every process of the job, launchers included, and SIGKILL KillWait seconds later
#   (slurm.conf, 30 s by default). The ranks get it directly; under mpirun they have
#   QWEN3_SAVE_GRACE seconds (300 unless set; KillWait still bounds it) before mpirun's abort
#   kills them, and mpirun, which lingers that long, is ended once its ranks are gone. srun kills
#   its tasks at once: that run continues from the last periodic checkpoint (checkpoint.every).
# - Preemption with a GraceTime and `scancel --signal=TERM` signal the tasks of srun steps only:
#   under srun the ranks save (train.sbatch then requeues a preempted job: qwen3_interrupted);
#   under mpirun nothing reaches them until the grace ends (PreemptParameters=send_user_signal
#   sends the job's --signal to the batch shell at once instead, which works for both).
# README.md "Running under Slurm" has this as a table; tests/slurm/test_slurm.sh runs three rows.

# qwen3_env: defaults for the ranks' environment (each only when not set already)
qwen3_env() {
  # CPU threads per rank: the task's share; a run is bit-reproducible only with the same count
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}
  # NCCL (tensors between GPUs, comm/comm_nccl.c): warnings only; NVLink SHARP (multicast) off,
  # as on the machines this was developed on (set NCCL_NVLS_ENABLE=1 where you own the node);
  # QWEN3_COMM_TIMEOUT_S bounds every wait for a peer. Network selection (NCCL_SOCKET_IFNAME,
  # NCCL_IB_HCA) is the site's: set it in the submitting environment, which sbatch passes on.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export QWEN3_COMM_TIMEOUT_S=${QWEN3_COMM_TIMEOUT_S:-600}
}

# qwen3_launcher: prints srun or mpirun
qwen3_launcher() {
  case ${QWEN3_LAUNCHER:-auto} in
    srun | mpirun) echo "$QWEN3_LAUNCHER" ;;
    auto)
      if srun --mpi=list 2>&1 | grep -qw pmix; then echo srun; else echo mpirun; fi ;;
    *)
      echo "slurm: QWEN3_LAUNCHER=$QWEN3_LAUNCHER: expected auto, srun or mpirun" >&2
      return 1 ;;
  esac
}

# qwen3_launch_cmd: fills the array qwen3_cmd with the launcher and its options
qwen3_launch_cmd() {
  qwen3_launcher=$(qwen3_launcher) || return 1
  if [ "$qwen3_launcher" = srun ]; then
    qwen3_cmd=(srun --mpi=pmix --kill-on-bad-exit=1)
  else
    # no binding: a rank uses OMP_NUM_THREADS cores; mpirun would pin each to one
    qwen3_cmd=(mpirun -np "${SLURM_NTASKS:-1}" --bind-to none)
  fi
}

qwen3_signals=0      # signals the batch shell caught
qwen3_watcher=""

# qwen3_forward SIG: the trap
qwen3_forward() {
  qwen3_signals=$((qwen3_signals + 1))
  echo "slurm: SIG$1 at $(date '+%F %T'): asking every rank to checkpoint at the next step boundary"
  kill -USR1 "$qwen3_pid" 2>/dev/null
  # an mpirun that got SIGTERM as well waits out odls_base_sigkill_timeout after its ranks exit
  if [ "$qwen3_launcher" = mpirun ] && [ -z "$qwen3_watcher" ]; then
    (
      while kill -0 "$qwen3_pid" 2>/dev/null; do
        # its ranks are its children; exited, they stay zombies until mpirun reaps them
        if ! ps -o stat= --ppid "$qwen3_pid" | grep -qv '^Z'; then
          sleep 2
          kill -0 "$qwen3_pid" 2>/dev/null || break
          echo "slurm: every rank has exited; ending mpirun"
          kill -KILL "$qwen3_pid" 2>/dev/null
          break
        fi
        sleep 0.5
      done
    ) &
    qwen3_watcher=$!
  fi
}

# qwen3_run PROGRAM ARGS...: PROGRAM on every task, in the background, signals forwarded; waits
# for it through any number of signals and leaves its exit status in qwen3_rc
qwen3_run() {
  qwen3_launch_cmd || { qwen3_rc=1; return; }
  echo "slurm: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}," \
    "${SLURM_NTASKS:-1} tasks: ${qwen3_cmd[*]} $*"
  if [ "$qwen3_launcher" = mpirun ]; then
    export OMPI_MCA_odls_base_sigkill_timeout=${OMPI_MCA_odls_base_sigkill_timeout:-${QWEN3_SAVE_GRACE:-300}}
  fi
  "${qwen3_cmd[@]}" "$@" &
  qwen3_pid=$!
  trap 'qwen3_forward TERM' TERM
  trap 'qwen3_forward USR1' USR1
  # `wait` returns early when a trap runs (status > 128): wait again. 127 after a signal: the
  # status had already been collected by the wait that the signal followed.
  local seen r prev=""
  while :; do
    seen=$qwen3_signals
    wait "$qwen3_pid"
    r=$?
    [ "$r" = 127 ] && [ -n "$prev" ] && r=$prev
    if [ "$seen" = "$qwen3_signals" ] || [ "$r" -lt 128 ]; then break; fi
    prev=$r
  done
  qwen3_rc=$r
  [ -n "$qwen3_watcher" ] && wait "$qwen3_watcher" 2>/dev/null
  echo "slurm: ${qwen3_cmd[0]} exited with status $qwen3_rc"
}

# qwen3_interrupted: true when the run was asked to stop: the batch shell caught a signal, or
# Slurm is preempting the job (a GraceTime preemption signals the tasks only)
qwen3_interrupted() {
  [ "$qwen3_signals" -gt 0 ] && return 0
  [ -n "${SLURM_JOB_ID:-}" ] &&
    scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -q 'PreemptTime=[0-9]'
}
