"""Where a decode step's time goes: the weight matmuls alone (the roofline's
share) against the whole cached step, by batch and cache length.

    python benchmarks/profile_decode.py [--geometry mpt-125m]

Prints a table and one JSON line. For a timeline, wrap a step in
jax.profiler.trace(...) and open it in Perfetto; this script gives the
numbers that explain the gap to the roofline without a viewer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

from easympt import FlaxMptForCausalLM, MptConfig


def ms(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    args = ap.parse_args()
    c = MptConfig.preset(args.geometry)
    model = FlaxMptForCausalLM(c, dtype=jnp.float32, seed=0)
    params = model.params
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
            n = 16

            def steps(params, tok, cache):
                # params is an argument, not a closure: closed-over arrays become HLO constants
                def body(i, carry):
                    tok, cache = carry
                    logits, cache = model.module.apply({"params": params}, tok, None, cache)
                    return jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32), cache
                return jax.lax.fori_loop(0, n, body, (tok, cache))

            loop = jax.jit(steps, donate_argnums=(2,))
            tok = jnp.zeros((B, 1), jnp.int32)
            cache = model.init_cache(B, S)
            tok, cache = loop(params, tok, cache)
            cache = cache.replace(index=jnp.zeros_like(cache.index))
            jax.block_until_ready((tok, cache))  # dispatch is async: the warm-up must finish first
            t0 = time.perf_counter()
            tok, cache = loop(params, tok, cache)
            jax.block_until_ready(tok)
            step = (time.perf_counter() - t0) / n * 1e3
            rows.append({"batch": B, "cache_len": S, "step_ms": step, "matmuls_ms": per_layer * c.n_layers + lm,
                         "lm_head_ms": lm})
    print(f"{'batch':>5s}{'cache':>7s}{'step ms':>10s}{'matmuls ms':>12s}{'lm head ms':>12s}{'other ms':>10s}")
    for r in rows:
        print(f"{r['batch']:5d}{r['cache_len']:7d}{r['step_ms']:10.1f}{r['matmuls_ms']:12.1f}"
              f"{r['lm_head_ms']:12.1f}{r['step_ms'] - r['matmuls_ms']:10.1f}")
    print(json.dumps({"geometry": args.geometry, "backend": jax.default_backend(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
