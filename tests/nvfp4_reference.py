#!/usr/bin/env python3
"""Independent NVFP4 reference (numpy only), written from REFERENCE.md "NVFP4", not from the C code.
It writes the test vectors that tests/unit/test_nvfp4.c checks bit-exactly (atol = rtol = 0), and
the three GEMMs of one NVFP4 linear layer that tests/unit/test_nvfp4_linear.c checks within fp32
accumulation order:

    /usr/bin/python3 tests/nvfp4_reference.py        # rewrites tests/fixtures/nvfp4/*.bin

Where the C code rounds arithmetically, this file searches tables: E2M1 and E4M3 encodes pick the
nearest representable value by distance, ties to the even code. Every fp32 step of the recipe is a
numpy float32 operation (IEEE, round to nearest, denormals kept).

File formats (little endian):
  scalars.bin   "NVFP4SC1", then twice (E2M1, then E4M3): u32 n, f32 inputs[n], u8 codes[n]
  tensors.bin   "NVFP4TN1", u32 count, then per case:
                  char name[32] (NUL padded), i32 rows, i32 cols, i32 block_rows (1 or 16),
                  i32 stochastic (0 = nearest, 1 = stochastic), u64 seed,
                  f32 x[rows*cols], f32 amax, f32 s_enc, f32 s_dec,
                  u8 codes[rows*cols/2], u8 scales[rows/block_rows * cols/16]
Stochastic cases use the Philox-4x32-10 draws that kernels/nvfp4.h specifies.
  linear.bin    "NVFP4LN1", u32 count, then per case:
                  char name[32], i32 tokens, in, out, rht, stochastic, weight_2d, step, layer,
                  param, u64 seed, u64 stream,
                  f32 x[tokens*in], w[out*in], dy[tokens*out],
                  f32 y[tokens*out] (Fprop), dx[tokens*in] (Dgrad), dw[out*in] (Wgrad)
                The recipe, with y = x·Wᵀ, W [out, in] (nn.Linear):
                  Fprop  y  = X(1x16, RN) · W(16x16 or 1x16, RN)ᵀ
                  Dgrad  dX = dY(1x16, SR) · W   (16x16: the same quantized W; 1x16: Wᵀ quantized)
                  Wgrad  dW = RHT(dYᵀ)(1x16, SR) · RHT(Xᵀ)(1x16, RN)ᵀ, RHT along the tokens
                each product in float64 of the exact values q·s_b, times S_dec,A · S_dec,B.
                seed is the run's (RHT signs and rounding draws); the draws of each stochastic
                operand are keyed by (seed, step, layer, param, operand, stream) as the engine's
                worker/nvfp4_linear.c keys them (operand_seed below: a convention that says which
                draws a layout-independent run uses, not part of the numerics).
"""
import os
import struct

import numpy as np

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e4m3_magnitudes():
    """The 127 finite non-negative E4M3 (fn) values, index = code (0x7f is NaN)."""
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


E4M3_MAGNITUDES = e4m3_magnitudes()


def nearest_even(a, table):
    """Index of the entry of `table` nearest to each a (float64, exact for fp32 inputs), ties to
    the even index (the code whose lowest mantissa bit is 0)."""
    d = np.abs(a[:, None] - table[None, :])
    hit = d == d.min(axis=1, keepdims=True)
    idx = np.arange(len(table))[None, :]
    even = np.where(hit & (idx % 2 == 0), idx, 1 << 20).min(axis=1)
    any_ = np.where(hit, idx, 1 << 20).min(axis=1)
    return np.where(even < (1 << 20), even, any_)


def e2m1_rn(x):
    """Codes of float32 x (already scaled): saturate to +-6, nearest even, sign bit = x < 0."""
    x = np.asarray(x, dtype=np.float32).ravel()
    a = np.minimum(np.abs(x.astype(np.float64)), 6.0)
    return (nearest_even(a, E2M1_MAGNITUDES) + np.where(x < 0, 8, 0)).astype(np.uint8)


