#!/usr/bin/env bash
# --plan N: the tiny job with 4 layers on 4 processes lists every layout (1, 2 and 4 stages; ZeRO
# 0 and 1 where there are several replicas; both schedules; interleaved 1F1B with 2 chunks per
# stage where it applies, recommended like the others: the trainer runs it) at the job's global
# batch, best first; each layout's memory is what --dry-run prints for it; the bubble and the
# estimated time are the textbook ones, (pp - 1) / (m + pp - 1) and layers/pp x 3 x (m + pp - 1)
# (interleaved: (pp - 1) / (v m + pp - 1) and layers/(pp v) x 3 x (v m + pp - 1)); a device limit
# lists the layouts that do not fit last; it runs under mpirun -np 2 as well; and a bad N is
# refused naming --plan. Usage: bash tests/mpi/test_plan.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
train=$build/qwen3-train job=$build/jobs/tiny.pb data=$build/data/tiny.h5
require "$train" "$job" "$data"

# the tiny job: 2 micro-batches of 8 sequences per replica, so 64 sequences on 4 replicas
common=(--set model.num_layers=4 --set data.train="$data")
layers=4 global=64 micro_batch_size=8

check() {   # check STATUS NAME [DETAIL]: result, from a command's exit status
  local status=$1
  shift
  result $((status == 0)) "$@"
}

# recommends PP ZERO SCHEDULE PLAN: PLAN's recommended command runs that layout
recommends() {
  grep -qF "recommended: mpirun -np 4 qwen3-train $job --set parallel.pipeline_stages=$1 --set \
parallel.zero=$2 --set parallel.schedule=$3 " "$4"
}

# the table rows of a plan with one chunk per stage: "pp dp zero schedule m weights activations
# largest bubble peak time fits" (fits 0 on a row marked "does not fit"); all_rows: every row,
# with the chunks per stage (parallel.virtual_stages) last
all_rows() {
  awk '$1 ~ /^[0-9]+\.$/ { print $2, $3, $4, $5, $6, $7, $9, $11, $13, $14, $15,
                                 ($0 ~ /does not fit/) ? 0 : 1, $16 }' "$1"
}
rows() { all_rows "$1" | awk '$13 == 1 { $13 = ""; sub(/ $/, ""); print }'; }

# --- every layout, the numbers of the model -------------------------------------------------
plan=$work/plan4
if timeout 60 "$train" "$job" "${common[@]}" --plan 4 >"$plan" 2>&1; then
  pass "--plan 4 ran"
else
  fail "--plan 4 failed"
  cat "$plan"
fi
rows "$plan" >"$work/rows"
listed=$(awk '{ print $1, $2, $3, $4 }' "$work/rows" | sort | tr '\n' ';')
want="1 4 0 GPIPE;1 4 0 ONE_F_ONE_B;1 4 1 GPIPE;1 4 1 ONE_F_ONE_B;"
want+="2 2 0 GPIPE;2 2 0 ONE_F_ONE_B;2 2 1 GPIPE;2 2 1 ONE_F_ONE_B;"
want+="4 1 0 GPIPE;4 1 0 ONE_F_ONE_B;"
[ "$listed" = "$want" ]
check $? "every layout of 4 processes listed once (pp x dp, zero, schedule)" "got $listed"

bad=$(awk -v g=$global -v b=$micro_batch_size '$2 * $5 * b != g' "$work/rows")
[ -z "$bad" ]
check $? "every layout keeps the global batch of $global sequences" "$bad"

# bubble (pp - 1) / (m + pp - 1) to the 3 printed decimals; peak live activations m for GPipe,
# min(pp, m) for 1F1B; time layers/pp x 3 x (m + pp - 1)
bad=$(awk -v L=$layers '{
  pp = $1; m = $5; want = (pp - 1) / (m + pp - 1); d = $9 - want; if (d < 0) d = -d
  peak = $4 == "GPIPE" ? m : (pp < m ? pp : m)
  if (d > 0.0005 || $10 != peak || $11 != L / pp * 3 * (m + pp - 1)) print }' "$work/rows")
[ -z "$bad" ]
check $? "bubble, peak live and time as the schedules promise" "$bad"
awk '$1 == 4 && $4 == "ONE_F_ONE_B" { exit !($9 == "0.273") }' "$work/rows"
check $? "1F1B with 4 stages and 8 micro-batches: bubble 3/11 = 0.273"
# interleaved 1F1B where it applies: 2 stages x 2 chunks of one layer (ZeRO 0 and 1), bubble
# (pp - 1) / (v m + pp - 1) = 1/9, time layers/(pp v) x 3 x (v m + pp - 1) = 27
all_rows "$plan" | awk '$13 > 1' >"$work/rows_v"
bad=$(awk -v L=$layers '{
  pp = $1; m = $5; v = $13; want = (pp - 1) / (v * m + pp - 1); d = $9 - want; if (d < 0) d = -d
  if ($4 != "ONE_F_ONE_B" || d > 0.0005 || $11 != L / (pp * v) * 3 * (v * m + pp - 1)) print
}' "$work/rows_v")
[ -z "$bad" ] && [ "$(wc -l <"$work/rows_v")" = 2 ] &&
  [ "$(awk '{ print $1, $13 }' "$work/rows_v" | sort -u)" = "2 2" ]
