#!/usr/bin/env python3
"""The PyTorch baseline of the GPU benchmark: Hugging Face Qwen3ForCausalLM at Qwen3-4B's shape.

    python3 bench/torch_train_bench.py eager   [--mb 1] [--accum 1] [--T 2048] [--also MB:ACCUM,...]
    python3 bench/torch_train_bench.py compile         (torch.compile of the whole model)
    python3 bench/torch_train_bench.py compile-layers  (each decoder layer compiled on its own)
    python3 bench/torch_train_bench.py attention [--attn-T 2048,4096,8192]

Training: a random-init model (36 layers, hidden 2560, 32 q / 8 kv heads, head_dim 128, FFN 9728,
vocab 151936, tied embeddings, rope_theta 5e6, eps 1e-6) in bf16 with SDPA attention,
torch.optim.AdamW(fused=True) with the trainer's defaults (lr 3e-4, betas 0.9/0.95, eps 1e-8,
weight decay 0.1), random token batches with labels = input_ids (the model's own shifted loss).
One optimizer step = `accum` micro-batches of `mb` sequences of T tokens. Warm-up steps (the
compilation included) are reported apart; the timed steps are bracketed by
torch.cuda.synchronize and time.perf_counter, and the median step is reported.

  tokens/s   = mb * accum * T / median step seconds
  MFU        = tokens/s * FLOPs/token / 989e12 (dense bf16 peak of H100/H200)
  FLOPs/tok  = 6 N + 6 L T heads head_dim   (N counted from the model, embedding included;
               the second term is causal attention: 12 L T d_attn halved)
  peak       = torch.cuda.max_memory_allocated over the timed steps
  over-state = peak - (parameters + gradients + AdamW state, in bytes as torch holds them)

Attention: F.scaled_dot_product_attention, causal, bf16, B = 1, 32 q / 8 kv heads
(enable_gqa=True, else K/V expanded), head_dim 128; forward and forward+backward timed with CUDA
events, median of repeats. FLOPs follow FlashAttention's convention: forward = 4 T^2 heads hd / 2
(causal half of two GEMMs, 2 FLOPs per multiply-add), backward = 2.5 x forward.

Every result is one line `RESULT key=value ...` on stdout, also appended to the file named by
$GPU_BENCH_RESULTS when set. --budget bounds the whole run (seconds from start): timing loops
stop early and later configurations are skipped (reported as status=skipped).
"""
import argparse
import contextlib
import gc
import json
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import PEAK_FLOPS, SHAPE, T0, flops_per_token, make_log, result  # noqa: E402

log = make_log("torch")


def build_model(torch, layers, T, seed):
    """Qwen3ForCausalLM at Qwen3-4B's shape (fewer layers when asked), random init, bf16 on the
    GPU, SDPA attention. Returns the model, its config and transformers' major version."""
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM
    major = int(transformers.__version__.split(".")[0])
    s = SHAPE
    kw = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["ffn"],
              num_hidden_layers=layers, num_attention_heads=s["heads"],
              num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], hidden_act="silu",
              max_position_embeddings=max(T, 4096), rms_norm_eps=s["eps"],
              tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0,
              use_sliding_window=False, use_cache=False)
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x reads it at the top level
    if major >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": s["theta"]}
    else:
        kw["rope_theta"] = s["theta"]
    config = Qwen3Config(**kw)
    config.architectures = ["Qwen3ForCausalLM"]
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    return model, config, major


def save_safetensors(torch, model, config, folder):
    """model.safetensors (BF16, Hugging Face names, the tied lm_head left out as
    save_pretrained does) and config.json: `init.hf_dir` of our trainer reads it, which is much
    faster than its host-side random init of 4B parameters."""
    os.makedirs(folder, exist_ok=True)
    items = [(n, p.detach()) for n, p in model.named_parameters()]   # shared weights once
    header, off = {}, 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    path = os.path.join(folder, "model.safetensors")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in items:
            f.write(t.contiguous().view(torch.int16).cpu().numpy().tobytes())
    os.replace(tmp, path)
    try:
        config.to_json_file(os.path.join(folder, "config.json"))
    except Exception as e:   # the trainer's job names the shape itself; config.json is a courtesy
        log(f"config.json not written: {e}")
    return off


