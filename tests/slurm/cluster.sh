# A one-node Slurm cluster in a folder, for tests and for trying jobs/slurm/ by hand (as root):
#   source tests/slurm/cluster.sh; cluster_start DIR; sbatch ...; cluster_stop
# cluster_start writes DIR/slurm.conf and a munge key, starts munged, slurmctld and slurmd in the
# foreground of background processes of this shell (so that their pids are known), reached at
# a loopback address (bound to it alone where the machine's name resolves to one), and exports
# SLURM_CONF for the clients. cluster_stop cancels every job, waits
# for them to end, then stops the daemons, and kills by pid whatever slurmstepd (and the job
# processes under it) this cluster left. Settings as in ../shared/REFERENCE.md "Slurm on one
# Debian machine": no systemd or cgroups, SlurmUser root, a fast scheduler, a short credential
# lifetime (a requeued job starts again after about cred_expire seconds), KillWait 10 s (SIGKILL
# that long after SIGTERM). A job in partition `urgent` preempts those of `debug` (the default):
# SIGTERM to their srun steps' tasks, a GraceTime of 30 s, then requeue.

cluster_dir="" cluster_pids=() cluster_addr=""

# cluster_free_port: a TCP port nothing listens on at 127.0.0.1 (two in a row: SlurmctldPort may
# name a range)
cluster_free_port() {
  local p i
  for i in $(seq 50); do
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && continue
    (exec 3<>/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null && continue
    echo "$p"
    return 0
  done
  return 1
}

# cluster_wait SECONDS COMMAND...: until COMMAND succeeds (every 0.1 s); 1 after SECONDS
cluster_wait() {
  local n=$(($1 * 10))
  shift
  while [ "$n" -gt 0 ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
    n=$((n - 1))
  done
  return 1
}

# cluster_start DIR: 0 once the node is idle; 1 with a message on stderr otherwise
cluster_start() {
  local d=$1 b host cpus ctl_port d_port
  for b in munged slurmctld slurmd sbatch scontrol squeue scancel srun; do
    command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || {
      echo "cluster: $b not found: install Slurm and munge (apt-get install slurm-wlm munge;" \
        "scripts/setup.sh --tests does)" >&2
      return 1
    }
  done
  [ "$(id -u)" = 0 ] || { echo "cluster: must run as root (SlurmUser=root, munged)" >&2; return 1; }
  export PATH=$PATH:/usr/sbin
  cluster_dir=$(cd "$d" && pwd)
  d=$cluster_dir
  mkdir -p "$d/munge" "$d/state" "$d/spool" "$d/log"
  chmod 755 "$d/munge"
  dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$d/munge/munge.key"
  host=$(hostname -s)
  cpus=$(nproc --all)   # not nproc: it follows OMP_NUM_THREADS
  # The daemons bind the address this machine's name resolves to (NoCtldInAddrAny,NoInAddrAny)
  # when that is a loopback one (127.0.1.1 on Debian); where it is not (a container's own
  # address), they bind any address and the clients still reach them at 127.0.0.1.
  cluster_addr=$(getent ahostsv4 "$(hostname)" 2>/dev/null | awk 'NR == 1 { print $1 }')
  local comm="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  case $cluster_addr in
    127.*) ;;
    *) cluster_addr=127.0.0.1 comm="" ;;
  esac
  ctl_port=$(cluster_free_port) && d_port=$(cluster_free_port) || {
    echo "cluster: no free port found" >&2
    return 1
  }
  cat >"$d/slurm.conf" <<CONF
ClusterName=qwen3test
SlurmctldHost=$host($cluster_addr)
SlurmctldPort=$ctl_port
SlurmdPort=$d_port
$comm
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.socket,cred_expire=5
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/log/slurmctld.log
SlurmdLogFile=$d/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=$host NodeAddr=$cluster_addr CPUs=$cpus State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
  export SLURM_CONF=$d/slurm.conf
  munged --foreground --force --key-file="$d/munge/munge.key" --socket="$d/munge/munge.socket" \
    --pid-file="$d/munge/munged.pid" --log-file="$d/log/munged.log" \
    --seed-file="$d/munge/munged.seed" >>"$d/log/munged.out" 2>&1 &
  cluster_pids+=($!)
  cluster_wait 10 test -S "$d/munge/munge.socket" || {
    echo "cluster: munged did not start:" >&2
    tail -n 5 "$d/log/munged.log" "$d/log/munged.out" >&2
    return 1
  }
  slurmctld -D -i -f "$d/slurm.conf" >>"$d/log/slurmctld.out" 2>&1 &
  cluster_pids+=($!)
  slurmd -D -f "$d/slurm.conf" >>"$d/log/slurmd.out" 2>&1 &
  cluster_pids+=($!)
  cluster_wait 30 cluster_node_idle || {
    echo "cluster: the node did not become idle within 30 s:" >&2
    scontrol show node >&2 2>&1
    tail -n 5 "$d/log/slurmctld.log" "$d/log/slurmd.log" >&2
    return 1
  }
}

cluster_node_idle() { sinfo -h -o %T 2>/dev/null | grep -qx idle; }

# cluster_descendants PID: every process under PID, deepest first
cluster_descendants() {
  local p
  for p in $(pgrep -P "$1"); do
    cluster_descendants "$p"
    echo "$p"
  done
}

# cluster_stepds: the slurmstepd processes of this cluster (slurmd passes SLURM_CONF on to them)
cluster_stepds() {
  local s
  for s in $(pgrep -x slurmstepd); do
    tr '\0' '\n' 2>/dev/null <"/proc/$s/environ" | grep -qxF "SLURM_CONF=$cluster_dir/slurm.conf" &&
      echo "$s"
  done
}

# cluster_stop: safe to call twice, and when cluster_start failed half-way
cluster_stop() {
  local p s
  [ -n "$cluster_dir" ] || return 0
  if [ -n "${SLURM_CONF:-}" ] && scontrol ping >/dev/null 2>&1; then
    scancel --full --quiet --signal=KILL -u root 2>/dev/null
    scancel --quiet -u root 2>/dev/null
    # jobs end within seconds (KillWait applies only to processes that ignore SIGTERM)
    cluster_wait 15 test -z "$(squeue -h -o %i 2>/dev/null)"
  fi
  # what is left of its jobs (slurmstepd outlives slurmd), with the processes under it
  for s in $(cluster_stepds); do
    for p in $(cluster_descendants "$s") "$s"; do kill -KILL "$p" 2>/dev/null; done
  done
  for p in "${cluster_pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${cluster_pids[@]}"; do
    cluster_wait 10 eval "! kill -0 $p" || kill -KILL "$p" 2>/dev/null
    wait "$p" 2>/dev/null
  done
  # an ended slurmstepd stays a zombie (no environment left to tell whose) until init reaps
  # it, within a second or so
  cluster_wait 5 eval '[ -z "$(cluster_stepds)" ] && ! ps -C slurmstepd -o stat= | grep -q "^Z"'
  cluster_pids=()
  cluster_dir=""
}
