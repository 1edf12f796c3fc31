#!/usr/bin/env bash
# Mutation check: do the tests fail when the code is wrong? Each mutation below plants one
# deliberate bug (an edit of one source line) in a copy of the working tree, rebuilds the copy
# and runs the tests that should catch it; a mutation no test catches is reported as SURVIVED.
# The working tree itself is never touched: the copy lives in a temporary directory.
#
#   bash tests/mutation_check.sh                 # every mutation (about 10 minutes on 2 cores)
#   bash tests/mutation_check.sh clip_halved     # the named ones
#
# Not part of CI: it rebuilds once per mutation. Run it after changing a test of the optimizer or
# of NVFP4, or to check that a new test catches what it is meant to.
set -u
root=$(pwd)
[ -f tests/mutation_check.sh ] || { echo "run from the repository root"; exit 2; }
source scripts/env.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# name # file # sed expression (must change the file) # ctest regex of the tests that should fail #
# what the bug is
MUTATIONS=(
  'cosine_off_by_one#trainer/optim.c#s/(double)(step - o->warmup_steps - 1)/(double)(step - o->warmup_steps)/#^test_optim$#cosine progress one step late'
  'cosine_period_doubled#trainer/optim.c#s/cos(M_PI \* progress)/cos(0.5 * M_PI * progress)/#^test_optim$#cosine period doubled'
  'decay_on_norms#trainer/optim.c#s/if (!decay) s.weight_decay = 0;/(void)decay;/#^test_optim$#weight decay on norm weights'
  'clip_halved#trainer/optim.c#s|(float)(o->grad_clip / (norm + 1e-6))|(float)(0.5 * o->grad_clip / (norm + 1e-6))|#^test_optim$#clip factor halved'
  'decay_on_norms+clip_halved#trainer/optim.c#s/if (!decay) s.weight_decay = 0;/(void)decay;/;s|(float)(o->grad_clip / (norm + 1e-6))|(float)(0.5 * o->grad_clip / (norm + 1e-6))|#^test_optim$#both of the above'
  'rht_dropped_x#worker/nvfp4_linear.c#s/(c, dec_c, x, act, n, in_dim, NVFP4_COLS, 0, 0, signs);/(c, dec_c, x, act, n, in_dim, NVFP4_COLS, 0, 0, -1);/#^test_nvfp4_linear$|^mpi_test_nvfp4_train$#RHT dropped from the X operand of Wgrad'
  'rht_dropped_dy#worker/nvfp4_linear.c#s/pol->stochastic, signs);/pol->stochastic, -1);/#^test_nvfp4_linear$#RHT dropped from the dY operand of Wgrad'
  'gradients_sr_off#worker/nvfp4_linear.c#s/pol->stochastic, signs);/0, signs);/#^test_nvfp4_linear$#the dY operands rounded to nearest'
  'dgrad_w_not_transposed#worker/nvfp4_linear.c#s/dec(w, layer, which, DEC_W), 1, n, in_dim,/dec(w, layer, which, DEC_W), 0, n, in_dim,/#^test_nvfp4_linear$#Dgrad reads the 16x16 W as [n, k] instead of [k, n]'
  'shared_x_scale_lost#worker/nvfp4_linear.c#s/be->nvfp4_gemm(outs\[k\], act, xq, dec_x,/be->nvfp4_gemm(outs[k], act, xq, dec(w, layer, which[k], DEC_X),/#^test_nvfp4_linear$|^mpi_test_nvfp4_train$#k and v (up) read a tensor scale their stage never wrote'
  'packed_gemv_first_dec_w#kernels/cpu/cpu_nvfp4.c#s/\*dec_x \* \*dec_w\[j\]/*dec_x * *dec_w[0]/#^test_nvfp4_linear$#the grouped packed GEMV scales every matrix by the first one'"'"'s S_dec'
  'int_operand_k_is_q#kernels/cpu/cpu_nvfp4.c#s/k\[i\] = (int8_t)(2.0f \* nvfp4_e2m1_decode(/k[i] = (int8_t)(nvfp4_e2m1_decode(/#^test_ops$|^test_nvfp4_linear$#NVFP4_ROWS_INT'"'"'s integers are q (truncated), not 2q'
  'packed_gemv_int_x_doubled#kernels/cpu/cpu_nvfp4.c#s|x\[i\] = (float)k\[i\] \* s\[i / 16\] \* 0.5f;|x[i] = (float)k[i] * s[i / 16];|#^test_ops$|^test_nvfp4_linear$#the packed GEMV takes x as k * s, twice its value'
  'packed_path_rows_operand#worker/nvfp4_linear.c#s/n, in_dim, NVFP4_ROWS_INT, 0, 0, -1);/n, in_dim, NVFP4_ROWS, 0, 0, -1);/#^test_nvfp4_linear$#the packed path gives the GEMV NVFP4_ROWS values, not its integer operand'
  'packed_gemv_rows_share_x#kernels/cpu/cpu_nvfp4.c#s/acc\[t\] += x\[(size_t)t \* in_dim + c\] \* wv;/acc[t] += x[c] * wv;/#^mpi_test_nvfp4_train$#the packed GEMV multiplies every token row'"'"'s sum by the first row'"'"'s x (decoding several sequences, or a prompt of a few tokens)'
  'dgrad_draws#worker/nvfp4_linear.c#s/operand_seed(w, live, layer, which, 0)/operand_seed(w, live, layer, which, 1)/#^test_nvfp4_linear$#Dgrad draws the numbers of the Wgrad operand'
  'betas_swapped#trainer/optim.c#s/.beta1 = (float)o->beta1, .beta2 = (float)o->beta2/.beta1 = (float)o->beta2, .beta2 = (float)o->beta1/#^test_optim$#beta1 and beta2 swapped'
  'bias_correction_t+1#trainer/optim.c#s/.grad_scale = 1.0f, .t = t,/.grad_scale = 1.0f, .t = t + 1,/#^test_optim$#bias correction one step ahead'
  'clip_when_below#trainer/optim.c#s/norm > o->grad_clip)/norm < o->grad_clip)/#^test_optim$#clipping when the norm is below the limit'
  'warmup_off_by_one#trainer/optim.c#s|return o->lr \* step / o->warmup_steps;|return o->lr * (step - 1) / o->warmup_steps;|#^test_optim$#warmup one step late'
  'linear_to_zero#trainer/optim.c#s/return o->lr + (o->min_lr - o->lr) \* progress;/return o->lr * (1 - progress);/#^test_optim$#linear decay to 0 instead of min_lr'
  'norm_skips_final_norm#trainer/optim.c#s/param_sum_squares(w, groups - 1, w->final_norm_param);/(void)0;/#^test_optim$#final norm left out of the gradient norm'
  'zero_shard_off_by_a_block#worker/worker.c#s/size_t b = (size_t)index \* stride, e = b + stride;/size_t b = (size_t)index * stride + (index ? SHARD_ALIGN : 0), e = b + stride;/#^mpi_test_zero$#ZeRO-1 shards after the first start one block late'
  'zero_decay_on_vectors#trainer/optim.c#s/if (!decay) s.weight_decay = 0;/if (!decay \&\& w->plan.shards == 1) s.weight_decay = 0;/#^mpi_test_zero$#ZeRO-1 decays the vector part of its shard'
  'zero_norm_of_own_shard#trainer/optim.c#s/if (chunks\[0\].plan.shards > 1) comm_allreduce_sum_double(c, GROUP_DP/if (0) comm_allreduce_sum_double(c, GROUP_DP/#^mpi_test_zero$#ZeRO-1 clips by the norm of its own shard'
  'zero_load_moments_unshifted#trainer/checkpoint.c#s/host + (from - p->offset)/host/#^mpi_test_zero$#ZeRO-1 loads a tensor'"'"'s moments from its start, not from the shard'"'"'s'
  'adamw_clip_ignored#kernels/cpu/cpu_adamw.c#s/float gi = g\[i\] \* scale;/float gi = g[i];/#^test_ops$|^test_optim$#AdamW ignores the clipping factor'
  'grads_never_fresh#worker/worker.c#s/^  w->grads_fresh = 1;/  w->grads_fresh = 0;/#^test_hf_fixtures$#a step'"'"'s first backward adds to the last step'"'"'s gradients'
  'grads_always_fresh#worker/worker.c#s/^  w->grads_fresh = 0;/  (void)0;/#^test_pack$#every micro-batch'"'"'s backward overwrites the gradients of the ones before'
  'accumulated_grads_kept#worker/worker.c#s/  if (!(w->zero_pending \& which)) return;/  return;/#^test_hf_fixtures$#the embedding'"'"'s and the LM head'"'"'s gradients (only added to) are not zeroed between steps'
  'slot_aliased_though_added#worker/block.c#s/else if (slot_readers(in) == 1)/else if (slot_readers(in) >= 1)/#^test_hf_fixtures$#a residual input read in place although a later stage adds to its gradient'
  'qkv_dx_overwritten#worker/block.c#s/        acc\[0\] |= ACC_DX;/        (void)0;/#^test_hf_fixtures$#k and v overwrite the input gradient q wrote'
  'qk_fwd_k_takes_q_weight#kernels/cpu/cpu_norm.c#s/const float \*x_t = x\[t\], \*w_t = w\[t\];/const float *x_t = x[t], *w_t = w[0];/#^test_ops$|^test_hf_fixtures$#the q/k-norm + RoPE forward of q and k in one call norms k with q'"'"'s weight'
  'linear_dw_beta_ignored#kernels/cpu/cpu_linear.c#s/acc \& ACC_DW ? 1.0f : 0.0f, dw, in_dim/1.0f, dw, in_dim/#^test_ops$#linear backward adds to dw when told to overwrite it'
  'norm_layers_twice#trainer/optim.c#s/l < p->n_layers \&\& !layers_normed/l < p->n_layers/#^mpi_#the layers summed for the norm in backward are summed again at the step'"'"'s end'
  'norm_layer_early_hook#trainer/train.c#s/r->by_layer \&\& i == k->last_bwd/r->by_layer \&\& i != k->last_bwd/#^mpi_#the norm'"'"'s squares of a layer taken after its other backwards of the step, not its last'
  'recompute_not_rebuilt#worker/block.c#s/        stage_forward(w, producer(s->in\[k\]), a, live, layer, n);/        (void)0;/#^mpi_test_pipeline$#backward reads norm outputs and SwiGLU products it did not rebuild'
  'doc_mask_dropped#kernels/cpu/cpu_attention.c#s/^  if (!s->doc_start) return 0;/  return 0;/#^test_ops$|^test_pack$#packed documents attend to each other (CPU attention)'
  'pack_positions_continue#data/loader.c#s/^      positions\[t\] = j;/      positions[t] = t;/#^test_pack$#positions do not restart with each packed document'
  'first_layers_not_recorded#trainer/checkpoint.c#s/^    prec.has_bf16_first_layers = 1;/    (void)0;/#^mpi_test_nvfp4_train$#a checkpoint stores its job without the first BF16 layers it used'
  'eval_precision_unchecked#trainer/checkpoint.c#s/^    compare_job(dir, st, job);/    if (job->train->steps > 0) compare_job(dir, st, job);/#^mpi_test_nvfp4_train$#an evaluation of a checkpoint does not say that it runs other NVFP4 layers than trained'
  'stored_first_layers_default#trainer/train.c#s/return prec->has_bf16_first_layers ? nvfp4_bf16_first_layers(prec, num_layers) : 0;/return nvfp4_bf16_first_layers(prec, num_layers);/#^test_nvfp4_export$#a stored job without the field reads as the new default, not 0'
  'first_layers_one_per_4#trainer/train.c#s|num_layers / 8 < 2 ? num_layers / 8 : 2|num_layers / 4 < 2 ? num_layers / 4 : 2|#^test_nvfp4_export$|^mpi_test_nvfp4_train$#one first BF16 layer per 4 blocks, not per 8'
  'pack_prompt_trained#data/loader.c#s/targets\[t\] = !mask || mask\[j + 1\] ?/targets[t] = 1 ?/#^test_pack$#a packed chat document trains on its prompt'
  'gemm_tune_ignores_bits#kernels/cuda/cuda_gemm_pick.h#s/if (hash\[r\] != hash\[0\]) (\*other_bits)++;/if (0) (*other_bits)++;/#^test_gemm_pick$#the GEMM tuning keeps the fastest candidate whatever its bits'
  'amax_parts_under_zero#trainer/optim.c#s/return w->plan.shards == 1 ? nvfp4_amax_parts(w, i) : NULL;/return nvfp4_amax_parts(w, i);/;s/w->amax_parts_fresh = w->amax_parts \&\& !zero;/w->amax_parts_fresh = w->amax_parts != NULL;/#^mpi_test_nvfp4_train$#ZeRO-1 replicas quantize the weights with the amax parts of their own shards only'
  'adamw_parts_last_chunk_dropped#kernels/cpu/cpu_adamw.c#s|size_t chunks = (n + ADAMW_AMAX_CHUNK - 1) / ADAMW_AMAX_CHUNK;|size_t chunks = n / ADAMW_AMAX_CHUNK;|#^test_ops$|^mpi_test_nvfp4_train$#AdamW writes no amax part for a short last chunk (a whole matrix of the tiny model)'
  'adamw_parts_chunk_last_value#kernels/cpu/cpu_adamw.c#s/? n : (c + 1) \* ADAMW_AMAX_CHUNK;/? n : (c + 1) * ADAMW_AMAX_CHUNK - 1;/#^test_ops$#AdamW'"'"'s amax part of a whole chunk leaves out its last value'
  'adamw_parts_sign_kept#kernels/cpu/cpu_adamw.c#s/      b \&= 0x7fffffffu;/      (void)0;/#^test_ops$#AdamW'"'"'s amax parts take the bits of p, not of |p|'
  'weight_parts_ignored#kernels/cpu/cpu_nvfp4.c#s/quantize(xq, dec, w, rows, cols, layout, 0, 0, -1, \&amax);/quantize(xq, dec, w, rows, cols, layout, 0, 0, -1, NULL);/#^test_ops$#the weight quantization takes an amax pass of its own, not the parts (the equalities cannot tell)'
  'amax_parts_valid_before_adamw#worker/nvfp4_linear.c#s/  w->amax_parts_valid = w->amax_parts_fresh \&\& !amax_pass_forced();/  w->amax_parts_valid = w->amax_parts != NULL \&\& !amax_pass_forced();/#^test_nvfp4_linear$|^mpi_test_nvfp4_train$#the weights quantize from amax parts AdamW has not written (after init, or a checkpoint load)'
  'amax_parts_run_merged#trainer/optim.c#s/p->decay == decay \&\& !parts \&\& !own)/p->decay == decay)/#^mpi_test_nvfp4_train$#AdamW merges neighbouring NVFP4 matrices into one run, whose parts all go to the first'
  'argmax_ties_to_last#kernels/argmax.c#s/  for (i = 0; i < n; i++)/  for (i = n - 1; i > 0; i--)/#^test_ops$|^test_sampler$#the greedy argmax breaks ties to the last index'
  'argmax_nan_wins#kernels/argmax.c#s/lane_max\[k\] = x\[i + k\] > lane_max\[k\]/lane_max[k] = !(x[i + k] <= lane_max[k])/#^test_ops$|^test_sampler$#a NaN wins a lane of the greedy argmax'
  'argmax_tail_dropped#kernels/argmax.c#s/  for (; i < n; i++) top = x\[i\] > top ? x\[i\] : top;/  (void)0;/#^test_ops$|^test_sampler$#the greedy argmax leaves out the values past its last 16 lanes'
  'device_pick_first_sequence#worker/worker.c#s/be->argmax_rows(greedy, logits, rows, vocab);/be->argmax_rows(greedy, logits, 1, vocab);/#^mpi_test_hf_eval$#a decoding step picks only its first sequence'"'"'s token on the device (the others keep stale ids)'
  'device_pick_when_sampling#trainer/generate.c#s/int device_pick = last \&\& sampler_greedy(\&g->sampler) \&\& !g->check_kv;/int device_pick = last \&\& !g->check_kv;/#^mpi_test_hf_eval$#sampling with a temperature takes the backend'"'"'s greedy token'
)

