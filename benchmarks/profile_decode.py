"""Where a decode step's time goes: the weight matmuls alone (the roofline's
share) against the whole cached step, by batch and cache length (rows holding
half the cache); with easympt's CPU kernels built, the step with them too (what
the engine runs on CPU).

    python benchmarks/profile_decode.py [--geometry mpt-125m] [--windows] [--speculative K]

Prints a table and one JSON line. For a timeline, wrap a step in
jax.profiler.trace(...) and open it in Perfetto; this script gives the
numbers that explain the gap to the roofline without a viewer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import types

import jax
import jax.numpy as jnp

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.generation.sampling import greedy_tokens
from easympt.kernels import cpu, linear
from timing import machine


def ms(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def step_ms(model, params, B: int, S: int, held: int = 0, window: int | None = None, n: int = 16,
            width: int = 1) -> float:
    """ms per decode step: n steps chained in one dispatch, every row holding `held` of S cache slots,
    attending over the first `window` slots (None: all of them), as the engine does. `width`: tokens
    per row and step (k + 1 for a speculative step checking k drafts)."""

    def steps(params, tok, cache):
        # params is an argument, not a closure: closed-over arrays become HLO constants
        def body(i, carry):
            tok, cache = carry
            logits, cache = model.module.apply({"params": params}, tok, None, cache, cache_window=window)
            nxt = greedy_tokens(logits[:, -1])[:, None]  # the engine's greedy choice
            return jnp.repeat(nxt, width, axis=1), cache
        return jax.lax.fori_loop(0, n, body, (tok, cache))

    def holding(cache):
        return cache.replace(index=jnp.full_like(cache.index, held),
                             key_valid=jnp.broadcast_to(jnp.arange(S) < held, (B, S)))

    loop = jax.jit(steps, donate_argnums=(2,))
    tok = jnp.zeros((B, width), jnp.int32)
    tok, cache = loop(params, tok, holding(model.init_cache(B, S)))
    cache = holding(cache)
    jax.block_until_ready((tok, cache))  # dispatch is async: the warm-up must finish first
    t0 = time.perf_counter()
    tok, cache = loop(params, tok, cache)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t0) / n * 1e3


# (cache slots, tokens the row holds, windows): what a server with a long max_length reads per step
WINDOW_CASES = ((8192, 32, (None, 128)), (8192, 1000, (None, 2048, 1024)), (65536, 1000, (None, 16384, 4096)))


def checked_table(model, params, packed, k: int) -> list[dict]:
    """A speculative step's cost: K + 1 tokens a row against one, rows holding 64 of 256 slots, on the
    engine's weights (packed where the CPU kernels run). A step that reads every weight once costs
    about the same for both: what a checked step's accepted drafts save."""
    runs = packed or (model, params)
    rows = []
    for B in (1, 8):
        plain, checked = step_ms(*runs, B, 256, 64, n=8), step_ms(*runs, B, 256, 64, n=8, width=k + 1)
        rows.append({"batch": B, "k": k, "plain_step_ms": plain, "checked_step_ms": checked,
                     "checked_over_plain": checked / plain})
    print(f"{'batch':>5s}{'plain step ms':>15s}{f'step of {k + 1} tokens ms':>22s}{'ratio':>8s}")
    for r in rows:
        print(f"{r['batch']:5d}{r['plain_step_ms']:15.2f}{r['checked_step_ms']:22.2f}{r['checked_over_plain']:8.2f}")
    return rows


def window_table(model, params) -> list[dict]:
    """Batch-1 steps over windows of large caches (plain weights: the attention is what differs)."""
    rows = []
    for S, held, windows in WINDOW_CASES:
        for w in windows:
            rows.append({"cache_len": S, "held": held, "window": w, "step_ms": step_ms(model, params, 1, S, held, w, 8)})
    print(f"{'cache':>7s}{'held':>6s}{'window':>8s}{'step ms':>10s}")
    for r in rows:
        print(f"{r['cache_len']:7d}{r['held']:6d}{str(r['window'] or 'all'):>8s}{r['step_ms']:10.1f}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="also time a step that checks K drafts (K + 1 tokens a row) against a plain one")
    ap.add_argument("--windows", action="store_true",
                    help="also time batch-1 steps over cache windows in 8k and 65k-slot caches (5 GB)")
    args = ap.parse_args()
    c = MptConfig.preset(args.geometry)
    model = FlaxMptForCausalLM(c, dtype=jnp.float32, seed=0)
    params = model.params
    packed = None
    if cpu.available():  # the engine's model: packed module, packed weights
        packed = (types.SimpleNamespace(module=model.module.clone(cpu_kernels=True), init_cache=model.init_cache),
                  linear.pack_params(params))
    mm = jax.jit(lambda h, w: h @ w)
    head = jax.jit(lambda h, w: h @ w.T)  # tied head: the embedding read transposed
    rows = []
    for B in (1, 8):
        block = params["transformer"]["blocks_0"]
        per_layer = (ms(mm, jnp.ones((B, c.d_model)), block["attn"]["Wqkv"]["kernel"])
                     + ms(mm, jnp.ones((B, c.d_model)), block["attn"]["out_proj"]["kernel"])
                     + ms(mm, jnp.ones((B, c.d_model)), block["ffn"]["up_proj"]["kernel"])
                     + ms(mm, jnp.ones((B, c.ffn_hidden_size)), block["ffn"]["down_proj"]["kernel"]))
        lm = ms(head, jnp.ones((B, c.d_model)), params["transformer"]["wte"]["embedding"])
        for S in (64, 256, 1024):
            # rows holding half the cache: XLA's attention reads every slot, the kernel the held ones
            rows.append({"batch": B, "cache_len": S, "step_ms": step_ms(model, params, B, S, S // 2),
                         "matmuls_ms": per_layer * c.n_layers + lm, "lm_head_ms": lm,
                         "packed_step_ms": step_ms(*packed, B, S, S // 2) if packed else None})
    print(f"{'batch':>5s}{'cache':>7s}{'step ms':>10s}{'matmuls ms':>12s}{'lm head ms':>12s}{'other ms':>10s}"
          f"{'packed step ms':>16s}")
    for r in rows:
        print(f"{r['batch']:5d}{r['cache_len']:7d}{r['step_ms']:10.1f}{r['matmuls_ms']:12.1f}"
              f"{r['lm_head_ms']:12.1f}{r['step_ms'] - r['matmuls_ms']:10.1f}"
              f"{r['packed_step_ms'] or float('nan'):16.1f}")
    windows = window_table(model, params) if args.windows else None
    checked = checked_table(model, params, packed, args.speculative) if args.speculative else None
    print(json.dumps({"geometry": args.geometry, "backend": jax.default_backend(), **machine(), "rows": rows,
                      "windows": windows, "speculative": checked}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