def e2m1_sr(x, u):
    """Stochastic rounding: between neighbours lo < hi, up iff u < (|x|-lo)/(hi-lo) * 2^32."""
    x = np.asarray(x, dtype=np.float32).ravel()
    a = np.abs(x.astype(np.float64))
    lo = np.searchsorted(E2M1_MAGNITUDES, a, side="right") - 1   # largest magnitude <= a
    lo = np.minimum(lo, 7)
    code = lo.copy()
    inside = a < 6.0
    l = E2M1_MAGNITUDES[lo[inside]]
    h = E2M1_MAGNITUDES[lo[inside] + 1]
    frac = (a[inside] - l) / (h - l)
    code[inside] += (u[inside].astype(np.float64) < frac * 2.0**32).astype(np.int64)
    code[~inside] = 7
    return (code + np.where(x < 0, 8, 0)).astype(np.uint8)


def e4m3_rne_satfinite(v):
    v = np.asarray(v, dtype=np.float32).ravel()
    a = np.minimum(np.abs(v.astype(np.float64)), 448.0)
    return (nearest_even(a, E4M3_MAGNITUDES) + np.where(v < 0, 0x80, 0)).astype(np.uint8)


def e4m3_value(code):
    code = np.asarray(code)
    mag = E4M3_MAGNITUDES[code & 0x7F].astype(np.float32)
    return np.where(code & 0x80, -mag, mag).astype(np.float32)


def philox4x32_10(ctr, key):
    """Philox-4x32-10 on arrays of counters ([n, 4] uint32) with one key (2 x uint32)."""
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    mask = np.uint64(0xFFFFFFFF)
    c = [ctr[:, j].astype(np.uint64) for j in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r:
            k0 = (k0 + np.uint64(0x9E3779B9)) & mask
            k1 = (k1 + np.uint64(0xBB67AE85)) & mask
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & mask, p1 & mask,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & mask, p0 & mask]
    return np.stack(c, axis=1).astype(np.uint32)


