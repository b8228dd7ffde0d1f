"""easympt generation vs transformers' PyTorch generate, same machine, same checkpoint.

Random weights in mpt-125m geometry (or --geometry), float32 by default.
Prompt 32 tokens, 128 new tokens forced (no EOS), batch 1 and 8; TTFT with a
512-token prompt; 1 warm-up, median of 3. decode tok/s = batch * 127 /
(t(128 new) - t(1 new)); easympt's batch-1 decode is also timed after a 2,048-token
prompt (a long context should cost little more per step than a short one). transformers runs as its users run it: `use_cache=True`
(its MptConfig defaults to False) under `torch.inference_mode()`; the benchmark
prints its step-time growth (flat with a cache) and compares both systems'
greedy tokens. The roofline is the measured memory bandwidth over
the weight bytes one decode step must read. Prints a table and one JSON line.

    python benchmarks/bench_generate.py [--geometry mpt-125m] [--dtype fp32] [--skip-torch]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.dtypes import resolve_dtype
from easympt.generation import GenerationEngine, SamplingConfig
from easympt.transform import mpt_from_pretrained
from timing import median_time

PROMPT, NEW, LONG_PROMPT, CONTEXT = 32, 128, 512, 2048


def memory_bandwidth(nbytes=1 << 30) -> float:
    """Best read bandwidth (bytes/s) of a jitted reduction over a large array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = min(median_time(lambda: f(x).block_until_ready(), reps=5, warmup=1) for _ in range(2))
    return nbytes / best


def make_checkpoint(geometry: str, path: str, max_seq_len: int) -> None:
    import torch
    from transformers import MptConfig as HFConfig, MptForCausalLM

    c = MptConfig.preset(geometry)
    torch.manual_seed(0)
    hf = MptForCausalLM(HFConfig(d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers,
                                 vocab_size=c.vocab_size, max_seq_len=max_seq_len, eos_token_id=None,
                                 bos_token_id=None))
    hf.save_pretrained(path)


def run_easympt(engine: GenerationEngine, prompts: np.ndarray, n_new: int) -> list[list[int]]:
    """Greedy tokens [B][n_new]; decode dispatches are queued back to back, read at the end."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=n_new)
    rows = [list(p) for p in prompts]
    P = engine.pad_prompts(rows)[0].shape[1]
    prefix = engine.prefill_batch(rows, [cfg] * len(rows), eos_ids=(),
                                  cache_len=engine.decode_cache_len(P, n_new))
    outs = [prefix.token[:, None]]
    state = engine.start(prefix)
    for _ in range(-(-(n_new - 1) // engine.max_compile_tokens)):
        state, out = engine.generate(engine.params, state, n_steps=engine.max_compile_tokens)
        outs.append(out)
    tokens = np.concatenate([np.asarray(o) for o in outs], axis=1)
    return [[int(t) for t in row if t >= 0] for row in tokens]


def run_torch(model, prompts: np.ndarray, n_new: int) -> list[list[int]]:
    """transformers as its documentation runs it: KV cache on (MptConfig defaults use_cache to False),
    under inference_mode."""
    import torch

    ids = torch.tensor(prompts, device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                             do_sample=False, pad_token_id=0, use_cache=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return out[:, ids.shape[1]:].tolist()


def measure(run, prompts_1, prompts_8, prompts_long) -> dict:
    out = {}
    for name, prompts in (("b1", prompts_1), ("b8", prompts_8)):
        t_full = median_time(lambda: run(prompts, NEW))
        t_half = median_time(lambda: run(prompts, NEW // 2))
        t_one = median_time(lambda: run(prompts, 1))
        out[f"decode_tok_s_{name}"] = len(prompts) * (NEW - 1) / (t_full - t_one)
        out[f"t_{name}_128_s"] = t_full
        # a KV cache keeps the step time flat: the second half's steps cost about what the first half's do
        out[f"step_growth_{name}"] = ((t_full - t_half) / (NEW - NEW // 2)) / ((t_half - t_one) / (NEW // 2 - 1))
        out[f"greedy_{name}"] = run(prompts, NEW)
    out["ttft_512_s"] = median_time(lambda: run(prompts_long, 1))
    return out


def run_llama_cpp(ckpt: str, src: str, p1: list[int], plong: list[int], ours: dict) -> dict:
    """llama.cpp on f32 and f16 GGUFs of the same checkpoint, each in a child process."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    out = {}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"b1": p1, "long": plong}, fh)
    for outtype in ("f32", "f16"):
        child = subprocess.run([sys.executable, os.path.join(here, "llama_cpp_peer.py"), ckpt, "--llama-cpp-src", src,
                                "--outtype", outtype, "--prompts", fh.name], capture_output=True, text=True, check=True)
        peer = json.loads(child.stdout.strip().splitlines()[-1])
        if "skipped" not in peer:
            peer["ratio_decode_b1"] = ours["decode_tok_s_b1"] / peer["decode_tok_s_b1"]
            peer["ratio_ttft"] = peer["ttft_512_s"] / ours["ttft_512_s"]
            same = sum(x == y for x, y in zip(ours["greedy_b1"][0], peer["greedy_b1"][0]))
            peer["greedy_match_b1"] = f"{same}/{len(peer['greedy_b1'][0])}"
            peer.pop("greedy_b1")
        out[outtype] = peer
        if "skipped" in peer:
            break
    return out


