"""easympt's CPU kernels against XLA on the same inputs, in one process: the weight products of
twelve mpt-125m layers (batch 1, 8, 16), single products of prompt size, and twelve layers of
decode attention (rows holding part of the cache). Medians of interleaved runs.

    python benchmarks/profile_cpu_kernels.py [--reps 20]

Prints a table and one JSON line. Needs the kernels (x86-64 with AVX-512F).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from easympt import cpu_kernels
from easympt.attention import AttentionMask, dense_attention
from easympt.layers import alibi_slopes

E, F, LAYERS, HEADS = 768, 3072, 12, 12


def interleaved(fns: dict, args: dict, reps: int) -> dict:
    """Median seconds of each jitted fn on its args, runs interleaved (the machine's drift hits both)."""
    for name, f in fns.items():
        jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def layer_products(reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    shapes = [(E, 3 * E), (E, E), (E, F), (F, E)]
    plain = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes] for _ in range(LAYERS)]
    packed = [[cpu_kernels.pack(w) for w in layer] for layer in plain]
    nbytes = sum(w.size * 4 for layer in plain for w in layer)

    def chain(mm):
        def f(ws, x):
            for wqkv, wo, wu, wd in ws:
                h = mm(x, wqkv, 3 * E)
                x = x + mm(h[:, :E], wo, E)
                x = x + mm(jax.nn.gelu(mm(x, wu, F)), wd, E)
            return x
        return jax.jit(f)

    fns = {"xla": chain(lambda x, w, n: x @ w), "kernel": chain(cpu_kernels.packed_matmul)}
    rows = []
    for B in (1, 8, 16):
        x = jnp.full((B, E), 0.1, jnp.float32)
        t = interleaved(fns, {"xla": (plain, x), "kernel": (packed, x)}, reps)
        rows.append({"what": f"12 layers' weight products, batch {B}", "xla_ms": t["xla"] * 1e3,
                     "kernel_ms": t["kernel"] * 1e3, "kernel_gb_s": nbytes / t["kernel"] / 1e9})
    w = jnp.asarray(rng.standard_normal((E, F), np.float32) * 0.02)
    fns = {"xla": jax.jit(lambda x, w: x @ w), "kernel": jax.jit(lambda x, w: cpu_kernels.packed_matmul(x, w, F))}
    for M in (512, 2048):
        x = jnp.asarray(rng.standard_normal((M, E), np.float32))
        t = interleaved(fns, {"xla": (x, w), "kernel": (x, cpu_kernels.pack(w))}, reps)
        rows.append({"what": f"[{M}, {E}] x [{E}, {F}] (a prompt)", "xla_ms": t["xla"] * 1e3,
                     "kernel_ms": t["kernel"] * 1e3, "kernel_gb_s": None})
    return rows


def attention(reps: int) -> list[dict]:
    rows = []
    slopes = jnp.asarray(alibi_slopes(HEADS)).reshape(HEADS, 1)
    for B, S, held in ((8, 256, 96), (1, 2304, 2100), (1, 65536, 1000)):
        rng = np.random.default_rng(1)
        D = E // HEADS
        kts = [jnp.asarray(rng.standard_normal((B * HEADS, D, S)), jnp.float32) for _ in range(LAYERS)]
        vs = [jnp.asarray(rng.standard_normal((B * HEADS, S, D)), jnp.float32) for _ in range(LAYERS)]
        q = jnp.asarray(rng.standard_normal((B, HEADS, 1, 1, D)), jnp.float32)
        valid = jnp.asarray(np.arange(S)[None].repeat(B, 0) < held)
        mask = AttentionMask(jnp.full((B, 1), held - 1, jnp.int32), jnp.arange(S, dtype=jnp.int32), valid)

        def layers(attend):
            def f(q, kts, vs):
                total = 0.0
                for kt, v in zip(kts, vs):
                    total = total + attend(q, kt, v, mask, slopes, D ** -0.5).sum()
                    q = q + 1e-6 * total  # each layer's query depends on the previous one's output
                return total
            return jax.jit(f)

        fns = {"xla": layers(dense_attention), "kernel": layers(cpu_kernels.decode_attention)}
        t = interleaved(fns, {name: (q, kts, vs) for name in fns}, reps)
        held_bytes = LAYERS * 2 * B * HEADS * held * D * 4
        rows.append({"what": f"12 layers' decode attention, batch {B}, {S}-slot cache, rows holding {held}",
                     "xla_ms": t["xla"] * 1e3, "kernel_ms": t["kernel"] * 1e3,
                     "kernel_gb_s": held_bytes / t["kernel"] / 1e9})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not cpu_kernels.available():
        print("easympt's CPU kernels are not available here (not built, not x86-64 with AVX-512F, or "
              "EASYMPT_CPU_KERNELS=0)")
        return 1
    rows = layer_products(args.reps) + attention(args.reps)
    print(f"{'':78s}{'XLA ms':>9s}{'kernel ms':>11s}{'kernel GB/s':>13s}")
    for r in rows:
        gb = f"{r['kernel_gb_s']:13.1f}" if r["kernel_gb_s"] else f"{'':13s}"
        print(f"{r['what']:78s}{r['xla_ms']:9.2f}{r['kernel_ms']:11.2f}{gb}")
    print(json.dumps({"backend": jax.default_backend(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
