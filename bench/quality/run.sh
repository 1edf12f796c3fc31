#!/usr/bin/env bash
# Quality at size (issue "NVFP4 on the GPU", part 6) in one device call: a Qwen3-0.6B-shaped
# model from random init (jobs/quality_0p6b.txtpb) trained with BF16 linears and with NVFP4 (the
# default recipe) on the same tokens in the same order, the validation loss every few steps.
#   device run, kind nvidia-h200, carry [".deb", "third_party"], timeout_s 600:
#     bash bench/quality/run.sh
# third_party/ holds the tokenizer (scripts/fetch_tokenizer.sh); .deb/ the build's packages
# (bench/NOTES.md). In order, each part under a deadline and the whole under QUALITY_TOTAL_S:
#   build         bench/device_build.sh (~30-60 s)
#   corpus        bench/quality/prepare_corpus.py: .py files of site-packages, split by package,
#                 QUALITY_TRAIN_MB / QUALITY_VALID_MB of text, tokenized on every core (~10 s)
#   calibration   NVFP4, then BF16: a few steps and one short evaluation each, for the seconds
#                 of start-up, a step and an evaluation (~15 s each; skipped when QUALITY_STEPS
#                 is given)
#   BF16, NVFP4   the same steps each: the most for which both runs fit what is left
#                 (bench/quality/train_run.py plan); an evaluation every steps / QUALITY_EVALS
#   report        bench/quality/report.py: CSV, PNG plot, the table (last)
# Everything printed goes to $OUT/quality.txt; the CSV and plot to $OUT (copy them into
# bench/results/); trainer logs, metrics and the corpus manifest to $OUT/logs.tgz.
#
# Two GPUs (nvidia-h200-x2): QUALITY_RANKS=2 trains each run data-parallel on both, twice the
# tokens a call; the global batch is then RANKS x MB sequences.
# One call per precision, for more tokens than two runs sharing one call can reach: the same
# QUALITY_STEPS (and corpus settings) in two calls, QUALITY_ONLY=BF16 in one and
# QUALITY_ONLY=NVFP4 in the other; each call's logs.tgz holds its run (bf16/ or nvfp4/), and the
# report comes from both, here (the two corpus.json must be the same file: cmp them first):
#   mkdir -p /tmp/q/a /tmp/q/b && tar -xzf CALL_A/logs.tgz -C /tmp/q/a && tar -xzf CALL_B/logs.tgz -C /tmp/q/b
#   cmp /tmp/q/a/corpus/corpus.json /tmp/q/b/corpus/corpus.json
#   python3 bench/quality/report.py --bf16 /tmp/q/a/bf16 --nvfp4 /tmp/q/b/nvfp4 --out-dir bench/results \
#     --name quality_0p6b --card h200 --corpus /tmp/q/a/corpus/corpus.json
#
# A variant of one precision against a run already made (one call instead of two): session 9's
# runs (QUALITY_RANKS=2 QUALITY_STEPS=1650 QUALITY_TRAIN_MB=220 on nvidia-h200-x2) are kept in
# bench/results/quality_0p6b_h200_2026-11-30_runs/ (summary.json, metrics.jsonl.gz, corpus.json):
# gunzip a copy and pass its bf16/ (or nvfp4/) to report.py as above, after checking that the
# new call's corpus.json is the same file. E.g. NVFP4 with the base recipe (only the last 15% of
# blocks in BF16, not the default first 2 as well):
#   QUALITY_RANKS=2 QUALITY_STEPS=1650 QUALITY_TRAIN_MB=220 QUALITY_ONLY=NVFP4 \
#     QUALITY_SETS="precision.bf16_first_layers=0" QUALITY_NAME=quality_0p6b_base bash bench/quality/run.sh
# or the paper's switch to BF16 for the last part of training: QUALITY_SETS="precision.bf16_final_fraction=0.18"
#
# A tiny run of the whole pipeline on a CPU (a couple of minutes on 2 cores; build the CPU engine
# first, see QUALITY_PRESET below):
#   QUALITY_PRESET=cpu-tiny QUALITY_BUILD_DIR=build-h3 OUT=/tmp/quality_out bash bench/quality/run.sh
set -u   # not -e: a part that fails is reported, and the report shows what there is