def sr_draws(n, seed):
    """u_i for i = 0..n-1: word i % 4 of philox(key = seed, counter = {i/4 lo, i/4 hi, 0, 0})."""
    groups = np.arange((n + 3) // 4, dtype=np.uint64)
    ctr = np.zeros((len(groups), 4), dtype=np.uint64)
    ctr[:, 0] = groups & np.uint64(0xFFFFFFFF)
    ctr[:, 1] = groups >> np.uint64(32)
    key = (seed & 0xFFFFFFFF, seed >> 32)
    return philox4x32_10(ctr, key).reshape(-1)[:n]


def quantize(x, block_rows, stochastic=False, seed=0):
    """REFERENCE.md's recipe, one float32 operation at a time."""
    x = np.asarray(x, dtype=np.float32)
    rows, cols = x.shape
    with np.errstate(over="ignore", divide="ignore", under="ignore"):
        amax = F32(np.max(np.abs(x)))
        s_enc = F32(min(F32(F32(448.0) * F32(6.0)) / amax, FLT_MAX))
        if amax == 0 or s_enc == 0:
            s_enc = F32(1.0)
        s_dec = F32(F32(1.0) / s_enc)
        enc_over_6 = F32(s_enc * F32(F32(1.0) / F32(6.0)))
        # blocks: [rows/br, br, cols/16, 16] -> amax per (row block, column block)
        xb = x.reshape(rows // block_rows, block_rows, cols // 16, 16)
        amax_b = np.abs(xb).max(axis=(1, 3)).astype(np.float32)
        scale_codes = e4m3_rne_satfinite(amax_b * enc_over_6).reshape(amax_b.shape)
        s_b = e4m3_value(scale_codes)
        enc_b = np.minimum(F32(1.0) / (s_b * s_dec), FLT_MAX).astype(np.float32)
        scaled = (xb * enc_b[:, None, :, None]).astype(np.float32).reshape(rows, cols)
    if stochastic:
        codes = e2m1_sr(scaled, sr_draws(rows * cols, seed))
    else:
        codes = e2m1_rn(scaled)
    codes = codes.reshape(-1)
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    return packed, scale_codes.reshape(-1), (amax, s_enc, s_dec)


def dequantize(packed, scales, rows, cols, block_rows):
    """The exact values q * s_b (float64) of a quantized tensor, without S_dec."""
    codes = np.empty(rows * cols, dtype=np.uint8)
    codes[0::2], codes[1::2] = packed & 15, packed >> 4
    mag = E2M1_MAGNITUDES[codes & 7]
    q = np.where(codes & 8, -mag, mag).reshape(rows, cols)
    s = e4m3_value(scales).astype(np.float64).reshape(rows // block_rows, cols // 16)
    return q * np.repeat(np.repeat(s, block_rows, axis=0), 16, axis=1)


def quantize_values(x, block_rows, stochastic=False, seed=0):
    """(q * s_b as float64, S_dec as float64): a GEMM operand."""
    packed, scales, (_, _, s_dec) = quantize(x, block_rows, stochastic, seed)
    return dequantize(packed, scales, x.shape[0], x.shape[1], block_rows), float(s_dec)


def hadamard_signs(seed):
    """The run's 16 RHT signs: bit j of philox(key = seed, counter = {0, 0, 0, 1})[0] & 0xffff."""
    word = philox4x32_10(np.array([[0, 0, 0, 1]], dtype=np.uint32),
                         (seed & 0xFFFFFFFF, seed >> 32))[0, 0]
    return int(word) & 0xFFFF


def rht(x, signs):
    """Every 16-wide tile v of every row -> v · diag(s) · H16 / 4, exactly, rounded once to fp32."""
    i = np.arange(16)
    h = np.array([[(-1) ** bin(a & b).count("1") for b in i] for a in i], dtype=np.float64)
    s = np.array([-1.0 if signs >> j & 1 else 1.0 for j in i])
    r = (s[:, None] * h) / 4
    rows, cols = x.shape
    tiles = x.astype(np.float64).reshape(rows, cols // 16, 16)
    return (tiles @ r).reshape(rows, cols).astype(np.float32)


def operand_seed(seed, step, layer, param, operand, stream):
    """The seed of one stochastically rounded operand (worker/nvfp4_linear.c's key mixing)."""
    m = (1 << 64) - 1
    x = seed
    for part in (step, layer, param, operand, stream):
        x ^= (part + 0x9E3779B97F4A7C15 + ((x << 6) & m) + (x >> 2)) & m
        x = ((x ^ (x >> 31)) * 0xBF58476D1CE4E5B9) & m
    return x


def linear_gemms(x, w, dy, rht_on, stochastic, weight_2d, seed, step, layer, param, stream):
    """Fprop, Dgrad and Wgrad of one NVFP4 linear, as float32 arrays."""
    wb = 16 if weight_2d else 1
    xq, x_dec = quantize_values(x, 1)
    wq, w_dec = quantize_values(w, wb)
    y = (xq @ wq.T) * (x_dec * w_dec)

    dyq, dy_dec = quantize_values(dy, 1, stochastic,
                                  operand_seed(seed, step, layer, param, 0, stream))
    if weight_2d:   # 16x16 tiles: Wᵀ quantizes to the transpose of W's values
        wtq, wt_dec = wq.T, w_dec
    else:
        wtq, wt_dec = quantize_values(np.ascontiguousarray(w.T), 1)
    dx = (dyq @ wtq.T) * (dy_dec * wt_dec)

    a, b = np.ascontiguousarray(dy.T), np.ascontiguousarray(x.T)   # [out, tokens], [in, tokens]
    if rht_on:
        signs = hadamard_signs(seed)
        a, b = rht(a, signs), rht(b, signs)
    aq, a_dec = quantize_values(a, 1, stochastic, operand_seed(seed, step, layer, param, 1, stream))
    bq, b_dec = quantize_values(b, 1)
    dw = (aq @ bq.T) * (a_dec * b_dec)
    return [t.astype(np.float32) for t in (y, dx, dw)]


def linear_cases():
    """A gate_proj-like linear (in 32, out 48) over 32 tokens (two RHT tiles), inputs with
    outliers, as the recipe runs it and with every part switched off."""
    rng = np.random.default_rng(20261130)
    n, d_in, d_out = 32, 32, 48
    x = rng.standard_normal((n, d_in))
    x[rng.random(x.shape) < 0.02] *= 20.0
    w = rng.normal(0, 0.1, (d_out, d_in))
    dy = rng.standard_normal((n, d_out)) * 1e-3
    dy[rng.random(dy.shape) < 0.02] *= 30.0
    x, w, dy = (t.astype(np.float32) for t in (x, w, dy))
    keys = dict(seed=0x5EED0F4C0FFEE123, step=7, layer=0, param=8, stream=0x0123456789ABCDEF)
    yield "recipe", x, w, dy, dict(rht_on=1, stochastic=1, weight_2d=1, **keys)
    yield "plain", x, w, dy, dict(rht_on=0, stochastic=0, weight_2d=0, **keys)


# ---- inputs ----------------------------------------------------------------------------------

def tie_tensor():
    """Elements exactly at E2M1 midpoints times power-of-two block scales, plus E4M3 scale ties.
    One element of 2688 makes amax = 448*6, so S_enc = S_dec = 1 and everything below is exact."""
    x = np.zeros((32, 64), dtype=np.float32)
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    for b in range(x.size // 16):
        r, c0 = divmod(b * 16, 64)
        s = 2.0 ** ((b % 9) - 4)                     # block scale 2^-4 .. 2^4, exact in E4M3
        sign = -1.0 if b % 3 == 1 else 1.0
        vals = np.concatenate([ties, -ties]) * s * sign
        x[r, c0:c0 + 16] = np.roll(vals, b)
    x[0, 0] = 2688.0                                 # its block: scale 448
    x[1, 0:16] = np.array([6.375] + [0.25 * 1.0625] * 15)   # amax/6 = 1.0625: tie -> 1.0
    x[1, 16:32] = np.array([7.125] + [0.75 * 1.1875] * 15)  # amax/6 = 1.1875: tie -> 1.25
    return x


def dynamic_range_tensor(rng):
    """Blocks from 1e-12 to 1e3 of the largest: E4M3 subnormal scales, scales that round to 0
    (saturated codes), and zero blocks inside a non-zero tensor."""
    x = rng.standard_normal((32, 64)).astype(np.float32)
    mags = 10.0 ** np.linspace(-12, 3, x.size // 16)
    for b, m in enumerate(mags):
        r, c0 = divmod(b * 16, 64)
        x[r, c0:c0 + 16] *= m
    x[5, 16:32] = 0.0
    x[16:32, 48:64] = 0.0
    return x.astype(np.float32)


def all_equal_blocks(rng):
    x = np.empty((32, 64), dtype=np.float32)
    vals = rng.standard_normal(x.size // 16) * 10.0 ** rng.integers(-3, 4, x.size // 16)
    for b, v in enumerate(vals):
        r, c0 = divmod(b * 16, 64)
        x[r, c0:c0 + 16] = v
    return x


def cases():
    rng = np.random.default_rng(20261127)
    normal = rng.standard_normal((32, 64)).astype(np.float32)
    heavy = rng.standard_t(1.5, (32, 64))
    spikes = rng.random((32, 64)) < 0.01
    heavy[spikes] *= rng.lognormal(4.0, 2.0, spikes.sum())
    yield "normal", normal
    yield "heavy_tailed", heavy.astype(np.float32)
    yield "tiny_1e-30", (rng.standard_normal((32, 64)) * 1e-30).astype(np.float32)
    yield "huge_1e30", (rng.standard_normal((32, 64)) * 1e30).astype(np.float32)
    # amax ~ 1e-38 < 448*6 / FLT_MAX: S_enc clamps to FLT_MAX, S_dec is an fp32 denormal
    yield "denormal_1e-38", (rng.standard_normal((16, 32)) * 1e-38).astype(np.float32)
    yield "near_flt_max", (rng.uniform(-1, 1, (16, 32)) * 3.0e38).astype(np.float32)
    yield "ties", tie_tensor()
    yield "zeros", np.zeros((16, 32), dtype=np.float32)
    yield "all_equal_blocks", all_equal_blocks(rng)
    yield "dynamic_range", dynamic_range_tensor(rng)
    yield "wide_48x32", rng.standard_normal((48, 32)).astype(np.float32)


def scalar_inputs():
    mids = lambda t: (t[1:] + t[:-1]) / 2
    def around(v):
        v = np.asarray(v, dtype=np.float32)
        return np.concatenate([v, np.nextafter(v, F32(-np.inf)), np.nextafter(v, F32(np.inf))])
    e2m1 = np.concatenate([around(E2M1_MAGNITUDES), around(mids(E2M1_MAGNITUDES)),
                           [7.0, 1e30, 1e-45, 0.1]]).astype(np.float32)
    e2m1 = np.concatenate([e2m1, -e2m1, [-0.0]]).astype(np.float32)
    e4m3 = np.concatenate([around(E4M3_MAGNITUDES), around(mids(E4M3_MAGNITUDES)),
                           [456.0, 464.0, 480.0, 1e10, 3.0e38, 2.0**-10, 2.0**-11, 1e-45, 1e-40]])
    e4m3 = np.concatenate([e4m3, -e4m3]).astype(np.float32)
    return e2m1, e4m3


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "nvfp4")
    os.makedirs(out, exist_ok=True)

    e2m1_in, e4m3_in = scalar_inputs()
    with open(os.path.join(out, "scalars.bin"), "wb") as f:
        f.write(b"NVFP4SC1")
        for inputs, codes in ((e2m1_in, e2m1_rn(e2m1_in)), (e4m3_in, e4m3_rne_satfinite(e4m3_in))):
            f.write(struct.pack("<I", len(inputs)))
            f.write(inputs.astype("<f4").tobytes())
            f.write(codes.tobytes())

    records = []
    for name, x in cases():
        for block_rows in (1, 16):
            records.append((name, x, block_rows, 0, 0))
    sr_seed = 0x0123456789ABCDEF
    for name, x in list(cases())[:2]:
        records.append((name + "_sr", x, 1, 1, sr_seed))
    with open(os.path.join(out, "tensors.bin"), "wb") as f:
        f.write(b"NVFP4TN1")
        f.write(struct.pack("<I", len(records)))
        for name, x, block_rows, stochastic, seed in records:
            packed, scales, (amax, s_enc, s_dec) = quantize(x, block_rows, stochastic, seed)
            f.write(name.encode().ljust(32, b"\0"))
            f.write(struct.pack("<iiiiQ", x.shape[0], x.shape[1], block_rows, stochastic, seed))
            f.write(x.astype("<f4").tobytes())
            f.write(struct.pack("<fff", amax, s_enc, s_dec))
            f.write(packed.tobytes())
            f.write(scales.tobytes())
    linear = list(linear_cases())
    with open(os.path.join(out, "linear.bin"), "wb") as f:
        f.write(b"NVFP4LN1")
        f.write(struct.pack("<I", len(linear)))
        for name, x, w, dy, k in linear:
            y, dx, dw = linear_gemms(x, w, dy, **k)
            f.write(name.encode().ljust(32, b"\0"))
            f.write(struct.pack("<9iQQ", x.shape[0], x.shape[1], w.shape[0], k["rht_on"],
                                k["stochastic"], k["weight_2d"], k["step"], k["layer"], k["param"],
                                k["seed"], k["stream"]))
            for t in (x, w, dy, y, dx, dw):
                f.write(t.astype("<f4").tobytes())
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {len(records)} tensor cases, {len(e2m1_in) + len(e4m3_in)} scalars and "
          f"{len(linear)} linear layers "
          f"to {out} ({total} bytes)")


if __name__ == "__main__":
    main()