def state_bytes(model, opt):
    params = list(model.parameters())
    b = 2 * sum(p.numel() * p.element_size() for p in params)   # parameters and their gradients
    for st in opt.state.values():
        for v in st.values():
            if hasattr(v, "numel"):
                b += v.numel() * v.element_size()
    return b


# ---- training -------------------------------------------------------------------------------

def train_configs(args, torch):
    configs = [(args.mb, args.accum, False)]
    for spec in filter(None, (args.also or "").split(",")):
        mb, acc = spec.split(":")
        configs.append((int(mb), int(acc), False))
    if args.clip_too:   # each once more with clip_grad_norm_(1.0), as our trainer's default
        configs += [(mb, acc, True) for mb, acc, _ in configs]
    deadline = T0 + args.budget
    log(f"building the model ({args.layers} layers) on {torch.cuda.get_device_name(0)}")
    model, config, major = build_model(torch, args.layers, args.T, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"N = {n_params} parameters (embedding included, tied head counted once); "
        f"transformers {major}.x, torch {torch.__version__}")
    if args.save_hf:
        t = time.perf_counter()
        try:
            nbytes = save_safetensors(torch, model, config, args.save_hf)
            log(f"weights written to {args.save_hf}/model.safetensors ({nbytes / 2**30:.1f} GiB,"
                f" {time.perf_counter() - t:.1f} s)")
        except Exception as e:   # ours then falls back to its own init; the timing goes on
            log(f"weights not written: {type(e).__name__}: {e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, fused=True)
    system = "torch-" + args.mode
    fwd = model
    if args.mode == "compile":
        fwd = torch.compile(model, dynamic=False)   # static shapes: one graph per micro-batch
    elif args.mode == "compile-layers":
        for layer in model.model.layers:
            layer.compile()
    V, T = SHAPE["vocab"], args.T
    fpt = flops_per_token(n_params, args.layers, T, SHAPE["heads"], SHAPE["head_dim"])

    def step(mb, accum, clip):
        for _ in range(accum):
            x = torch.randint(0, V, (mb, T), device="cuda")
            out = fwd(input_ids=x, labels=x, use_cache=False)
            (out.loss / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    per_seq = 0.0
    for mb, accum, clip in configs:
        tag = dict(system=system + ("+clip" if clip else ""), mb=mb, T=T, accum=accum)
        warm_n = args.warmup if args.warmup is not None else (3 if accum == 1 else 1)
        timed_n = args.steps if args.steps is not None else (5 if accum == 1 else 2)
        left = deadline - time.perf_counter()
        # a warm-up and a timed step at the last configuration's seconds per sequence
        need = max(5.0, 2 * per_seq * mb * accum)
        if left < need:
            log(f"skipping mb={mb} accum={accum}: {left:.0f} s of budget left, needs ~{need:.0f}")
            result(**tag, status="skipped")
            continue
        log(f"{system} mb={mb} accum={accum}: {warm_n} warm-up + {timed_n} timed steps")
        try:
            torch.cuda.synchronize()
            warm = []
            for _ in range(warm_n):
                t = time.perf_counter()
                step(mb, accum, clip)
                torch.cuda.synchronize()
                warm.append(time.perf_counter() - t)
                log(f"  warm-up step {len(warm)}: {warm[-1]:.3f} s")
                # the first step of a configuration compiles (torch.compile): it says nothing
                # of how long the next takes
                if len(warm) > 1 and time.perf_counter() + warm[-1] > deadline:
                    break
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(timed_n):
                est = max(times) if times else warm[-1] if len(warm) > 1 else 0.0
                if time.perf_counter() + est > deadline:
                    log(f"  out of budget after {len(times)} timed steps")
                    break
                t = time.perf_counter()
                step(mb, accum, clip)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            partial = 0
            if not times:   # the budget ran out in warm-up: the last warm-up step stands in
                times, partial = warm[-1:], 1
            peak = torch.cuda.max_memory_allocated()
            reserved = torch.cuda.max_memory_reserved()
            state = state_bytes(model, opt)
            med = statistics.median(times)
            per_seq = med / (mb * accum)
            tok_s = mb * accum * T / med
            result(**tag, tok_s=tok_s, mfu=tok_s * fpt / PEAK_FLOPS, peak_gib=peak / 2**30,
                   over_state_gib=(peak - state) / 2**30, state_gib=state / 2**30,
                   reserved_gib=reserved / 2**30, step_s=med, steps=len(times),
                   warmup_s=sum(warm), first_step_s=warm[0] if warm else 0.0,
                   n_params=n_params, flops_per_token=f"{fpt:.4g}", partial=partial,
                   **({"compile_s": warm[0] - med} if args.mode != "eager" and warm else {}))
        except torch.cuda.OutOfMemoryError as e:
            log(f"  out of memory: {str(e).splitlines()[0]}")
            result(**tag, status="oom")
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()


# ---- attention ------------------------------------------------------------------------------

def attention(args, torch):
    import torch.nn.functional as F
    H, KV, D = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                    ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    except ImportError:
        backends, sdpa_kernel = [("default", None)], None
    deadline = T0 + args.budget
    for T in [int(x) for x in args.attn_T.split(",") if x]:
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)

        def fwd():
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            except TypeError:   # no enable_gqa: expand K and V to every query head
                r = H // KV
                return F.scaled_dot_product_attention(q, k.repeat_interleave(r, 1),
                                                      v.repeat_interleave(r, 1), is_causal=True)

        def fwd_bwd():
            out = fwd()
            torch.autograd.grad(out, (q, k, v), do)

        fwd_flops = 4.0 * T * T * H * D / 2
        for name, be in backends:
            if time.perf_counter() > deadline:
                result(system=f"torch-sdpa-{name}", T=T, status="skipped")
                continue
            try:
                ctx = sdpa_kernel([be]) if be is not None else contextlib.nullcontext()
                with ctx:
                    for _ in range(3):
                        fwd_bwd()
                    torch.cuda.synchronize()
                    t_f = _cuda_median(torch, lambda: fwd(), args.repeats)
                    t_fb = _cuda_median(torch, fwd_bwd, args.repeats)
            except Exception as e:   # a backend that cannot take this shape or GQA
                log(f"sdpa {name} T={T}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                result(system=f"torch-sdpa-{name}", T=T, status="unsupported")
                continue
            t_b = max(t_fb - t_f, 1e-9)
            result(system=f"torch-sdpa-{name}", T=T, heads=H, kv_heads=KV, head_dim=D,
                   fwd_ms=t_f * 1e3, bwd_ms=t_b * 1e3, fwdbwd_ms=t_fb * 1e3,
                   fwd_tflops=fwd_flops / t_f / 1e12, bwd_tflops=2.5 * fwd_flops / t_b / 1e12,
                   fwdbwd_tflops=3.5 * fwd_flops / t_fb / 1e12)


def _cuda_median(torch, fn, repeats):
    times = []
    for _ in range(repeats):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["eager", "compile", "compile-layers", "attention"])
    ap.add_argument("--mb", type=int, default=1, help="sequences per micro-batch")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--T", type=int, default=2048, help="tokens per sequence")
    ap.add_argument("--also", default="", help="more MB:ACCUM configurations, same process")
    ap.add_argument("--clip-too", action="store_true",
                    help="each configuration again with clip_grad_norm_(1.0) before the step")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (accum 1) or 1")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, default 5 (accum 1) or 2")
    ap.add_argument("--budget", type=float, default=300, help="seconds for the whole run")
    ap.add_argument("--layers", type=int, default=SHAPE["layers"], help="fewer for a quick try")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--save-hf", default="", help="write the initial weights here (safetensors)")
    ap.add_argument("--attn-T", default="", help="attention sequence lengths, e.g. 2048,4096,8192"
                    " (the attention mode's default; after training in the other modes)")
    ap.add_argument("--repeats", type=int, default=20, help="attention timing repeats")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("torch_train_bench: no CUDA device")
    if args.mode == "attention":
        args.attn_T = args.attn_T or "2048,4096,8192"
    else:
        train_configs(args, torch)   # its model and optimizer are gone when it returns
        gc.collect()
        torch.cuda.empty_cache()
    if args.attn_T:
        attention(args, torch)
    log("done")


if __name__ == "__main__":
    main()
