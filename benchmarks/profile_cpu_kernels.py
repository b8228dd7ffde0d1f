"""easympt's CPU kernels against XLA on the same inputs, in one process, for every instruction set
built for this CPU (AVX-512, AVX2, portable; easympt.kernels.cpu): the weight products of twelve
mpt-125m layers (batch 1, 2, 4, 8, 16), single products of prompt size, and twelve layers of decode
attention (rows holding part of the cache). Medians of runs taken in turns; GB/s against the
machine's measured read bandwidth (the roofline of a decode step).

    python benchmarks/profile_cpu_kernels.py [--reps 20] [--isa avx2,portable] [--format int4]

--format: the kernels' weight format (fp32, bf16, int8, int4; XLA stays float32): GB/s then count
the bytes that format reads.

Prints a table and one JSON line. Needs the kernels (a C++ compiler at install).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from easympt.kernels import cpu, linear, quant
from easympt.kernels.dense_attention import dense_attention
from easympt.kernels.mask import AttentionMask
from easympt.layers import alibi_slopes
from timing import machine

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


def memory_bandwidth(nbytes: int = 1 << 30) -> float:
    """Best read bandwidth (bytes/s) of a jitted reduction over a large array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return nbytes / min(interleaved({"sum": f}, {"sum": (x,)}, 5)["sum"] for _ in range(2))


def packed_product(fmt: str):
    """(pack(w) -> the kernel's operand, product(x, operand, n, isa)) for a weight format."""
    if fmt in quant.FORMATS:
        return (lambda w: linear.pack_quantized(quant.quantize(w, fmt)),
                lambda x, a, n, isa: cpu.packed_matmul_quant(x, a["q"], a["scale"], n, isa))
    dtype = jnp.bfloat16 if fmt == "bf16" else jnp.float32
    return lambda w: cpu.pack(w.astype(dtype)), lambda x, a, n, isa: cpu.packed_matmul(x, a, n, isa)


def layer_products(reps: int, isas, fmt: str = "fp32") -> list[dict]:
    rng = np.random.default_rng(0)
    shapes = [(E, 3 * E), (E, E), (E, F), (F, E)]
    plain = [[jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for s in shapes] for _ in range(LAYERS)]
    pack, product = packed_product(fmt)
    packed = [[pack(w) for w in layer] for layer in plain]
    nbytes = sum(a.nbytes for a in jax.tree_util.tree_leaves(packed))  # the bytes the kernels read

    def chain(mm):
        def f(ws, x):
            for wqkv, wo, wu, wd in ws:
                h = mm(x, wqkv, 3 * E)
                x = x + mm(h[:, :E], wo, E)
                x = x + mm(jax.nn.gelu(mm(x, wu, F)), wd, E)
            return x
        return jax.jit(f)

    fns = {"xla": chain(lambda x, w, n: x @ w),
           **{isa: chain(lambda x, a, n, isa=isa: product(x, a, n, isa)) for isa in isas}}
    rows = []
    for B in (1, 2, 4, 8, 16):
        x = jnp.full((B, E), 0.1, jnp.float32)
        t = interleaved(fns, {name: (plain if name == "xla" else packed, x) for name in fns}, reps)
        rows.append(_row(f"12 layers' weight products ({fmt}), batch {B}", t, nbytes))
    w = jnp.asarray(rng.standard_normal((E, F), np.float32) * 0.02)
    fns = {"xla": jax.jit(lambda x, w: x @ w),
           **{isa: jax.jit(functools.partial(lambda x, a, isa: product(x, a, F, isa), isa=isa)) for isa in isas}}
    for M in (512, 2048):
        x = jnp.asarray(rng.standard_normal((M, E), np.float32))
        t = interleaved(fns, {name: (x, w if name == "xla" else pack(w)) for name in fns}, reps)
        rows.append(_row(f"[{M}, {E}] x [{E}, {F}] ({fmt}, a prompt)", t, None))
    return rows


def _row(what: str, seconds: dict, nbytes: int | None) -> dict:
    """A table row: ms per system and, for a read-bound step, the GB/s each reached."""
    row = {"what": what, **{f"{name}_ms": t * 1e3 for name, t in seconds.items()}}
    if nbytes:
        row.update({f"{name}_gb_s": nbytes / t / 1e9 for name, t in seconds.items()})
    return row


def attention(reps: int, isas) -> list[dict]:
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

        fns = {"xla": layers(dense_attention),
               **{isa: layers(functools.partial(cpu.decode_attention, isa=isa)) for isa in isas}}
        t = interleaved(fns, {name: (q, kts, vs) for name in fns}, reps)
        held_bytes = LAYERS * 2 * B * HEADS * held * D * 4
        rows.append(_row(f"12 layers' decode attention, batch {B}, {S}-slot cache, rows holding {held}", t,
                         held_bytes))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--format", default="fp32", choices=("fp32", "bf16", *quant.FORMATS),
                    help="the kernels' weight format (XLA's product stays float32)")
    ap.add_argument("--isa", default=None, help="comma-separated instruction sets (default: every one built here)")
    args = ap.parse_args()
    isas = [cpu.check_isa(i) for i in args.isa.split(",")] if args.isa else list(cpu.built_isas())
    if not isas or jax.default_backend() != "cpu":
        print("easympt's CPU kernels are not available here (not built, or JAX not on CPU)")
        return 1
    bandwidth = memory_bandwidth()
    rows = layer_products(args.reps, isas, args.format) + attention(args.reps, isas)
    names = ["xla", *isas]
    print(f"{machine()['cpu']}: measured read bandwidth {bandwidth / 1e9:.1f} GB/s; ms per system "
          "(GB/s where the step is read-bound)")
    print(f"{'':84s}" + "".join(f"{n:>16s}" for n in names))
    for r in rows:
        cells = [f"{r[f'{n}_ms']:7.2f}" + (f" ({r[f'{n}_gb_s']:5.1f})" if f"{n}_gb_s" in r else " " * 8)
                 for n in names]
        print(f"{r['what']:84s}" + "".join(f"{c:>16s}" for c in cells))
    print(json.dumps({"backend": jax.default_backend(), **machine(), "isas": isas, "format": args.format,
                      "bandwidth_gb_s": bandwidth / 1e9,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
