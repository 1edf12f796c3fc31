#!/usr/bin/env bash
# Stands in for qwen3-train in tests/slurm/test_slurm.sh where a real save would be too quick to
# tell: a rank whose "checkpoint" takes 3 s after SIGTERM or SIGUSR1 (a second signal does not cut
# it short), then writes saved.RANK and exits 0; run again after that, it exits at once. Files in
# QWEN3_FAKE_DIR; arguments are ignored. Only bash builtins while it waits: Slurm's SIGTERM goes to
# every process of the job, a `sleep` included.
dir=${QWEN3_FAKE_DIR:?}
r=${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-0}}
[ -e "$dir/saved.$r" ] && { echo "rank $r: saved before, nothing to do"; exit 0; }
[ -e "$dir/ready.$r" ] && { echo "rank $r: the previous run was killed before it saved"; exit 1; }
stop=0
trap 'stop=1' TERM USR1
mkfifo "$dir/fifo.$r" && exec 9<>"$dir/fifo.$r" || exit 1   # read -t on it: a sleep, no process
touch "$dir/ready.$r"
end=$((SECONDS + 60))
while [ "$SECONDS" -lt "$end" ] && [ "$stop" = 0 ]; do read -r -t 0.1 -u 9 _; done
[ "$stop" = 1 ] || { echo "rank $r: no signal within 60 s"; exit 1; }
end=$((SECONDS + 3))
while [ "$SECONDS" -lt "$end" ]; do read -r -t 0.2 -u 9 _; done
touch "$dir/saved.$r"
echo "rank $r: saved in 3 s after the signal"