def measure_peer(path: str, dtype: str) -> int:
    """transformers on the GPU when JAX has one (in easympt's dtype), else on the CPU."""
    import torch
    from transformers import MptForCausalLM

    rng = np.random.default_rng(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = MptForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    V = model.config.vocab_size
    p1, p8, plong = rng.integers(0, V, (1, PROMPT)), rng.integers(0, V, (8, PROMPT)), rng.integers(0, V, (1, LONG_PROMPT))
    out = measure(lambda p, n: run_torch(model, p, n), p1, p8, plong)
    out["torch_threads"] = torch.get_num_threads()
    out["device"], out["dtype"] = device, dtype
    print(json.dumps(out))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--dtype", default=None, help="easympt compute/param dtype (default: by backend)")
    ap.add_argument("--max-compile-tokens", type=int, default=64)
    ap.add_argument("--skip-torch", action="store_true", help="no peer (e.g. on a GPU box without torch CUDA)")
    ap.add_argument("--llama-cpp-src", default=None,
                    help="llama.cpp's converter source (an unpacked llama-cpp-python sdist): adds llama.cpp as a "
                         "peer, f32 and f16 GGUFs of the same checkpoint, batch 1 (needs llama-cpp-python)")
    ap.add_argument("--peer", metavar="CKPT", help=argparse.SUPPRESS)  # internal: measure transformers only
    ap.add_argument("--peer-dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        return measure_peer(args.peer, args.peer_dtype)

    dtype = resolve_dtype(args.dtype)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_checkpoint(args.geometry, tmp, max_seq_len=1024)
        params, config = mpt_from_pretrained(tmp, dtype=dtype, progress=False)
        model = FlaxMptForCausalLM(config, dtype=dtype, _do_init=False)
        V = config.vocab_size
        p1 = rng.integers(0, V, (1, PROMPT))
        p8 = rng.integers(0, V, (8, PROMPT))
        plong = rng.integers(0, V, (1, LONG_PROMPT))
        engine = GenerationEngine(model, params, max_length=CONTEXT + 2 * NEW, max_compile_tokens=args.max_compile_tokens)

        # first call after precompile vs a steady call (compilation itself is excluded by warming
        # every shape once with other data, as `pre_compile` does in the server)
        t0 = time.perf_counter()
        run_easympt(engine, rng.integers(0, V, (1, PROMPT)), NEW)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_easympt(engine, p1, NEW)
        first_after = time.perf_counter() - t0
        ours = measure(lambda p, n: run_easympt(engine, p, n), p1, p8, plong)
        steady = ours["t_b1_128_s"]
        pctx = rng.integers(0, V, (1, CONTEXT))
        run_easympt(engine, pctx, NEW)  # compiles the 2,048-token prefill and the longer cache's decode
        t_full, t_one = (median_time(lambda n=n: run_easympt(engine, pctx, n)) for n in (NEW, 1))
        ours["decode_tok_s_b1_ctx2048"] = (NEW - 1) / (t_full - t_one)

        weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
        bw = memory_bandwidth()
        roofline = bw / weight_bytes
        result = {"geometry": args.geometry, "backend": jax.default_backend(),
                  "dtype": str(np.dtype(model.dtype)), "weight_bytes": weight_bytes,
                  "bandwidth_gb_s": bw / 1e9, "roofline_tok_s_b1": roofline,
                  "easympt": ours, "first_call_over_steady": first_after / steady,
                  "compile_and_first_call_s": compile_s,
                  "roofline_fraction_b1": ours["decode_tok_s_b1"] / roofline,
                  "context_2048_over_short_b1": ours["decode_tok_s_b1_ctx2048"] / ours["decode_tok_s_b1"]}
        if not args.skip_torch:
            # the peer runs in a child process of this run, so JAX's thread pool cannot slow it down
            child = subprocess.run([sys.executable, __file__, "--peer", tmp, "--peer-dtype", result["dtype"]],
                                   capture_output=True, text=True, check=True)
            theirs = json.loads(child.stdout.strip().splitlines()[-1])
            result["transformers"] = theirs
            result["ratio_decode_b1"] = ours["decode_tok_s_b1"] / theirs["decode_tok_s_b1"]
            result["ratio_decode_b8"] = ours["decode_tok_s_b8"] / theirs["decode_tok_s_b8"]
            result["ratio_ttft"] = ours["ttft_512_s"] / theirs["ttft_512_s"]
            for b in ("b1", "b8"):
                same = [sum(x == y for x, y in zip(a, t)) for a, t in zip(ours[f"greedy_{b}"], theirs[f"greedy_{b}"])]
                result[f"greedy_match_{b}"] = f"{sum(same)}/{sum(len(t) for t in theirs[f'greedy_{b}'])}"

        if args.llama_cpp_src:
            result["llama_cpp"] = run_llama_cpp(tmp, args.llama_cpp_src, p1[0].tolist(), plong[0].tolist(), ours)

    print(f"{'':24s}{'easympt':>12s}{'transformers':>14s}{'ratio':>8s}")
    for key, better in (("decode_tok_s_b1", "x"), ("decode_tok_s_b8", "x"), ("ttft_512_s", "t")):
        mine = result["easympt"][key]
        peer = result.get("transformers", {}).get(key, float("nan"))
        ratio = mine / peer if better == "x" else peer / mine
        print(f"{key:24s}{mine:12.3f}{peer:14.3f}{ratio:8.2f}x")
    print(f"roofline b1: {roofline:.1f} tok/s ({bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB); "
          f"easympt reaches {100 * result['roofline_fraction_b1']:.0f}%")
    print(f"first call after precompile / steady call: {result['first_call_over_steady']:.2f}")
    print(f"easympt b1 decode after a {CONTEXT}-token prompt: {ours['decode_tok_s_b1_ctx2048']:.1f} tok/s "
          f"({result['context_2048_over_short_b1']:.2f}x the {PROMPT}-token one)")
    if "transformers" in result:
        t = result["transformers"]
        print(f"transformers step growth (2nd half / 1st half of 128 steps; ~1 with a KV cache): "
              f"b1 {t['step_growth_b1']:.2f}, b8 {t['step_growth_b8']:.2f}")
        print(f"same greedy tokens as transformers: b1 {result['greedy_match_b1']}, b8 {result['greedy_match_b8']}")
    for outtype, peer in result.get("llama_cpp", {}).items():
        if "skipped" in peer:
            print(f"llama.cpp: skipped ({peer['skipped']})")
            break
        print(f"llama.cpp {outtype}: decode b1 {peer['decode_tok_s_b1']:.1f} tok/s (easympt "
              f"{peer['ratio_decode_b1']:.2f}x), TTFT 512 {peer['ttft_512_s']:.3f} s (easympt {peer['ratio_ttft']:.2f}x), "
              f"same greedy tokens {peer['greedy_match_b1']}")
    for side in ("easympt", "transformers"):
        for b in ("b1", "b8"):
            result.get(side, {}).pop(f"greedy_{b}", None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