# ---- settings (environment) -----------------------------------------------------------------
if [ "${QUALITY_PRESET:-}" = cpu-tiny ]; then
  # the shape of jobs/tiny.txtpb (4 layers, so that NVFP4 covers 3 of them) with the real
  # vocabulary, short sequences, a few MB of corpus, on the CPU backend
  : "${QUALITY_SETS:=backend=CPU model.hidden_size=64 model.num_layers=4 model.num_heads=4 model.num_kv_heads=2 model.head_dim=16 model.intermediate_size=192 optim.lr=3e-3 optim.min_lr=3e-4}"
  : "${QUALITY_SEQ:=64}" "${QUALITY_MB:=4}" "${QUALITY_TRAIN_MB:=2}" "${QUALITY_VALID_MB:=0.008}"
  : "${QUALITY_EVALS:=3}" "${QUALITY_BUILD:=0}" "${QUALITY_NAME:=quality_tiny}" "${QUALITY_TOTAL_S:=300}"
  : "${QUALITY_SECONDS_PER_RUN:=75}" "${QUALITY_CALIB_STEPS:=4}" "${QUALITY_CALIB_VALID_BATCHES:=2}"
elif [ -n "${QUALITY_PRESET:-}" ]; then
  echo "QUALITY_PRESET=$QUALITY_PRESET: unknown (cpu-tiny, or unset for the 0.6B run)" >&2
  exit 2
fi
TOTAL_S=${QUALITY_TOTAL_S:-570}          # the whole call, the build included (device limit: 600)
RESERVE_S=${QUALITY_RESERVE_S:-15}       # kept back for the report and the logs
BUILD=${QUALITY_BUILD:-1}                # 1: source bench/device_build.sh; 0: use BUILD_DIR as it is
BUILD_DIR=${QUALITY_BUILD_DIR:-build}
JOB_TEXT=${QUALITY_JOB:-jobs/quality_0p6b.txtpb}
NAME=${QUALITY_NAME:-quality_0p6b}
SETS=${QUALITY_SETS:-}                   # more "field=value ..." for both runs (shape, backend, lr)
SEQ=${QUALITY_SEQ:-2048}                 # data.seq_len
MB=${QUALITY_MB:-8}                      # data.micro_batch_size (one micro-batch per step)
RANKS=${QUALITY_RANKS:-1}                # data-parallel replicas (mpirun -np), one a GPU: a step
                                         # is RANKS x MB sequences
TRAIN_MB=${QUALITY_TRAIN_MB:-80}         # MB of .py text to train on (~23M tokens)
VALID_MB=${QUALITY_VALID_MB:-1}          # MB of .py text to validate on (~0.3M tokens)
VALID_FRACTION=${QUALITY_VALID_FRACTION:-0.02}
EVALS=${QUALITY_EVALS:-8}                # evaluations per run, the last at the last step
STEPS=${QUALITY_STEPS:-}                 # fixed steps per run; empty: from the calibration
ONLY=${QUALITY_ONLY:-}                   # BF16 or NVFP4: that run alone (needs QUALITY_STEPS)
SECONDS_PER_RUN=${QUALITY_SECONDS_PER_RUN:-}   # a cap for each run; empty: the two share what is left
WARMUP_FRAC=${QUALITY_WARMUP_FRAC:-0.1}
CALIB_STEPS=${QUALITY_CALIB_STEPS:-6}
CALIB_VALID_BATCHES=${QUALITY_CALIB_VALID_BATCHES:-4}
OUT=${OUT:-/tmp/quality_out}