echo "copying the working tree to $work/src"
mkdir -p "$work/src"
git ls-files -z -co --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$work/src")
cd "$work/src"
# the CPU engine is what the tests exercise; no CUDA build, however long nvcc would take
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER=NOTFOUND >"$work/cmake.log" 2>&1 &&
  cmake --build build -j"$(nproc)" >>"$work/cmake.log" 2>&1 ||
  { tail -n 30 "$work/cmake.log"; echo "the unmutated copy does not build"; exit 1; }

survived=0 killed=0
printf '%-28s %-9s %s\n' mutation verdict "failing tests"
for m in "${MUTATIONS[@]}"; do
  IFS='#' read -r name file expr tests what <<<"$m"
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qxF "$name"; then continue; fi
  cp "$file" "$work/orig"
  sed -i "$expr" "$file"
  changed=$(diff "$work/orig" "$file" | grep -c '^>')
  if [ "$changed" -eq 0 ]; then
    printf '%-28s %-9s %s\n' "$name" STALE "the edit matched nothing in $file: update the mutation"
    cp "$work/orig" "$file"
    survived=$((survived + 1))
    continue
  fi
  if ! cmake --build build -j"$(nproc)" >"$work/build.log" 2>&1; then
    printf '%-28s %-9s %s\n' "$name" BROKEN "does not compile"
    cp "$work/orig" "$file"
    survived=$((survived + 1))
    continue
  fi
  (cd build && ctest -R "$tests" --output-on-failure >"$work/ctest.log" 2>&1)
  failing=$(grep -o '[0-9]* - [a-z0-9_]* (Failed)' "$work/ctest.log" | awk '{print $3}' | paste -sd' ')
  ran=$(grep -c 'Test *#' "$work/ctest.log")
  if [ "$ran" -eq 0 ]; then
    printf '%-28s %-9s %s\n' "$name" NO-TESTS "no test matches $tests"
    survived=$((survived + 1))
  elif [ -n "$failing" ]; then
    printf '%-28s %-9s %s  (%s)\n' "$name" caught "$failing" "$what"
    # the first failing check, to show what gave the bug away
    grep -m 1 '^FAIL' "$work/ctest.log" | cut -c 1-160 | sed 's/^/    /'
    killed=$((killed + 1))
  else
    printf '%-28s %-9s %s  (%s)\n' "$name" SURVIVED "none of $ran failed" "$what"
    survived=$((survived + 1))
  fi
  cp "$work/orig" "$file"
done
echo "$killed caught, $survived survived"
[ "$survived" -eq 0 ]
