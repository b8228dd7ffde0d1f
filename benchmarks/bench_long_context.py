"""Long prompts on one machine: peak memory and time of a chunked prefill, decode speed at long contexts.

Random weights in mpt-125m geometry (or --geometry), float32, batch 1. For each prompt length a fresh
process loads the model, then prefills the prompt chunk by chunk (--chunk tokens) into a KV cache of
length + 64 slots; peak RSS (VmHWM) is reported over the RSS after loading (the weights), next to
the KV cache's own bytes, so "temporaries" = peak growth - KV cache. The same process times batch-1
greedy decode (32 steps after 1 warm-up dispatch) at that context. At the smallest length the
one-pass prefill with dense attention (as before the blockwise kernel and chunks) runs too.
With --reference N: the greedy continuation of an N-token prompt by a small random ALiBi model
(the tests' geometry, max_seq_len 64), prefilled in chunks with the blockwise kernel, against the
numpy reference of llm-foundry's MPT (tests/reference_mpt.py, float64, attention a block of query
rows at a time). Prints a table and one JSON line.

With --kv-dtype bf16 the KV cache is bfloat16 (half the bytes; float32 compute), with int8 8-bit (a
scale per token and KV head). With --kv-compare N,N: only decode after N-token prompts with each
cache (float32, bfloat16, int8), in one process, timed in turns.

    python benchmarks/bench_long_context.py [--lengths 2048,8192,16384,32768] [--chunk 2048] [--kv-dtype bf16]
                                            [--reference 16384] [--kv-compare 2048,8192,16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from timing import machine

KV_DTYPES = ("float32", "bfloat16", "int8")  # the caches --kv-compare times


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(length: int, chunk: int, geometry: str, one_pass: bool, kv_dtype: str | None) -> dict:
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
                           prefill_chunk=length if one_pass else chunk, kv_dtype=kv_dtype)
    with open("/proc/self/clear_refs", "w") as fh:  # peak RSS from here: not the engine's packing of the weights
        fh.write("5")
    base = _rss("VmRSS")
    t0 = time.perf_counter()
    prefix = eng.prefill_batch([ids], [cfg], cache_len=slots)
    jax.block_until_ready(prefix.token)
    prefill_s = time.perf_counter() - t0  # includes compiling the chunk shapes (a few seconds)
    peak = _rss("VmHWM") - base
    kv = sum(x.nbytes for x in (*prefix.cache.keys, *prefix.cache.values))
    state = eng.start(prefix)
    state, out = eng.generate(eng.params, state, n_steps=32)  # warm-up (compile)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    state, out = eng.generate(eng.params, state, n_steps=32)
    jax.block_until_ready(out)
    decode = 32 / (time.perf_counter() - t0)
    return {"length": length, "one_pass": one_pass, "prefill_s": prefill_s, "prefill_ms_per_token": prefill_s / length * 1e3,
            "peak_growth_bytes": peak, "kv_cache_bytes": kv, "temporaries_bytes": peak - kv, "decode_tok_s": decode}


def kv_compare(length: int, geometry: str, rounds: int = 5) -> dict:
    """Batch-1 decode after a `length`-token prompt with a float32 and a bfloat16 KV cache, both engines
    in this process and timed in turns (16-step dispatches, median of `rounds`): this machine's
    bandwidth moves between minutes, so figures from separate processes do not compare."""
    import jax
    import numpy as np

    from easympt import FlaxMptForCausalLM, MptConfig
    from easympt.generation import GenerationEngine, SamplingConfig
    from timing import in_turns

    config = MptConfig.preset(geometry)
    model = FlaxMptForCausalLM(config, dtype="fp32", seed=0)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, length).tolist()
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=10**6)
    def decoder(kv_dtype):
        """A no-argument call that decodes 16 more tokens of the same row and returns its tok/s."""
        eng = GenerationEngine(model, model.params, max_length=length + 256, max_compile_tokens=32, kv_dtype=kv_dtype)
        state = [eng.start(eng.prefill_batch([ids], [cfg], cache_len=length + 256))]

        def step():
            t0 = time.perf_counter()
            state[0], out = eng.generate(eng.params, state[0], n_steps=16)
            jax.block_until_ready(out)
            return 16 / (time.perf_counter() - t0)
        return step

    # the warm-up round compiles; each row decodes 16 * (rounds + 1) tokens, within its 256 spare slots
    rates = in_turns({kv: decoder(kv) for kv in KV_DTYPES}, rounds)
    return {"length": length, **{f"decode_tok_s_{kv}": float(np.median(r)) for kv, r in rates.items()}}


def reference_check(length: int, chunk: int, n_new: int = 4) -> dict:
    """easympt's greedy tokens after a `length`-token prompt equal the numpy reference's?"""
    import tempfile

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from conftest import full_config, random_state_dict, write_checkpoint
    from reference_mpt import forward

    from easympt import FlaxMptForCausalLM
    from easympt.generation import GenerationEngine, SamplingConfig
    from easympt.transform import mpt_from_pretrained

    cfg = full_config(max_seq_len=64)
    sd = random_state_dict(cfg, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        params, config = mpt_from_pretrained(write_checkpoint(os.path.join(tmp, "m"), cfg, sd), dtype="fp32",
                                             progress=False)
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], length).tolist()
    eng = GenerationEngine(FlaxMptForCausalLM(config, dtype="fp32", _do_init=False), params,
                           max_length=length + 64, max_compile_tokens=16, prefill_chunk=chunk)
    t0 = time.perf_counter()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=n_new, logprobs=5)
    prefix = eng.prefill_batch([ids], [greedy], cache_len=length + 64)
    first = int(prefix.token[0])
    top_ids, top = np.asarray(prefix.logprobs.top_ids)[0], np.asarray(prefix.logprobs.top)[0]
    state, out = eng.generate(eng.params, eng.start(prefix), n_steps=n_new - 1)
    ours = [first] + [int(t) for t in np.asarray(out)[0] if t >= 0]
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    want, seq = [], list(ids)
    for i in range(n_new):
        logits = forward(cfg, sd, np.asarray([seq]), query_block=1024)[0, -1]
        if i == 0:  # the first token's top log-probabilities, against easympt's (float32)
            logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            diff = float(np.abs(logprobs[top_ids] - top).max())
        want.append(int(np.argmax(logits)))
        seq.append(want[-1])
    return {"length": length, "easympt": ours, "reference": want, "equal": ours == want,
            "top5_logprob_max_abs_diff": diff, "easympt_s": ours_s, "reference_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,8192,16384,32768")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: float32, the compute dtype)")
    ap.add_argument("--reference", type=int, default=None, metavar="N",
                    help="only check greedy tokens after an N-token prompt against the numpy reference")
    ap.add_argument("--kv-compare", default=None, metavar="N,N",
                    help="only time decode after N-token prompts with a float32, a bfloat16 and an int8 cache, "
                         "in turns")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kv_compare:
        rows = [kv_compare(int(n), args.geometry) for n in args.kv_compare.split(",")]
        for r in rows:
            f32 = r["decode_tok_s_float32"]
            print(f"{r['length']:>6} tokens: decode tok/s by cache, timed in turns: " + ", ".join(
                f"{kv} {r[f'decode_tok_s_{kv}']:.1f} ({r[f'decode_tok_s_{kv}'] / f32:.2f}x)" for kv in KV_DTYPES),
                flush=True)
        print(json.dumps({"bench": "long_context_kv_compare", **machine(), "geometry": args.geometry, "runs": rows}))
        return 0
    if args.reference:
        r = reference_check(args.reference, args.chunk)
        print(f"{r['length']} tokens: easympt {r['easympt']} ({r['easympt_s']:.1f} s), reference {r['reference']} "
              f"({r['reference_s']:.1f} s): {'equal' if r['equal'] else 'DIFFERENT'}; first token's top-5 "
              f"log-probabilities differ by at most {r['top5_logprob_max_abs_diff']:.1e}")
        print(json.dumps({"bench": "long_context_reference", **r}))
        return 0 if r["equal"] else 1
    if args.worker:
        length, one_pass = args.worker.split(":")
        print(json.dumps(worker(int(length), args.chunk, args.geometry, one_pass == "1", args.kv_dtype)))
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    runs = [(lengths[0], True)] + [(n, False) for n in lengths]
    rows = []
    for n, one_pass in runs:
        out = subprocess.run([sys.executable, __file__, "--worker", f"{n}:{int(one_pass)}", "--chunk", str(args.chunk),
                              "--geometry", args.geometry, *(["--kv-dtype", args.kv_dtype] if args.kv_dtype else [])],
                             capture_output=True, text=True,
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
    print(json.dumps({"bench": "long_context", **machine(), "geometry": args.geometry, "chunk": args.chunk,
                      "kv_dtype": args.kv_dtype or "float32", "runs": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
