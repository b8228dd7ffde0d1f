"""easympt generation vs its peers (benchmarks/peers.py), same machine, same checkpoint, same prompts.

Random weights in mpt-125m geometry (or --geometry), float32 by default.
Prompt 32 tokens, 128 new tokens forced (no EOS), batch 1 and 8; TTFT with a
512-token prompt; 1 warm-up, median of 3, every system timed in turns (timing.decode_figures), so
a change in the machine's speed during the run falls on all of them. decode tok/s = batch * 127 /
(t(128 new) - t(1 new)); easympt's batch-1 decode is also timed after a 2,048-token
prompt against a 32-token one, as the decode dispatches alone, timed in turns, with the float32
KV cache and with a bfloat16 one (a long context should cost little more per step than a short
one; at the bandwidth limit it costs the cache bytes a step reads). transformers runs as its users run it: `use_cache=True`
(its MptConfig defaults to False) under `torch.inference_mode()`; the benchmark
prints its step-time growth (flat with a cache) and compares both systems'
greedy tokens. With --llama-cpp-src, llama.cpp (f32 and f16 GGUFs of the same weights) runs too,
at batch 1. With --formats fp32,bf16 easympt also runs the same weights as 16-bit weights under
float32 compute (`easympt_bf16` in the JSON line, with its ratio to llama.cpp's f16), timed in turns
with the rest. The roofline is the measured memory bandwidth over
the weight bytes one decode step must read. Prints a table and one JSON line.

    python benchmarks/bench_generate.py [--geometry mpt-125m] [--dtype fp32] [--formats fp32,bf16] [--skip-torch]
                                        [--llama-cpp-src DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from easympt import FlaxMptForCausalLM
from easympt.dtypes import resolve_dtype
from easympt.generation import GenerationEngine, SamplingConfig
from easympt.transform import mpt_from_pretrained
from peers import Peer, write_checkpoint, write_prompts
from timing import NEW, decode_figures, in_turns, machine, median_time, same_tokens, timed

PROMPT, LONG_PROMPT, CONTEXT = 32, 512, 2048


def memory_bandwidth(nbytes=1 << 30) -> float:
    """Best read bandwidth (bytes/s) of a jitted reduction over a large array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = min(median_time(lambda: f(x).block_until_ready(), reps=5, warmup=1) for _ in range(2))
    return nbytes / best


def _prefilled(engine: GenerationEngine, prompts: np.ndarray, n_new: int):
    """(first tokens [B], decode state) after the prompts' prefill, greedy, n_new tokens to come."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=n_new)
    rows = [list(p) for p in prompts]
    P = engine.pad_prompts(rows)[0].shape[1]
    prefix = engine.prefill_batch(rows, [cfg] * len(rows), eos_ids=(),
                                  cache_len=engine.decode_cache_len(P, n_new))
    first = prefix.token + 0  # a new array: `start` takes the prefix's buffers over
    return first, engine.start(prefix)


def _decode(engine: GenerationEngine, state, n_new: int):
    """The dispatches that make n_new - 1 more tokens, queued back to back: (state, [outputs])."""
    outs = []
    for _ in range(-(-(n_new - 1) // engine.max_compile_tokens)):
        state, out = engine.generate(engine.params, state, n_steps=engine.max_compile_tokens)
        outs.append(out)
    return state, outs


def run_easympt(engine: GenerationEngine, prompts: np.ndarray, n_new: int) -> list[list[int]]:
    """Greedy tokens [B][n_new]; decode dispatches are queued back to back, read at the end."""
    first, state = _prefilled(engine, prompts, n_new)
    _, outs = _decode(engine, state, n_new)
    tokens = np.concatenate([np.asarray(o) for o in [first[:, None], *outs]], axis=1)
    return [[int(t) for t in row if t >= 0] for row in tokens]


def decode_only_tok_s(runs: dict, reps: int = 3) -> dict:
    """Decode tok/s of the generate dispatches alone, timed from a finished prefill: runs maps a name to
    (engine, prompts); each round times every run in turn (1 warm-up, median of `reps`). For the
    long-context ratio: t(128 new) - t(1 new) each include a 2,048-token prefill (~1 s), and the
    difference of two such medians moved the ratio by +-0.1 between runs."""

    def once(engine, prompts):
        _, state = _prefilled(engine, prompts, NEW)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        _, outs = _decode(engine, state, NEW)
        n = sum(int((np.asarray(o) >= 0).sum()) for o in outs)
        return n / (time.perf_counter() - t0)

    rates = in_turns({name: functools.partial(once, *run) for name, run in runs.items()}, reps)
    return {name: float(np.median(r)) for name, r in rates.items()}


def compare(ours: dict, peer: dict) -> dict:
    """A peer's figures with easympt's ratios to them and how many greedy tokens agree."""
    out = {k: v for k, v in peer.items() if not k.startswith("greedy_") and k != "keys"}
    for b in ("b1", "b8"):
        if f"decode_tok_s_{b}" in peer:
            out[f"ratio_decode_{b}"] = ours[f"decode_tok_s_{b}"] / peer[f"decode_tok_s_{b}"]
            out[f"greedy_match_{b}"] = same_tokens(ours[f"greedy_{b}"], peer[f"greedy_{b}"])
    out["ratio_ttft"] = ours["ttft_512_s"] / peer["ttft_512_s"]  # below 1: easympt answers first
    return out


# the llama.cpp GGUF type of about the same bytes per weight
PEER_FORMAT = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}


def build_engine(model, params, args, kv_dtype=None) -> GenerationEngine:
    """The benchmark's engine: room for the 2,048-token context and two runs of new tokens."""
    return GenerationEngine(model, params, max_length=CONTEXT + 2 * NEW, max_compile_tokens=args.max_compile_tokens,
                            cpu_kernels=False if args.no_cpu_kernels else None, kv_dtype=kv_dtype)