source bench/bench_lib.sh
WORK=${QUALITY_WORK:-/tmp/qwen3_quality}
CORPUS=$WORK/corpus
rm -rf "$WORK"/calib_bf16 "$WORK"/calib_nvfp4 "$WORK"/bf16 "$WORK"/nvfp4   # never report an old run
mkdir -p "$WORK"

# run_train LABEL BUDGET_S LINEAR [field=value ...]: one trainer run into $WORK/LABEL
run_train() {
  local label=$1 budget=$2 linear=$3
  shift 3
  [ "$budget" = 0 ] && { echo "SKIPPED $label: no time left"; return 124; }
  local args=() kv
  for kv in $SETS "$@"; do args+=(--set "$kv"); done
  python3 bench/quality/train_run.py run --label "$label" --job "$WORK/job.pb" --out "$WORK/$label" \
    --budget "$budget" --build "$BUILD_DIR" --ranks "$RANKS" --echo-every "${ECHO_EVERY:-10}" -- \
    --set data.train="$TRAIN_SHARDS" --set data.valid="$CORPUS/valid.h5" \
    --set data.seq_len="$SEQ" --set data.micro_batch_size="$MB" --set parallel.micro_batches=1 \
    --set checkpoint.every=-1 --set checkpoint.resume=NEVER --set checkpoint.dir="$WORK/$label/checkpoints" \
    --set precision.linear="$linear" "${args[@]}"
}