check $? "interleaved: 2 stages x 2 chunks listed with bubble 1/9 and time 27" "$bad"

# best first: the times never decrease down the table, and the recommended line runs row 1
bad=$(awk 'NR > 1 && $11 < last { print } { last = $11 }' "$work/rows")
[ -z "$bad" ]
check $? "ordered by estimated time" "$bad"
read -r pp dp zero sched m _ <"$work/rows"
recommends "$pp" "$zero" "$sched" "$plan" && grep -qF "parallel.micro_batches=$m" "$plan"
check $? "the recommended layout is the first row ($pp $dp $zero $sched $m)"

# --- the memory of each layout is what --dry-run prints for it --------------------------------
while read -r pp dp zero sched m weights acts largest _; do
  name="pp $pp zero $zero $sched"
  if ! timeout 60 $MPIRUN -np 4 "$train" "$job" "${common[@]}" --dry-run \
      --set parallel.pipeline_stages="$pp" --set parallel.zero="$zero" \
      --set parallel.schedule="$sched" --set parallel.micro_batches="$m" \
      </dev/null >"$log" 2>&1; then
    result 0 "$name: --dry-run failed"
    continue
  fi
  # the largest weights+adam and activations of the rank rows, and of their sum (rounded twice)
  got=$(awk '$1 ~ /^[0-9]+$/ && $7 == "MiB" { if ($6 > w) w = $6; if ($8 > a) a = $8
                                              if ($6 + $8 > t) t = $6 + $8 }
             END { printf "%.1f %.1f %.1f", w, a, t }' "$log")
  verdict=$(echo "$got $weights $acts $largest" | awk '{ d = $3 - $6
    print ($1 == $4 && $2 == $5 && d < 0.15 && d > -0.15) ? "ok" : "differ" }')
  [ "$verdict" = ok ]
  check $? "$name: memory as --dry-run prints it ($weights, $acts, $largest MiB)" \
    "--dry-run's largest weights+adam, activations, sum: $got"
done <"$work/rows"

# --- a device limit: the layouts over it last, marked, the recommendation among the others ----
# 11.5 MiB: above the 11.4 MiB of the ZeRO-1 2-stage and the 4-stage 1F1B layouts, below the rest
plan=$work/plan_limit
timeout 60 "$train" "$job" "${common[@]}" --plan 4 --plan-memory 0.01123 >"$plan" 2>&1
rows "$plan" >"$work/rows_limit"
bad=$(awk '{ over = $8 > 11.5; if ($12 == over || ($12 && seen_over)) print
            if (over) seen_over = 1 }' "$work/rows_limit")
[ -z "$bad" ] && [ "$(awk '$12' "$work/rows_limit" | wc -l)" = 2 ] &&
  [ "$(wc -l <"$work/rows_limit")" = 10 ]
check $? "--plan-memory 0.01123: 2 layouts fit, 8 marked \"does not fit\" and last" "$bad"
read -r pp dp zero sched _ <"$work/rows_limit"
recommends "$pp" "$zero" "$sched" "$plan" &&
  [ "$pp" = 2 ] && [ "$zero" = 1 ]
check $? "with the limit the 2-stage ZeRO-1 layout is recommended (got pp $pp zero $zero)"
timeout 60 "$train" "$job" "${common[@]}" --plan 4 --plan-memory 0.001 >"$log" 2>&1 &&
  grep -q "no layout fits" "$log" && ! grep -q recommended "$log"
check $? "--plan-memory 0.001: no layout fits, none recommended"

# --- under mpirun: one table, nothing run ------------------------------------------------------
timeout 60 $MPIRUN -np 2 "$train" "$job" "${common[@]}" --plan 4 >"$log" 2>&1 &&
  [ "$(grep -c '^plan for 4 processes' "$log")" = 1 ] && [ "$(rows "$log" | wc -l)" = 10 ]
check $? "mpirun -np 2 --plan 4: rank 0 prints the one table"

# --- refusals ------------------------------------------------------------------------------------
for n in 0 x 4097 -3 2x ""; do
  timeout 60 "$train" "$job" "${common[@]}" --plan "$n" >"$log" 2>&1
  rc=$?
  [ $rc -ne 0 ] &&
    grep -qF -- "--plan expects a number of processes in [1, 4096], got '$n'" "$log" &&
    ! grep -q "^plan for" "$log"
  check $? "--plan '$n' refused naming --plan (exit $rc)"
done
timeout 60 "$train" "$job" "${common[@]}" --plan-memory 80 >"$log" 2>&1
[ $? -ne 0 ] && grep -qF -- "--plan-memory is for --plan N" "$log"
check $? "--plan-memory without --plan refused"
timeout 60 "$train" "$job" "${common[@]}" --plan 4 --plan-memory lots >"$log" 2>&1
[ $? -ne 0 ] && grep -qF -- "--plan-memory expects the GiB of one device" "$log"
check $? "--plan-memory lots refused"
timeout 60 "$train" "$job" --plan 4 --set model.num_kv_heads=3 >"$log" 2>&1
[ $? -ne 0 ] && grep -qF "must be a multiple of model.num_kv_heads" "$log" &&
  ! grep -q "^plan for" "$log"
check $? "an invalid job is refused as --dry-run refuses it"

finish
