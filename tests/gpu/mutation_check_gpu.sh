#!/usr/bin/env bash
# Mutation check of the GPU tests: plants one deliberate bug at a time in a CUDA kernel, rebuilds
# test_cuda_ops in BUILD_DIR and requires it to fail; the file is restored (and rebuilt) after
# each. The bf16_* mutations touch code only the bf16 mode runs, so only that mode's checks can
# kill them. Run on the GPU machine after a build:
#   bash tests/gpu/mutation_check_gpu.sh BUILD_DIR [NAME...]     (every mutation, or the named)
# Not part of CI (it needs a GPU and edits kernels in place, restoring them at exit).
set -u
build=${1:?usage: bash $0 BUILD_DIR [NAME...]}
shift
# name # file # sed expression (must change the file) # what the bug is
MUTATIONS=(
  'rmsnorm_mean_over_dim_minus_1#kernels/cuda/cuda_norm.cu#s|return (float)(1.0 / sqrt(ss / dim + (double)eps));|return (float)(1.0 / sqrt(ss / (dim - 1) + (double)eps));|#RMSNorm mean over dim - 1'
  'causal_off_by_one#kernels/cuda/cuda_attention.cu#0,/off = s.tk - s.tq;/s/off = s.tk - s.tq;/off = s.tk - s.tq + 1;/#causal limit one key late (fp32 forward)'
  'silu_grad_sign#kernels/cuda/cuda_elementwise.cu#s/__fmul_rn(g, __fsub_rn(1.0f, sig))/__fmul_rn(g, __fsub_rn(sig, 1.0f))/#SiLU derivative with a wrong sign'
  'adamw_no_bias_correction#kernels/cuda/cuda_adamw.cu#s|(double)st->lr / (1.0 - pow((double)st->beta1, (double)st->t))|(double)st->lr|#AdamW first-moment bias correction dropped'
  'adamw_clip_ignored#kernels/cuda/cuda_adamw.cu#s|const float g = __fmul_rn(g_raw, s.grad_scale);|const float g = g_raw;|#AdamW ignores the clipping factor'
  'sum_into_overwrites#kernels/cuda/cuda_elementwise.cu#s/if (threadIdx.x == 0) \*acc += t;/if (threadIdx.x == 0) *acc = t;/#sum_into overwrites its device accumulator instead of adding'
  'nvfp4_gemm_alpha_one_scale#kernels/cuda/cuda_gemm.cu#s/scalars\[0\] = __fmul_rn(\*scale_a, \*scale_b);/scalars[0] = *scale_a;/#the NVFP4 GEMM ignores the second tensor scale'
  'nvfp4_fused_rows_draws#kernels/cuda/cuda_nvfp4.cu#s/nv_quantize16<SR>(out, v, sc\[ROWS\], rows_seed, i0);/nv_quantize16<SR>(out, v, sc[ROWS], rows_seed, i0 + 4);/#the fused dY kernel draws the rows operand with the wrong counters'
  'decode_ignores_key_last#kernels/cuda/cuda_attention.cu#s/const int last = key_last ? key_last\[b\] : s.tk - 1;/const int last = s.tk - 1;/#decode attention reads the whole cache, past the current token'
  'decode_no_rescale#kernels/cuda/cuda_attention.cu#s/const float alpha = expf(m - m_new); /const float alpha = 1.0f; /#decode attention keeps earlier tiles unscaled when the running max grows'
  'decode_prefetch_same_tile#kernels/cuda/cuda_attention.cu#s/if (next < k1) tile.load(kb, vb, ld, next,/if (next < k1) tile.load(kb, vb, ld, j0,/#decode attention prefetches its current tile again, not the next one'
  'decode_k_rows_unpadded#kernels/cuda/cuda_attention.cu#s/unpack(is_k ? sk + r \* kld + e/unpack(is_k ? sk + r * hd + e/#decode attention stages K rows unpadded where the scores read them padded'
  'decode_scores_wrong_head#kernels/cuda/cuda_attention.cu#s/reinterpret_cast<const float4 \*>(sq + sh \* hd4)/reinterpret_cast<const float4 *>(sq + (group - 1 - sh) * hd4)/#decode attention scores each query head with another head'"'"'s query'
  'decode_slices_last_dropped#kernels/cuda/cuda_attention.cu#s/for (int x = 1; x < slices; x++) sc +=/for (int x = 1; x < slices - 1; x++) sc +=/#decode attention leaves the last slice of the head dims out of each score'
  'gemv_drops_tail#kernels/cuda/cuda_linear.cu#s/for (; live \&\& c < in_dim; c += STRIDE) {/for (; live \&\& c + STRIDE < in_dim; c += STRIDE) {/#the GEMV leaves out the last 16-byte group of a row past its batches'
  'gemv_drops_last_warp#kernels/cuda/cuda_linear.cu#s/for (int p = 1; p < WPR; p++) v += warp_sums/for (int p = 1; p < WPR - 1; p++) v += warp_sums/#the GEMV leaves out the last of the warps that share a weight row'
  'gemv_butterfly_crosses_rows#kernels/cuda/cuda_linear.cu#s|for (int o = LPR / 2; o > 0; o >>= 1) acc|for (int o = 16; o > 0; o >>= 1) acc|#the GEMV at two rows a warp adds the two rows'"'"' sums together'
  'gemv_warp_rows_same#kernels/cuda/cuda_linear.cu#s|\* (32 / LPR) + lane / LPR;|* (32 / LPR);|#the GEMV at two rows a warp gives both halves of a warp its first row, the second never written'
  'gemv_lanes_store_by_lane_0#kernels/cuda/cuda_linear.cu#s/if (live \&\& row_lane == 0)/if (live \&\& lane == 0)/#the GEMV at two rows a warp stores only the first half'"'"'s row'
  'gemv_lanes_columns_of_warp#kernels/cuda/cuda_linear.cu#s/const int c0 = (part \* LPR + row_lane) \* F::N;/const int c0 = (part * LPR + lane) * F::N;/#the GEMV at two rows a warp starts the second half'"'"'s lanes 16 groups into their row'
  'gemv_lanes_stride_of_32#kernels/cuda/cuda_linear.cu#s/constexpr int STRIDE = WPR \* LPR \* F::N;/constexpr int STRIDE = WPR * 32 * F::N;/#the GEMV at 16 lanes a row steps as if 32 read it, leaving half its columns out'
  'gemv_lanes_grid_halved#kernels/cuda/cuda_linear.cu#s|\* (32 / lpr);|* (64 / lpr);|#the GEMV launches blocks for half its rows at 16 lanes a row (and too few at 32)'
  'gemv_split_flip_low_only#kernels/cuda/cuda_gemv.cuh#s/const uint32_t flip = q ^ 0x88888888u;/const uint32_t flip = q ^ 0x00008888u;/#one token row: codes 4-7 of each word left unflipped, so they add nothing (a positive one cancels between the two sums, a negative one is 0 in both)'
  'gemv_split_neg_added#kernels/cuda/cuda_gemv.cuh#s/(float)(pos - neg)/(float)(pos + neg)/#one token row: the negative codes'"'"' terms added, not subtracted'
  'gemv_2q_table_wrong#kernels/cuda/cuda_gemv.cuh#s/E2M1_2Q_HI = 0x0C080604u;/E2M1_2Q_HI = 0x0C080605u;/#the E2M1 2|q| table gives code 4 (2q = 4) as 5, at one token row and at several'
  'gemv_split_x_scales_swapped#kernels/cuda/cuda_gemv.cuh#s/(b ? xs\[0\].y : xs\[0\].x)/(b ? xs[0].x : xs[0].y)/#one token row: each block of a chunk takes the other block'"'"'s x scale'
  'gemv_split_x_word_twice#kernels/cuda/cuda_gemv.cuh#s/nv_e2m1x8_dot_split(w.q\[2 \* b\], xk.x, xk.y, pos, neg);/nv_e2m1x8_dot_split(w.q[2 * b], xk.x, xk.x, pos, neg);/#one token row: codes 4-7 of a block meet x'"'"'s values 0-3'
  'gemv_wrong_matrix#kernels/cuda/cuda_linear.cu#s/if (k < m.count \&\& row >= m.end\[k - 1\]) {/if (k < m.count \&\& row > m.end[k - 1]) {/#the GEMV gives the first row of k (or up) to q (or gate)'
  'rope_first_token_angle#kernels/cuda/cuda_norm.cu#s|positions\[t0 + k / half\], inv.v\[k % half\]|positions[t0], inv.v[k % half]|#the q/k-norm + RoPE forward rotates every token of a block by its first token'"'"'s angle'
  'qk_fwd_k_takes_q_weight#kernels/cuda/cuda_norm.cu#s/const float \*sw = s_w + (r.second ? head_dim : 0);/const float *sw = s_w;/#the q/k-norm + RoPE forward of q and k in one launch norms k with q'"'"'s weight'
  'qk_fwd_k_rows_at_q_stride#kernels/cuda/cuda_norm.cu#s/token \* (second ? qk.heads\[1\] : qk.heads\[0\])/token * qk.heads[0]/#the one q/k launch puts k'"'"'s rows of a token at q'"'"'s head count a token (past the first token: the wrong rows, past k'"'"'s end)'
  'decode_splits_round_down#kernels/cuda/cuda_attention.cu#s|n_split + DEC_SPLIT_KEYS - 1) / DEC_SPLIT_KEYS)|n_split) / DEC_SPLIT_KEYS)|#decode attention'"'"'s key splits round their size down: the splits leave the last keys out'
  'decode_splits_miss_last_key#kernels/cuda/cuda_attention.cu#s|((last + n_split) / n_split|((last + n_split - 1) / n_split|#decode attention'"'"'s key splits cover keys 0 .. last - 1: a last key that starts a split of its own is left out'
  'decode_empty_split_returns#kernels/cuda/cuda_attention.cu#s|^  DecTile<T> tile;$|  if (k0 >= k1) return;   DecTile<T> tile;|#decode attention: a split with no live key writes no partial, and the merge reads what the scratch arena held'
  'rmsnorm_reads_when_overwriting#kernels/cuda/cuda_norm.cu#s/load_row<T, V, PER>(orow\[q\], dx, (size_t)(i0 + q), dim, live \&\& acc);/load_row<T, V, PER>(orow[q], dx, (size_t)(i0 + q), dim, live);/#RMSNorm backward adds to dx when told to overwrite it'
  'qk_bwd_dw_rows_skipped#kernels/cuda/cuda_norm.cu#s/dw_finalize(dw, partial, (int)blocks, head_dim, acc);/dw_finalize(dw, partial, (int)blocks - 1, head_dim, acc);/#the q\/k norm weight gradient leaves out the last block'"'"'s rows'
  'wgrad_always_accumulates#kernels/cuda/cuda_linear.cu#s/acc \& ACC_DW ? 1.0f : 0.0f, dw, in_dim, act, DT_F32/1.0f, dw, in_dim, act, DT_F32/#the weight gradient GEMM adds to dw when told to overwrite it (beta 1)'
  'kv_append_wrong_row#kernels/cuda/cuda_elementwise.cu#s/const size_t to = (i \* seq_rows + (size_t)positions\[i\]) \* width + c;/const size_t to = (i * seq_rows + (size_t)i) * width + c;/#the KV append writes row i, not the token position'
  'scratch_per_row_halved#kernels/cuda/cuda_backend.cu#s/SCRATCH_BYTES_PER_ROW ((size_t)128 << 10)/SCRATCH_BYTES_PER_ROW ((size_t)64 << 10)/#the scratch arena grows 64 KiB a micro-batch row, not 128'
  'loss_chunk_past_arena#kernels/cuda/cuda_linear.cu#s/return (int)(rounded <= fit ? rounded : rows);/return (int)rounded;/#the LM head'"'"'s chunk rounded up to 64 rows past what the arena holds'
  'gemm_tune_never_runs#kernels/cuda/cuda_gemm.cu#s/if (found < 2 || !cuda_ctx.gemm_tune/if (found < 99 || !cuda_ctx.gemm_tune/#the GEMM tuning never runs (cuBLASLt'"'"'s first algorithm kept for every shape)'
  'gemm_tune_default_off#kernels/cuda/cuda_backend.cu#s/cuda_ctx.gemm_tune = env_flag("QWEN3_CUDA_GEMM_TUNE", 1);/cuda_ctx.gemm_tune = env_flag("QWEN3_CUDA_GEMM_TUNE", 0);/#the GEMM tuning off unless QWEN3_CUDA_GEMM_TUNE=1 (test_gemm_tuning sets the flag itself)'
  'nvfp4_philox_mulhi#kernels/cuda/cuda_nvfp4.cuh#s/return __umulhi(a, b);/return __umulhi(a, b) ^ 1u;/#the device Philox takes wrong high product words (stochastic rounding draws off the CPU'"'"'s)'
  'nvfp4_staged_halves_swapped#kernels/cuda/cuda_nvfp4.cu#s/if (d) reinterpret_cast<uint4 \*>(d)\[piece % 2\] = stage\[piece\];/if (d) reinterpret_cast<uint4 *>(d)[(piece + 1) % 2] = stage[piece];/#the transposing quantizer'"'"'s whole-sector stores swap the two halves of each bf16 block'
  'nvfp4_amax_backwards_stride#kernels/cuda/cuda_nvfp4.cu#s/x + (ngroups - 1 - r - j \* stride) \* N)/x + (ngroups - 1 - r - j) * N)/#the amax pass'"'"'s unrolled loads step one group back, not a grid stride (groups left out of the tensor scale)'
  'nvfp4_small_amax_drops_last_group#kernels/cuda/cuda_nvfp4.cu#s/{nv_amax_groups<Tin, VEC>(x, ngroups)}/{nv_amax_groups<Tin, VEC>(x, ngroups - 1)}/#the one-block quantizer of a small x leaves x'"'"'s last group out of the tensor amax'
  'nvfp4_small_half_the_warps#kernels/cuda/cuda_nvfp4.cu#s|nv_block_max<1, nv_small_threads(SR) / 32>(m);|nv_block_max<1, nv_small_threads(SR) / 64>(m);|#the one-block quantizer reduces the maxima of only its first half of warps'
  'nvfp4_small_writes_nonfinite#kernels/cuda/cuda_nvfp4.cu#s/const nv_scale sc = nv_scale_of(m\[0\], dec);/nv_scale sc = nv_scale_of(m[0], dec); sc.finite = true;/#the one-block quantizer writes xq although x is not finite'
  'gemv_packed_first_dec_w#kernels/cuda/cuda_linear.cu#s/w\[j\] = {codes\[j\], scales\[j\], dec_x, dec_w\[j\]};/w[j] = {codes[j], scales[j], dec_x, dec_w[0]};/#the grouped packed GEMV scales every matrix by the first one'"'"'s S_dec'
  'gemv_packed_first_scales#kernels/cuda/cuda_linear.cu#s/w\[j\] = {codes\[j\], scales\[j\], dec_x, dec_w\[j\]};/w[j] = {codes[j], scales[0], dec_x, dec_w[j]};/#the grouped packed GEMV reads every matrix'"'"'s block scales from the first one'
  'gemv_packed_high_half_x#kernels/cuda/cuda_gemv.cuh#s/sum = __dp4a((int)k\[1\], (int)xk.y, sum);/sum = __dp4a((int)k[1], (int)xk.x, sum);/#the packed GEMV multiplies the high 4 codes of each word by the low 4 values of x'
  'gemv_one_row_kernel_for_two#kernels/cuda/cuda_linear.cu#s/    if (n == 1) kernel = gemv_pick<F, 1>(wpr, lpr);/    if (n <= 2) kernel = gemv_pick<F, 1>(wpr, lpr);/#the packed GEMV runs its one-row kernel for two token rows'
  'adamw_parts_half_the_warps#kernels/cuda/cuda_adamw.cu#s|nv_block_max<1, CUDA_THREADS / 32>(&amax);|nv_block_max<1, CUDA_THREADS / 64>(\&amax);|#AdamW'"'"'s amax part of a chunk leaves out the maxima of its second half of warps'
  'adamw_parts_next_chunk#kernels/cuda/cuda_adamw.cu#s/if (threadIdx.x == 0) amax_parts\[blockIdx.x\] = amax;/if (threadIdx.x == 0) amax_parts[blockIdx.x + 1] = amax;/#AdamW writes each chunk'"'"'s amax part into the next chunk'"'"'s word'
  'adamw_parts_tail_left_out#kernels/cuda/cuda_adamw.cu#s/    if (PARTS) amax = max(amax, nv_absmax<1>(&pi));/    (void)0;/#AdamW'"'"'s amax parts leave out the values past the float4 groups (the scalar tail, the scalar path)'
  'adamw_parts_w_left_out#kernels/cuda/cuda_adamw.cu#s/if (PARTS) amax = max(amax, nv_absmax<4>(f));/if (PARTS) amax = max(amax, nv_absmax<3>(f));/#AdamW'"'"'s amax parts leave out the fourth value of each float4 group'
  'nvfp4_weight_parts_ignored#kernels/cuda/cuda_nvfp4.cu#s/  a.parts.max\[0\] = a.parts.max\[1\] = amax_parts;/  a.parts = nv_amax(w, DT_F32, rows, cols, -1, false);/#the weight quantization runs the amax kernel, not the parts (the equalities cannot tell)'
  'nvfp4_parts_ahead_last_dropped#kernels/cuda/cuda_nvfp4.cu#s/p\[k\]\[j\] = i < parts.n ? parts.max\[k\]\[i\] : 0;/p[k][j] = i < parts.n \&\& j < 3 ? parts.max[k][i] : 0;/#the quantize blocks leave out every fourth batch of amax partials'
  'gemv_w_scales_swapped#kernels/cuda/cuda_gemv.cuh#s/s\[0\] = f.x \* 0.25f, s\[1\] = f.y \* 0.25f;/s[0] = f.y * 0.25f, s[1] = f.x * 0.25f;/#the packed GEMV scales each block of 16 weights by the other block'"'"'s E4M3 scale'
  'gemv_i8_sign_ignored#kernels/cuda/cuda_gemv.cuh#s/0x32103210u | (q \& 0x88888888u) >> 1/0x32103210u/#the integer GEMV takes every weight code as positive'
  'nvfp4_int_k_is_q#kernels/cuda/cuda_nvfp4.cu#s/(int8_t)__float2int_rn(2.0f \* q\[4 \* j + e\])/(int8_t)__float2int_rn(q[4 * j + e])/#NVFP4_ROWS_INT'"'"'s integers are q rounded, not 2q'
  'nvfp4_int_scales_past_k#kernels/cuda/cuda_gemv.cuh#s/(char \*)xq + nvfp4_int_scales_at(rows, cols))/(char *)xq + nvfp4_int_scales_at(rows, cols) + 16)/#the CUDA integer operand keeps its scales 16 bytes past where ops.h puts them'
  'gemv_packed_int_scales_of_one_row#kernels/cuda/cuda_linear.cu#s/gemv_i8_operand_at(const_cast<void \*>(xq), n, in_dim)/gemv_i8_operand_at(const_cast<void *>(xq), 1, in_dim)/#the packed GEMV looks for x'"'"'s scales after one row of integers whatever n'
  'gemv_i8_x_block_scale_swapped#kernels/cuda/cuda_gemv.cuh#s/w.s\[b\] \* (b ? xs\[t\].y : xs\[t\].x)/w.s[b] * (b ? xs[t].x : xs[t].y)/#the integer GEMV scales each block of x by its neighbour'"'"'s s_b'
  'gemv_i8_rows_share_scales#kernels/cuda/cuda_gemv.cuh#s/x.s + ((size_t)t \* in_dim + col) \/ 16/x.s + (size_t)col \/ 16/#the integer GEMV scales every token row by the first row'"'"'s block scales'
  'argmax_ties_to_last#kernels/cuda/cuda_argmax.cu#s/(ov == v \&\& oi < i)/(ov == v \&\& oi > i)/#the device argmax breaks ties to the highest index'
  'argmax_nan_wins#kernels/cuda/cuda_argmax.cu#s/if (ov > v || (ov == v/if (!(ov <= v) || (ov == v/#a NaN wins the device argmax'
  'argmax_butterfly_short#kernels/cuda/cuda_argmax.cu#0,/for (int m = 16; m > 0; m >>= 1)/s//for (int m = 16; m > 1; m >>= 1)/#the device argmax'"'"'s warp reduction leaves out the odd lanes'
  'argmax_vec_odd_n#kernels/cuda/cuda_argmax.cu#s/const bool vec = n % 4 == 0 \&\& cuda_aligned16(x);/const bool vec = cuda_aligned16(x);/#the device argmax reads float4 groups of a row whose length is not a multiple of 4'
  'argmax_all_nan_not_zero#kernels/cuda/cuda_argmax.cu#s/dst\[blockIdx.x\] = i == NO_INDEX ? 0 : i;/dst[blockIdx.x] = i;/#the device argmax of a row of NaN is not 0'
  # only the bf16 mode's checks can catch these: the fp32 and tf32 modes never store bf16
  'bf16_decode_unpack_swapped#kernels/cuda/cuda_attention.cu#s/make_float4(__uint_as_float(r.x << 16), __uint_as_float(r.x \& 0xffff0000u),/make_float4(__uint_as_float(r.x \& 0xffff0000u), __uint_as_float(r.x << 16),/#decode attention swaps the first two bf16 values of every 16-byte load of K and V'
  'bf16_store_truncates#kernels/cuda/cuda_dtype.cuh#s/{ \*p = __float2bfloat16_rn(v); }/{ *p = __float2bfloat16_rz(v); }/#bf16 activations stored rounded toward zero'
  'bf16_tc_forward_docs_leak#kernels/cuda/cuda_attention_bf16.cu#s/(DOC \&\& key < sFirst\[warp \* 16 + g + 8 \* (e >> 1)\]))/(DOC \&\& key + 1 < sFirst[warp * 16 + g + 8 * (e >> 1)]))/#bf16 tensor-core forward: each row also sees the last key of the document before its own'
  'bf16_tc_reads_when_overwriting#kernels/cuda/cuda_attention_bf16.cuh#s/const float2 old = acc ? __bfloat1622float2(\*q) : make_float2(0.0f, 0.0f);/const float2 old = __bfloat1622float2(*q);/#bf16 tensor-core backward adds to dq, dk, dv when told to overwrite them'
  # the bf16 tensor-core attention's shared pieces (cuda_attention_bf16.cuh: both the mma.sync
  # and the wgmma kernels run them)
  'attn_tc_causal_off_by_one#kernels/cuda/cuda_attention_bf16.cuh#s/lim\[i\] = min(qt.off + qt.q0 + row0 + g + 8 \* i, tk - 1);/lim[i] = min(qt.off + qt.q0 + row0 + g + 8 * i + 1, tk - 1);/#bf16 tensor-core forward: causal limit one key late'
  'attn_tc_dkdv_mask_off_by_one#kernels/cuda/cuda_attention_bf16.cuh#s/(qc < nq \&\& key <= lim0 + qc \&\&/(qc < nq \&\& key <= lim0 + qc + 1 \&\&/#bf16 tensor-core dK\/dV: each query also sees the next key'
  'attn_tc_dk_unscaled#kernels/cuda/cuda_attention_bf16.cuh#s/add_bf16x2(dk + k_row + 2 \* t + 8 \* n, s.scale \* k0, s.scale \* k1, s.acc)/add_bf16x2(dk + k_row + 2 * t + 8 * n, k0, k1, s.acc)/#bf16 tensor-core dK\/dV: dK without the softmax scale (group summed in the block)'
  # Hopper's wgmma attention (cuda_attention_wgmma.cu; only an sm_90 GPU runs it)
  'wg_tiles_unswizzled#kernels/cuda/cuda_attention_wgmma.cu#s/r \* 64 + ((c % 8) ^ (r \& 7)) \* 8,/r * 64 + (c % 8) * 8,/#wgmma attention: tiles stored without the swizzle their descriptors say'
)
backup=$(mktemp)
restore() { [ -n "${file:-}" ] && [ -s "$backup" ] && cp "$backup" "$file"; rm -f "$backup"; }
trap restore EXIT
survived=0 killed=0
for m in "${MUTATIONS[@]}"; do
  IFS='#' read -r name file expr what <<<"$m"
  if [ $# -gt 0 ] && ! printf '%s\n' "$@" | grep -qxF "$name"; then continue; fi
  cp "$file" "$backup"
  sed -i "$expr" "$file"
  if cmp -s "$file" "$backup"; then
    echo "STALE    $name: the edit matched nothing in $file"; survived=$((survived + 1)); continue
  fi
  if ! cmake --build "$build" --target test_cuda_ops -j"$(nproc)" >/dev/null 2>&1; then
    echo "BUILD?   $name: the mutant does not compile"; survived=$((survived + 1))
  # both attention paths of an sm_90 GPU: the default (wgmma) and the mma.sync kernels
  elif "$build/tests/test_cuda_ops" >"$backup.log" 2>&1 &&
       QWEN3_CUDA_WGMMA=0 "$build/tests/test_cuda_ops" >>"$backup.log" 2>&1; then
    echo "SURVIVED $name ($what)"; survived=$((survived + 1))
  else
    echo "KILLED   $name ($what): $(grep -c '^FAIL' "$backup.log") failing checks, first: $(grep -m1 '^FAIL' "$backup.log")"
    killed=$((killed + 1))
  fi
  cp "$backup" "$file"
  rm -f "$backup.log"
done
file=
cmake --build "$build" --target test_cuda_ops -j"$(nproc)" >/dev/null 2>&1
echo "mutations: $killed killed, $survived survived"
[ "$survived" -eq 0 ]
