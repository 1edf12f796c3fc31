#!/usr/bin/env python3
"""Independent NVFP4 reference (numpy only), written from REFERENCE.md "NVFP4", not from the C code.
It writes the test vectors that tests/unit/test_nvfp4.c checks bit-exactly (atol = rtol = 0):

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
    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {len(records)} tensor cases and {len(e2m1_in) + len(e4m3_in)} scalars "
          f"to {out} ({total} bytes)")


if __name__ == "__main__":
    main()