main() {
  echo "# $NAME: BF16 vs NVFP4 validation loss, $(date -u '+%Y-%m-%d %H:%M UTC'); budget $TOTAL_S s"
  case "$ONLY" in
    "" | BF16 | NVFP4) ;;
    *) echo "FAILED: QUALITY_ONLY=$ONLY: expected BF16 or NVFP4 (or unset for both)"; return 1 ;;
  esac
  if [ -n "$ONLY" ] && [ -z "$STEPS" ]; then
    echo "FAILED: QUALITY_ONLY=$ONLY needs QUALITY_STEPS: the other precision's call must train the same steps"
    return 1
  fi
  echo "settings: seq $SEQ, mb $MB, ranks $RANKS, corpus $TRAIN_MB MB train / $VALID_MB MB valid, $EVALS evaluations," \
       "steps ${STEPS:-from calibration}, seconds per run ${SECONDS_PER_RUN:-what is left, shared}," \
       "extra sets: ${SETS:-none}"

  section "build"
  if [ "$BUILD" = 1 ]; then
    local t0=$(date +%s)
    source bench/device_build.sh || true   # errexit inside is ignored here: checked below
    echo "build: $(( $(date +%s) - t0 )) s"
  fi
  for f in "$BUILD_DIR/qwen3-train" "$BUILD_DIR/qwen3-prep"; do
    [ -x "$f" ] || { echo "FAILED: no $f (build it, or set QUALITY_BUILD_DIR)"; return 1; }
  done
  protoc --encode=qwen3.Job -Iproto proto/job.proto < "$JOB_TEXT" > "$WORK/job.pb" ||
    { echo "FAILED: cannot encode $JOB_TEXT"; return 1; }
  local card=cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr 'A-Z' 'a-z' |
           sed 's/^nvidia //' | awk '{print $1}')
  fi
  echo "$(nproc) cores; card for the file names: $card"

  section "corpus: .py files of site-packages, split by package, tokenized"
  within 120 python3 bench/quality/prepare_corpus.py --out "$CORPUS" --train-mb "$TRAIN_MB" \
    --valid-mb "$VALID_MB" --valid-fraction "$VALID_FRACTION" --jobs "$(nproc)" \
    --prep "$BUILD_DIR/qwen3-prep" || { echo "FAILED: the corpus (above)"; return 1; }
  TRAIN_SHARDS=$(ls "$CORPUS"/train_*.h5 | paste -sd, -)

  local plan steps warmup every log_every predicted pred_bf16="" p
  if [ -n "$STEPS" ]; then
    every=$(( STEPS / EVALS > 0 ? STEPS / EVALS : 1 ))
    steps=$STEPS warmup=$(python3 -c "print(max(1, round($STEPS * $WARMUP_FRAC)))") log_every=1
    echo "fixed: $steps steps (QUALITY_STEPS), an evaluation every $every and at the end"
  else
    # NVFP4 first: if its path fails, nothing else is worth the device time
    for p in NVFP4 BF16; do
      section "calibration, $p: $CALIB_STEPS steps, an evaluation of $CALIB_VALID_BATCHES batches"
      ECHO_EVERY=1 run_train "calib_${p,,}" "$(budget 90 30)" "$p" train.steps="$CALIB_STEPS" \
        train.log_every=1 eval.every=0 eval.valid_batches="$CALIB_VALID_BATCHES" optim.warmup_steps=1 ||
        { echo "FAILED: the $p calibration run (above); the real run would fail the same way"; return 1; }
    done
    plan=$(python3 bench/quality/train_run.py plan --calib "$WORK/calib_bf16/summary.json" \
      --calib "$WORK/calib_nvfp4/summary.json" --corpus "$CORPUS/corpus.json" \
      --seconds "$(( $(left) - 5 ))" --per-run "${SECONDS_PER_RUN:-0}" --evals "$EVALS" \
      --calib-valid-batches "$CALIB_VALID_BATCHES" --mb "$MB" --seq "$SEQ" --ranks "$RANKS" \
      --warmup-frac "$WARMUP_FRAC") ||
      return 1
    read -r steps warmup every log_every predicted <<< "$plan"
    pred_bf16=$(tr ' ' '\n' <<< "$predicted" | sed -n 's/^calib_bf16=//p')
  fi
  local sets=(train.steps="$steps" optim.warmup_steps="$warmup" eval.every="$every"
              train.log_every="$log_every" eval.valid_batches=0)

  if [ -n "$ONLY" ]; then   # one precision, the whole call's time
    section "$ONLY alone: $steps steps, evaluation every $every (deadline $(left) s)"
    ECHO_EVERY=$every run_train "${ONLY,,}" "$(budget "$(left)" 10)" "$ONLY" "${sets[@]}"
    tar -czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.h5' --exclude='checkpoints' --exclude='*.pb' . 2>/dev/null
    echo "run finished at $(( $(date +%s) - start )) s of $TOTAL_S; the report needs the other"
    echo "precision's call too (the top of bench/quality/run.sh says how)"
    return 0
  fi
  # BF16 first, with its predicted time and a fifth more (or its share of what is left); the
  # NVFP4 run then has whatever is left
  local bf16_s=${pred_bf16:+$(( pred_bf16 * 6 / 5 + 10 ))}
  bf16_s=${bf16_s:-${SECONDS_PER_RUN:-$(( ($(left) - 5) / 2 ))}}
  section "BF16: $steps steps, evaluation every $every (deadline $bf16_s s)"
  ECHO_EVERY=$every run_train bf16 "$(budget "$bf16_s" 10)" BF16 "${sets[@]}"
  section "NVFP4: $steps steps, evaluation every $every (deadline $(left) s)"
  ECHO_EVERY=$every run_train nvfp4 "$(budget "$(left)" 10)" NVFP4 "${sets[@]}"

  section "report"
  tar -czf "$OUT/logs.tgz" -C "$WORK" --exclude='*.h5' --exclude='checkpoints' --exclude='*.pb' . 2>/dev/null
  echo "runs finished at $(( $(date +%s) - start )) s of $TOTAL_S"
  python3 bench/quality/report.py --bf16 "$WORK/bf16" --nvfp4 "$WORK/nvfp4" --out-dir "${QUALITY_REPORT_DIR:-$OUT}" \
    --name "$NAME" --card "$card" --corpus "$CORPUS/corpus.json"
}

main 2>&1 | tee "$OUT/quality.txt"
