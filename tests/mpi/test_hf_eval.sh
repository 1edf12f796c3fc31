#!/usr/bin/env bash
# Evaluation runs against Hugging Face transformers (tests/fixtures/hf, made by
# tests/hf_fixtures.py): on 1 process and on 2 pipeline stages, with and without the KV cache,
# greedy continuations equal transformers' token for token, and the per-document scores equal
# transformers' NLL within 1e-5. Then several prompts of different lengths decoding together
# (one token of each per step) give the completions each gets alone without a cache, every
# step's logits checked against that replay (eval.check_kv); and without the check, where greedy
# decoding takes its tokens from the backend's argmax (ops.h argmax_rows, the prefill's and every
# recorded decoding step's) instead of the host's over the logits, the same completions; while
# sampling (temperature 1) still draws from the logits on the host, with the check or without.
# QWEN3_TEST_BACKEND=CUDA runs the same evaluations on the GPU (tests/gpu/test_gpu_train.sh).
# Usage: bash tests/mpi/test_hf_eval.sh BUILD_DIR
set -u
source tests/mpi/lib.sh
out=$work

cases=(tests/fixtures/hf/*/)
[ "${#cases[@]}" -ge 4 ] || fail "expected 4 fixture models in tests/fixtures/hf, found ${#cases[@]}"
for dir in "${cases[@]}"; do
  dir=${dir%/}
  name=$(basename "$dir")
  vocab=$(grep -o '"vocab_size": *[0-9]*' "$dir/config.json" | grep -o '[0-9]*$')
  if ! "$build/qwen3-prep" build --format ids --vocab-size "$vocab" --quiet --out "$out/$name.h5" \
      "$dir/documents.ids" >"$out/$name.prep.log" 2>&1; then
    fail "$name: qwen3-prep build"; cat "$out/$name.prep.log"; continue
  fi
  prompt=$(sed -n 1p "$dir/greedy.ids") expected=$(sed -n 2p "$dir/greedy.ids")
  for np in 1 2; do
    for kv in true false; do
      run="$name np$np kv=$kv"
      o="$out/$name.$np.$kv"
      if ! timeout 300 $MPIRUN -np $np "$build/qwen3-train" "$build/jobs/eval_hf.pb" \
          --set model.hf_config="$dir/config.json" --set init.hf_dir="$dir" \
          --set data.valid="$out/$name.h5" --set parallel.pipeline_stages=$np \
          --set eval.prompts.ids="$prompt" --set eval.kv_cache=$kv --set output_dir="$o" \
          --set backend="${QWEN3_TEST_BACKEND:-CPU}" \
          >"$o.log" 2>&1; then
        fail "$run: the evaluation run failed"; tail -n 15 "$o.log"; continue
      fi
      got=$(grep -o '"completion_ids":\[[^]]*\]' "$o/eval.jsonl" | grep -o '\[.*\]' | tr -d '[]')
      if [ "$got" = "$expected" ]; then
        pass "$run: greedy continuation equals transformers' ($got)"
      else
        fail "$run: greedy continuation $got, transformers $expected"
      fi
      # scores: one line per document, in order, against "count sum" lines
      verdict=$(paste -d' ' <(grep -o '"tokens":[0-9]*,"nll_sum":[^,]*' "$o/scores.jsonl" |
                              sed 's/"tokens"://; s/,"nll_sum":/ /') "$dir/documents.nll" | awk '
        { n++; if ($1 != $3) bad = bad " doc" n ":tokens " $1 "!=" $3;
          d = ($2 - $4) / $1; if (d < 0) d = -d; if (d > worst) worst = d }
        END { if (n < 2) print "no scores"; else if (bad != "" || worst > 1e-5) print "bad" bad " worst " worst; else print "ok " worst }')
      case $verdict in
        ok*) pass "$run: per-document mean NLL within ${verdict#ok } of transformers" ;;
        *) fail "$run: scores differ from transformers ($verdict)" ;;
      esac
    done
  done
  # four prompts: the job's [1..6], transformers' greedy prompt, and 3 and 10 ids of documents
  short=$(sed -n 1p "$dir/documents.ids" | cut -d' ' -f1-3 | tr ' ' ,)
  long=$(sed -n 2p "$dir/documents.ids" | cut -d' ' -f1-10 | tr ' ' ,)
  printf 'eval { prompts { ids: [%s] } prompts { ids: [%s] } prompts { ids: [%s] } }\n' \
    "$prompt" "$short" "$long" |
    protoc --encode=qwen3.Job -Iproto proto/job.proto >"$out/$name.prompts.pb" || fail "protoc"
  cat "$build/jobs/eval_hf.pb" "$out/$name.prompts.pb" >"$out/$name.batch.pb"   # merged: 4 prompts
  # npN.pick: the KV cache without eval.check_kv, the tokens picked by the backend; npN.draw*:
  # temperature 1, without the check and with it (the last stage's sampler sends its draws)
  for run in np1.kv=true np2.kv=true np1.kv=false np1.pick np2.pick np1.draw np2.draw \
             np1.draw_check; do
    np=${run:2:1} kv=true check=true temperature=0
    case $run in
      *kv=false) kv=false ;; *pick) check=false ;;
      *draw) check=false temperature=1 ;; *draw_check) temperature=1 ;;
    esac
    o="$out/$name.batch.$run"
    if ! timeout 300 $MPIRUN -np "$np" "$build/qwen3-train" "$out/$name.batch.pb" \
        --set model.hf_config="$dir/config.json" --set init.hf_dir="$dir" \
        --set data.valid="$out/$name.h5" --set parallel.pipeline_stages="$np" \
        --set eval.kv_cache="$kv" --set eval.check_kv="$check" \
        --set eval.temperature=$temperature --set output_dir="$o" \
        --set backend="${QWEN3_TEST_BACKEND:-CPU}" >"$o.log" 2>&1; then
      fail "$name batch $run: the evaluation run failed"; tail -n 15 "$o.log"; continue
    fi
  done
  completions() { grep -o '"completion_ids":\[[^]]*\]' "$out/$name.batch.$1/eval.jsonl"; }
  ref=$(completions np1.kv=false)
  [ "$(echo "$ref" | wc -l)" = 4 ] || fail "$name batch: expected 4 completions, got: $ref"
  if [ "$(echo "$ref" | sed -n 2p | grep -o '\[.*\]' | tr -d '[]')" = "$expected" ]; then
    pass "$name batch: the greedy prompt's completion among 4 equals transformers'"
  else
    fail "$name batch: the greedy prompt's completion among 4 differs from transformers'"
  fi
  for run in np1.kv=true np2.kv=true np1.pick np2.pick; do
    if [ "$(completions $run)" = "$ref" ]; then
      pass "$name batch $run: 4 prompts decoded together give each one's replay completion"
    else
      fail "$name batch $run: batched completions differ"; paste <(completions $run) <(echo "$ref")
    fi
  done
  draws=$(completions np1.draw)
  if [ "$draws" = "$(completions np1.draw_check)" ] && [ "$draws" = "$(completions np2.draw)" ] &&
     [ "$draws" != "$ref" ]; then
    pass "$name batch: temperature 1 draws alike with the check, without, on 2 stages; not greedy's"
  else
    fail "$name batch: temperature 1 draws differ without the check or on 2 stages, or are greedy's"
    paste <(echo "$draws") <(completions np1.draw_check) <(completions np2.draw) <(echo "$ref")
  fi
done
finish
