"""Long prompts on one machine: peak memory and time of a chunked prefill, decode speed at long contexts.

Random weights in mpt-125m geometry (or --geometry), float32, batch 1. For each prompt length a fresh
process loads the model, then prefills the prompt chunk by chunk (--chunk tokens) into a KV cache of
length + 64 slots; peak RSS (VmHWM) is reported over the RSS after loading (the weights), next to
the KV cache's own bytes, so "temporaries" = peak growth - KV cache. The same process times batch-1
greedy decode (32 steps after 1 warm-up dispatch) at that context. At the smallest length the
one-pass prefill with dense attention (as before the blockwise kernel and chunks) runs too.
Prints a table and one JSON line.

    python benchmarks/bench_long_context.py [--lengths 2048,8192,16384,32768] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(length: int, chunk: int, geometry: str, one_pass: bool) -> dict:
    import jax
    import numpy as np

    from easympt import FlaxMptForCausalLM, MptConfig
    from easympt.generation import GenerationEngine, SamplingConfig

    config = MptConfig.preset(geometry)
    # "before": one pass with dense attention, as easympt prefilled before the blockwise kernel
    model = FlaxMptForCausalLM(config, dtype="fp32", seed=0, attention="dense" if one_pass else "auto")
    jax.block_until_ready(model.params)
    slots = length + 64
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10**6)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, length).tolist()
    eng = GenerationEngine(model, model.params, max_length=slots, max_compile_tokens=32,
                           prefill_chunk=length if one_pass else chunk)
    base = _rss("VmRSS")
    t0 = time.perf_counter()
    prefix = eng.prefill_batch([ids], [cfg], cache_len=slots)
    jax.block_until_ready(prefix.token)
    prefill_s = time.perf_counter() - t0  # includes compiling the chunk shapes (a few seconds)
    peak = _rss("VmHWM") - base
    kv = 2 * config.n_layers * config.kv_heads * config.head_dim * slots * 4
    state = eng.start(prefix)
    state, out = eng.generate(eng.params, state, n_steps=32)  # warm-up (compile)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    state, out = eng.generate(eng.params, state, n_steps=32)
    jax.block_until_ready(out)
    decode = 32 / (time.perf_counter() - t0)
    return {"length": length, "one_pass": one_pass, "prefill_s": prefill_s, "prefill_ms_per_token": prefill_s / length * 1e3,
            "peak_growth_bytes": peak, "kv_cache_bytes": kv, "temporaries_bytes": peak - kv, "decode_tok_s": decode}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192,16384,32768")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        length, one_pass = args.worker.split(":")
        print(json.dumps(worker(int(length), args.chunk, args.geometry, one_pass == "1")))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    runs = [(lengths[0], True)] + [(n, False) for n in lengths]
    rows = []
    for n, one_pass in runs:
        out = subprocess.run([sys.executable, __file__, "--worker", f"{n}:{int(one_pass)}", "--chunk", str(args.chunk),
                              "--geometry", args.geometry], capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['length']:>6} tokens {'one pass' if one_pass else f'chunks of {args.chunk}':>15}: prefill "
              f"{r['prefill_s']:7.1f} s ({r['prefill_ms_per_token']:.2f} ms/token), peak +{r['peak_growth_bytes'] / 2**20:7.0f} "
              f"MiB = KV cache {r['kv_cache_bytes'] / 2**20:6.0f} MiB + {r['temporaries_bytes'] / 2**20:6.0f} MiB; "
              f"decode {r['decode_tok_s']:.1f} tok/s", flush=True)
    print(json.dumps({"bench": "long_context", "geometry": args.geometry, "chunk": args.chunk, "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