def format_engine(fmt: str, config, params, args) -> GenerationEngine:
    """An engine over the same weights in another format: bf16 is 16-bit weights under float32
    compute (easympt.dtypes.inference_dtypes; on CPU the kernels read bfloat16 panels); int8 / int4
    are easympt.kernels.quant's weight-only formats (quantized here from the float32 weights)."""
    if fmt in ("int8", "int4"):
        from easympt.transform.quantized import quantize_params

        model = FlaxMptForCausalLM(config, dtype=jnp.float32, _do_init=False, quantize=fmt)
        return build_engine(model, quantize_params(params, config, fmt), args)
    if fmt != "bf16":
        raise SystemExit(f"--formats: {fmt!r} is not one of fp32, bf16, int8, int4")
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.bfloat16, _do_init=False)
    return build_engine(model, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params), args)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--dtype", default=None, help="easympt compute/param dtype (default: by backend)")
    ap.add_argument("--max-compile-tokens", type=int, default=64)
    ap.add_argument("--no-cpu-kernels", action="store_true",
                    help="XLA's dot on plain weights instead of easympt's CPU kernel on packed ones")
    ap.add_argument("--skip-torch", action="store_true", help="no peer (e.g. on a GPU box without torch CUDA)")
    ap.add_argument("--formats", default="fp32",
                    help="comma-separated weight formats easympt runs, each timed in turns with the peers: fp32, "
                         "bf16 (16-bit weights under float32 compute; llama.cpp's f16 is its peer), int8 and int4 "
                         "(weight-only; llama.cpp's q8_0 and q4_0)")
    ap.add_argument("--llama-cpp-src", default=None,
                    help="llama.cpp's converter source (an unpacked llama-cpp-python sdist): adds llama.cpp as a "
                         "peer, f32 and f16 GGUFs of the same checkpoint, batch 1 (needs llama-cpp-python)")
    ap.add_argument("--reps", type=int, default=3,
                    help="timed runs of each measurement (median; 1 warm-up first): 1 checks the harness quickly")
    args = ap.parse_args()

    dtype = resolve_dtype(args.dtype)
    formats = [f for f in args.formats.split(",") if f and f != "fp32"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(args.geometry, os.path.join(tmp, "ckpt"), max_seq_len=1024)
        params, config = mpt_from_pretrained(ckpt, dtype=dtype, progress=False)
        model = FlaxMptForCausalLM(config, dtype=dtype, _do_init=False)
        V = config.vocab_size
        p1 = rng.integers(0, V, (1, PROMPT))
        p8 = rng.integers(0, V, (8, PROMPT))
        plong = rng.integers(0, V, (1, LONG_PROMPT))
        engine = build_engine(model, params, args)

        # first call after precompile vs a steady call (compilation itself is excluded by warming
        # every shape once with other data, as `pre_compile` does in the server)
        t0 = time.perf_counter()
        run_easympt(engine, rng.integers(0, V, (1, PROMPT)), NEW)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_easympt(engine, p1, NEW)
        first_after = time.perf_counter() - t0
        sets = {"b1": p1, "b8": p8, "long": plong}
        prompts = write_prompts(os.path.join(tmp, "prompts.json"), sets)
        systems = {"easympt": lambda key, n: timed(lambda k, m: run_easympt(engine, sets[k], m), key, n)}
        keys = {"easympt": ("b1", "b8")}
        for fmt in formats:  # more weight formats of the same weights, timed in turns with the rest
            other = format_engine(fmt, config, params, args)
            run_easympt(other, rng.integers(0, V, (1, PROMPT)), NEW)  # compile
            systems[f"easympt_{fmt}"] = functools.partial(
                lambda e, key, n: timed(lambda k, m: run_easympt(e, sets[k], m), key, n), other)
            keys[f"easympt_{fmt}"] = ("b1", "b8")
        infos, skipped = {}, None
        with contextlib.ExitStack() as peers:
            started = []
            if not args.skip_torch:  # cached transformers in easympt's dtype, on the GPU when there is one
                started.append(("transformers", ("transformers-generate", ckpt, "--prompts", prompts, "--dtype",
                                                 str(np.dtype(model.dtype)))))
            if args.llama_cpp_src:
                started += [(f"llama.cpp {t}", ("llama-cpp", ckpt, "--prompts", prompts, "--llama-cpp-src",
                                                args.llama_cpp_src, "--outtype", t))
                            for t in ("f32", *dict.fromkeys(PEER_FORMAT.get(f, "f16") for f in formats or ["bf16"]))]
            for name, peer_args in started:
                peer = peers.enter_context(Peer(*peer_args))
                if "skipped" in peer.info:
                    skipped = peer.info["skipped"]
                    break
                systems[name], keys[name], infos[name] = peer, tuple(peer.info["keys"]), peer.info
            figures = decode_figures(systems, keys, reps=args.reps)
        ours = figures.pop("easympt")
        others = {name: figures.pop(name) for name in list(figures) if name.startswith("easympt_")}
        steady = ours["t_b1_128_s"]
        # the long-context ratio, with the float32 cache and with a bfloat16 one (half the bytes a step
        # reads from it), all four timed in turns
        pctx = rng.integers(0, V, (1, CONTEXT))
        half = build_engine(model, params, args, kv_dtype="bfloat16")
        run_easympt(half, p1, NEW)  # compile
        run_easympt(half, pctx, NEW)
        ctx = decode_only_tok_s({"b1": (engine, p1), "b1_ctx2048": (engine, pctx), "b1_bf16_cache": (half, p1),
                                 "b1_ctx2048_bf16_cache": (half, pctx)}, reps=args.reps)
        ours.update({f"decode_only_tok_s_{k}": v for k, v in ctx.items()})
        bf16_cache_greedy = same_tokens(run_easympt(half, p1, NEW), ours["greedy_b1"])
        del half

        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
        bw = memory_bandwidth()
        roofline = bw / weight_bytes
        result = {"geometry": args.geometry, "backend": jax.default_backend(), **machine(),
                  "dtype": str(np.dtype(model.dtype)), "cpu_kernels": engine.cpu_isa, "weight_bytes": weight_bytes,
                  "bandwidth_gb_s": bw / 1e9, "roofline_tok_s_b1": roofline,
                  "easympt": ours, "first_call_over_steady": first_after / steady,
                  "compile_and_first_call_s": compile_s,
                  "roofline_fraction_b1": ours["decode_tok_s_b1"] / roofline,
                  "context_2048_over_short_b1": ours["decode_only_tok_s_b1_ctx2048"] / ours["decode_only_tok_s_b1"],
                  "context_2048_over_short_b1_bf16_cache": (ours["decode_only_tok_s_b1_ctx2048_bf16_cache"]
                                                            / ours["decode_only_tok_s_b1_bf16_cache"]),
                  "bf16_cache_greedy_match_b1": bf16_cache_greedy}
        for name, fig in others.items():
            fig["greedy_match_fp32_b1"] = same_tokens(fig.pop("greedy_b1"), ours["greedy_b1"])
            fig["greedy_match_fp32_b8"] = same_tokens(fig.pop("greedy_b8"), ours["greedy_b8"])
            result[name] = fig
        for name, fig in figures.items():
            peer = compare(ours, {**fig, **infos[name]})
            if name == "transformers":
                result["transformers"] = peer
            else:
                result.setdefault("llama_cpp", {})[infos[name]["outtype"]] = peer
        if skipped and args.llama_cpp_src:
            result.setdefault("llama_cpp", {})["skipped"] = skipped

    isa = result["cpu_kernels"]
    kernels = f"CPU kernels, {isa} (packed weights, decode attention)" if isa else "XLA only"
    print(f"{result['cpu']}, {result['cores']} cores; easympt: {kernels}")
    print(f"{'':24s}{'easympt':>12s}{'transformers':>14s}{'ratio':>8s}")
    theirs = result.get("transformers", {})
    # decode: above 1 is faster; TTFT: below 1 is faster (compare() computed the ratios)
    for key, ratio in (("decode_tok_s_b1", "ratio_decode_b1"), ("decode_tok_s_b8", "ratio_decode_b8"),
                       ("ttft_512_s", "ratio_ttft")):
        print(f"{key:24s}{result['easympt'][key]:12.3f}{theirs.get(key, float('nan')):14.3f}"
              f"{theirs.get(ratio, float('nan')):8.2f}x")
    print(f"roofline b1: {roofline:.1f} tok/s ({bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB); "
          f"easympt reaches {100 * result['roofline_fraction_b1']:.0f}%")
    print(f"first call after precompile / steady call: {result['first_call_over_steady']:.2f}")
    print(f"easympt b1 decode after a {CONTEXT}-token prompt: {ours['decode_only_tok_s_b1_ctx2048']:.1f} tok/s, "
          f"after {PROMPT}: {ours['decode_only_tok_s_b1']:.1f} ({result['context_2048_over_short_b1']:.2f}x; "
          "decode dispatches alone, timed from a finished prefill)")
    print(f"  with a bfloat16 KV cache: {ours['decode_only_tok_s_b1_ctx2048_bf16_cache']:.1f} / "
          f"{ours['decode_only_tok_s_b1_bf16_cache']:.1f} tok/s "
          f"({result['context_2048_over_short_b1_bf16_cache']:.2f}x); "
          f"its greedy tokens vs the float32 cache's: {result['bf16_cache_greedy_match_b1']}")
    if "transformers" in result:
        t = result["transformers"]
        print(f"transformers step growth (2nd half / 1st half of {NEW} steps; ~1 with a KV cache): "
              f"b1 {t['step_growth_b1']:.2f}, b8 {t['step_growth_b8']:.2f}")
        print(f"same greedy tokens as transformers: b1 {t['greedy_match_b1']}, b8 {t['greedy_match_b8']}")
    for outtype, peer in result.get("llama_cpp", {}).items():
        if outtype == "skipped":
            print(f"llama.cpp: skipped ({peer})")
            continue
        print(f"llama.cpp {outtype}: decode b1 {peer['decode_tok_s_b1']:.1f} tok/s (easympt "
              f"{peer['ratio_decode_b1']:.2f}x), TTFT 512 {peer['ttft_512_s']:.3f} s (easympt's is "
              f"{peer['ratio_ttft']:.2f}x of it), same greedy tokens {peer['greedy_match_b1']}")
    systems = [("easympt", ours), ("transformers", theirs),
               *((f"llama.cpp {t}", p) for t, p in result.get("llama_cpp", {}).items() if t != "skipped")]
    spreads = [f"{name} {k[7:]} {100 * v:.0f}%" for name, fig in systems for k, v in fig.items()
               if k.startswith("spread_")]
    print(f"spread of the timed {NEW}-token runs ((max - min) / median): {', '.join(spreads)}")
    for name, fig in others.items():
        outtype = PEER_FORMAT[name[len("easympt_"):]]
        peer = result.get("llama_cpp", {}).get(outtype)
        vs = ""
        if peer:
            fig[f"ratio_decode_b1_llama_cpp_{outtype}"] = fig["decode_tok_s_b1"] / peer["decode_tok_s_b1"]
            vs = (f", llama.cpp {outtype} {peer['decode_tok_s_b1']:.1f} tok/s "
                  f"({fig[f'ratio_decode_b1_llama_cpp_{outtype}']:.2f}x)")
        print(f"{name}: decode b1 {fig['decode_tok_s_b1']:.1f} tok/s, b8 {fig['decode_tok_s_b8']:.1f}, TTFT 512 "
              f"{fig['ttft_512_s']:.3f} s{vs}; greedy tokens vs fp32: b1 {fig['greedy_match_fp32_b1']}, "
              f"b8 {fig['greedy_match_fp32_b8']}")
    for b in ("b1", "b8"):
        ours.pop(f"greedy_{b}", None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
