#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for tiny random Qwen3 models.

Usage: python3 tests/hf_fixtures.py OUT_DIR        (OUT_DIR is tests/fixtures/hf)

Needs torch, transformers (4.5x or 5.x) and safetensors; runs on the CPU in fp32 (no TF32, no
GPU nondeterminism), so it gives the same numbers on any machine. For each case it writes
OUT_DIR/<case>/:

  config.json           the model's config as transformers writes it (every key, not a diff)
  model.safetensors     fp32 weights under their HF names; tied models hold no lm_head.weight
  expected.safetensors  input_ids I32 [B,T]; logits F32 [B,T,V]; nll F32 [B,T-1] (cross entropy
                        of logits[:, :-1] against ids[:, 1:]); loss F32 [1] (their mean);
                        grad.<param> F32 for every parameter (tied: the embedding's gradient
                        includes the head's); greedy.prompt I32 [6]; greedy.output I32 [12]
                        (new tokens only; generate() with and without KV cache agreed, and
                        so did a plain argmax loop)
  documents.ids         each row of input_ids as a line of space-separated ids
  documents.nll         per row: the number of predicted tokens and the sum of their NLL
  greedy.ids            the greedy prompt, then the greedy output, comma-separated

and OUT_DIR/manifest.json naming the versions that produced them. Every weight, norms included,
is drawn away from its initial value, so a loader that skips a tensor cannot pass.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
NEW_TOKENS = 12
PROMPT_LEN = 6
BATCH = 2
MAX_BYTES = 2 * 1000 * 1000
# Projections this large make the blocks, not the embedding, decide the next token: at 0.08 a
# tied model greedily repeats one token forever, which tests no KV cache.
EMBED_STD = 0.1    # embedding and lm_head
WEIGHT_STD = 0.25  # every projection
NORM_STD = 0.1     # norm weights are 1 + NORM_STD * N(0, 1)
MIN_DISTINCT = 4   # distinct tokens a greedy output must have to be worth checking

# name: shape and numerics. Each exercises a different way of getting a dimension wrong.
CASES = {
    # GQA 4/2, q width 64 != hidden 48 (head_dim set, not hidden/heads), tied.
    "gqa_tied_hd16": dict(vocab=160, hidden=48, layers=2, heads=4, kv=2, head_dim=16, inter=64,
                          tied=True, theta=1e6, eps=1e-6, seq=16, seed=5),
    # MHA 4/4, head_dim = hidden/heads, untied, the classic RoPE base.
    "mha_untied": dict(vocab=128, hidden=32, layers=2, heads=4, kv=4, head_dim=8, inter=64,
                       tied=False, theta=1e4, eps=1e-5, seq=12, seed=2),
    # GQA 8/2 (4 query heads per KV head), three layers, the 2507 RoPE base, tied.
    "gqa8_tied_3l": dict(vocab=96, hidden=64, layers=3, heads=8, kv=2, head_dim=8, inter=64,
                         tied=True, theta=5e6, eps=1e-6, seq=14, seed=6),
    # GQA 6/3, head_dim 8 (q width 48 != 40), intermediate 72 (not a multiple of 16), untied.
    "gqa6_untied_hd8": dict(vocab=72, hidden=40, layers=2, heads=6, kv=3, head_dim=8, inter=72,
                            tied=False, theta=1e5, eps=1e-6, seq=13, seed=4),
}


def make_config(c):
    kw = dict(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["inter"],
              num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
              num_key_value_heads=c["kv"], head_dim=c["head_dim"], hidden_act="silu",
              max_position_embeddings=128, rms_norm_eps=c["eps"],
              tie_word_embeddings=c["tied"], attention_bias=False, attention_dropout=0.0,
              use_sliding_window=False, use_cache=True, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x reads it at the top level.
    if TRANSFORMERS_MAJOR >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": c["theta"]}
    else:
        kw["rope_theta"] = c["theta"]
    config = Qwen3Config(**kw)
    config.architectures = ["Qwen3ForCausalLM"]
    config._attn_implementation = "eager"
    assert rope_theta(config) == c["theta"], (rope_theta(config), c["theta"])
    assert config.head_dim == c["head_dim"] and config.num_key_value_heads == c["kv"]
    return config


def rope_theta(config):
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", None))


def make_model(config, c):
    model = Qwen3ForCausalLM(config).float()
    if getattr(model.config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    if c["tied"]:
        model.tie_weights()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == c["tied"], f"lm_head tied={tied}, config says {c['tied']}"
    # Move every weight off its initial value: norms around 1, the rest small normals.
    gen = torch.Generator().manual_seed(1000 + c["seed"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * noise)
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.copy_(EMBED_STD * noise)
            else:
                p.copy_(WEIGHT_STD * noise)
    model.eval()
    return model


def expected_names(c):
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(c["layers"]):
        pre = f"model.layers.{i}."
        names += [pre + n + ".weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    if not c["tied"]:
        names.append("lm_head.weight")
    return sorted(names)


def greedy(model, prompt):
    """The new tokens of generate() with and without KV cache, checked against argmax steps."""
    outs = []
    for use_cache in (True, False):
        gc = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, num_beams=1, use_cache=use_cache,
                              eos_token_id=None, pad_token_id=0, bos_token_id=None)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 generation_config=gc)
        out = out.sequences if hasattr(out, "sequences") else out
        assert out.shape == (1, PROMPT_LEN + NEW_TOKENS), out.shape
        outs.append(out[0, PROMPT_LEN:].clone())
    assert torch.equal(outs[0], outs[1]), f"KV cache changed greedy output: {outs[0]} vs {outs[1]}"
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(seq[0, PROMPT_LEN:], outs[0]), f"generate {outs[0]} != argmax loop {seq[0, PROMPT_LEN:]}"
    assert len(set(outs[0].tolist())) >= MIN_DISTINCT, f"greedy output {outs[0].tolist()} too repetitive: change the seed"
    return outs[0]


def write_config(config, path):
    config.to_json_file(path, use_diff=False)
    with open(path) as f:
        d = json.load(f)
    # Name the weights' type (4.x key torch_dtype, 5.x key dtype) as save_pretrained would.
    d["dtype" if "dtype" in d else "torch_dtype"] = "float32"
    with open(path, "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")


def reload_logits(case_dir, ids):
    """The saved directory loads in transformers and gives the same logits."""
    dtype_kw = {"dtype": torch.float32} if TRANSFORMERS_MAJOR >= 5 else {"torch_dtype": torch.float32}
    model = Qwen3ForCausalLM.from_pretrained(case_dir, attn_implementation="eager", **dtype_kw).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def build_case(out_dir, name, c):
    torch.manual_seed(c["seed"])
    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    config = make_config(c)
    model = make_model(config, c)

    params = dict(model.named_parameters())  # a tied weight appears once, as the embedding
    assert sorted(params) == expected_names(c), sorted(set(params) ^ set(expected_names(c)))
    weights = {n: p.detach().clone().contiguous() for n, p in params.items()}
    save_file(weights, os.path.join(case_dir, "model.safetensors"), metadata={"format": "pt"})
    write_config(config, os.path.join(case_dir, "config.json"))

    gen = torch.Generator().manual_seed(2000 + c["seed"])
    ids = torch.randint(0, c["vocab"], (BATCH, c["seq"]), generator=gen)
    prompt = torch.randint(0, c["vocab"], (1, PROMPT_LEN), generator=gen)

    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    logits = out.logits.float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, c["vocab"]), ids[:, 1:].reshape(-1),
                          reduction="none").view(BATCH, c["seq"] - 1)
    loss = nll.mean()
    assert torch.allclose(loss, out.loss.float(), rtol=1e-5, atol=1e-6), (loss.item(), out.loss.item())
    loss.backward()

    expected = {"input_ids": ids.to(torch.int32).contiguous(),
                "logits": logits.detach().contiguous(),
                "nll": nll.detach().contiguous(),
                "loss": loss.detach().reshape(1).contiguous()}
    for n, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().max() > 0, f"zero gradient for {n}"
        expected["grad." + n] = p.grad.detach().clone().contiguous()
    expected["greedy.prompt"] = prompt[0].to(torch.int32).contiguous()
    expected["greedy.output"] = greedy(model, prompt).to(torch.int32).contiguous()
    meta = {"format": "pt", "transformers": transformers.__version__, "torch": torch.__version__}
    save_file(expected, os.path.join(case_dir, "expected.safetensors"), metadata=meta)
    # Plain-text copies for the shell tests of qwen3-prep and qwen3-train: each row of
    # input_ids as a document, its NLL count and sum, and the greedy prompt and output.
    with open(os.path.join(case_dir, "documents.ids"), "w") as f:
        for row in ids.tolist():
            f.write(" ".join(map(str, row)) + "\n")
    with open(os.path.join(case_dir, "documents.nll"), "w") as f:
        for row in nll.detach().double().tolist():
            f.write(f"{len(row)} {sum(row):.9g}\n")
    with open(os.path.join(case_dir, "greedy.ids"), "w") as f:
        f.write(",".join(map(str, expected["greedy.prompt"].tolist())) + "\n")
        f.write(",".join(map(str, expected["greedy.output"].tolist())) + "\n")

    # The files stand on their own: reloaded weights give the same logits, saved tensors read back.
    again = reload_logits(case_dir, ids)
    assert torch.allclose(again, logits, rtol=0, atol=1e-5), (again - logits).abs().max()
    back = load_file(os.path.join(case_dir, "model.safetensors"))
    assert sorted(back) == expected_names(c) and all(torch.equal(back[n], weights[n]) for n in back)

    size = sum(os.path.getsize(os.path.join(case_dir, f)) for f in os.listdir(case_dir))
    n_params = sum(w.numel() for w in weights.values())
    print(f"{name:16s} params {n_params:6d}  V {c['vocab']:3d}  B×T {BATCH}×{c['seq']}  "
          f"loss {loss.item():.6f}  greedy {expected['greedy.output'].tolist()}  {size / 1000:.0f} kB")
    return {"params": n_params, "loss": loss.item(), "bytes": size, **c}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out_dir = sys.argv[1]
    torch.set_num_threads(1)  # one thread: the same summation order on every machine
    torch.use_deterministic_algorithms(True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, CPU fp32 -> {out_dir}")
    cases = {name: build_case(out_dir, name, c) for name, c in CASES.items()}
    manifest = {"generator": "tests/hf_fixtures.py", "transformers": transformers.__version__,
                "torch": torch.__version__, "batch": BATCH, "prompt_len": PROMPT_LEN,
                "new_tokens": NEW_TOKENS, "cases": cases}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    total = sum(c["bytes"] for c in cases.values())
    print(f"{len(cases)} cases, {total / 1000:.0f} kB in all")
    assert total < MAX_BYTES, f"fixtures are {total} bytes; keep them under {MAX_BYTES}"


if __name__ == "__main__":
    main()
