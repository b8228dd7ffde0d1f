"""A real-size MPT on this machine (mpt-7b by default, or mpt-1b): random bfloat16 weights in its
geometry, loaded as bf16 / --quantize int8 / int4, against llama.cpp's f16 / Q8_0 / Q4_0 GGUFs of the
same weights.

The checkpoint is written as the hub ships mpt-7b (bfloat16 safetensors in shards, MosaicML's
config, gpt-neox-20b's tokenizer from tests/fixtures), shard by shard, once per --workdir. Per format:
- easympt in a fresh process: `mpt_from_pretrained(..., quantize=FMT)` (quantized while streaming; bf16:
  16-bit weights under float32 compute),
  its peak RSS (VmHWM) after loading and after packing the weights for the CPU kernels, next to the
  quantized bytes; then batch-1 greedy decode after a 32-token prompt;
- llama.cpp (llama-cpp-python, --llama-cpp-src for its converter) on the GGUF of the same weights in
  the matching type, its own process; both processes stay up and are timed in turns (timing.in_turns):
  decode tok/s = (NEW - 1) / (t(NEW new) - t(1 new)), medians of --rounds after one warm-up.
Then `easympt serve CKPT --quantize FMT` (the last format) must answer /v1/completions (its peak RSS
reported). Prints a table and one JSON line.

    python benchmarks/bench_geometry.py [--geometry mpt-7b] [--workdir /tmp/easympt-geometry-bench]
                                        [--formats int8,int4] [--llama-cpp-src DIR] [--new 32] [--rounds 2]
                                        [--skip-serve]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from peers import Peer, serve, write_prompts
from timing import in_turns, machine

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "hub", "mosaicml", "mpt-7b-instruct")
PEER_TYPE = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
PROMPT = 32


def status(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def write_checkpoint(path: str, geometry: str) -> str:
    """A preset's geometry in random bfloat16, safetensors shards, and a tokenizer (kept between runs)."""
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        return path
    from convert_memory import write_random_checkpoint

    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_checkpoint(tmp, {"preset": geometry}, "safetensors", "bfloat16", 2)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(TOKENIZER, f), tmp)
    os.replace(tmp, path)  # complete or absent
    return path


def easympt_child(ckpt: str, fmt: str, prompts_path: str) -> None:
    """The easympt side, as a peers.Peer child: load, report memory, then answer timed greedy runs."""
    import jax
    import jax.numpy as jnp

    from bench_generate import run_easympt
    from easympt import FlaxMptForCausalLM
    from easympt.generation import GenerationEngine
    from easympt.transform import mpt_from_pretrained
    from timing import timed

    prompts = json.load(open(prompts_path))
    jax.device_put(np.zeros(1 << 20, np.float32)).block_until_ready()  # the runtime's own memory, in the baseline
    baseline = status("VmRSS")

    def start():
        t0 = time.perf_counter()
        quantize = None if fmt == "bf16" else fmt
        params, config = mpt_from_pretrained(ckpt, dtype="bf16", quantize=quantize, progress=False)
        jax.block_until_ready(params)
        load_s, load_peak = time.perf_counter() - t0, status("VmHWM")
        weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
        model = FlaxMptForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.bfloat16, quantize=quantize,
                                   _do_init=False)
        engine = GenerationEngine(model, params, max_length=256, max_compile_tokens=32, consume_params=True)
        del params
        run_easympt(engine, np.asarray(prompts["b1"]), 4)  # compile
        ready = {"keys": ["b1"], "weight_bytes": weight_bytes, "baseline_rss": baseline, "load_peak_rss": load_peak,
                 "load_s": load_s, "engine_peak_rss": status("VmHWM"), "engine": engine.describe()}
        return (lambda request: dict(zip(("seconds", "tokens"), timed(
            lambda k, n: run_easympt(engine, np.asarray(prompts[k]), n), request["key"], request["n_new"])))), ready

    serve(start)


def decode_tok_s(systems: dict, new: int, rounds: int) -> dict:
    """Batch-1 decode tok/s and greedy tokens of every system, timed in turns."""
    full = in_turns({name: (lambda p: lambda: p("b1", new))(p) for name, p in systems.items()}, rounds)
    one = in_turns({name: (lambda p: lambda: p("b1", 1))(p) for name, p in systems.items()}, rounds)
    return {name: {"decode_tok_s_b1": (new - 1) / (statistics.median(t for t, _ in full[name])
                                                   - statistics.median(t for t, _ in one[name])),
                   "greedy_b1": full[name][-1][1][0]} for name in systems}


def serve_check(ckpt: str, fmt: str, port: int = 8719) -> dict:
    """`easympt serve CKPT --quantize FMT` answers a completion; its peak RSS."""
    import httpx

    exe = os.path.join(os.path.dirname(sys.executable), "easympt")
    weights = ["--dtype", "bf16"] if fmt == "bf16" else ["--quantize", fmt]
    proc = subprocess.Popen([exe, "serve", ckpt, *weights, "--port", str(port), "--max-length", "256",
                             "--batch-size", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                return {"ok": False, "error": proc.stderr.read()[-2000:]}
            try:
                if httpx.get(url + "/status", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > 1800:
                return {"ok": False, "error": "no answer in 30 minutes"}
            time.sleep(2)
        ready_s = time.perf_counter() - t0
        r = httpx.post(url + "/v1/completions", json={"prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0},
                       timeout=600)
        body = r.json()
        return {"ok": r.status_code == 200, "status_code": r.status_code, "ready_s": ready_s,
                "text": body.get("choices", [{}])[0].get("text"), "weights_format": httpx.get(url + "/status").json()
                .get("weights_format"), "peak_rss": status("VmHWM", str(proc.pid))}
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="mpt-7b", help="an easympt preset (mpt-7b, mpt-1b, ...)")
    ap.add_argument("--workdir", default="/tmp/easympt-geometry-bench")
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--llama-cpp-src", default=None)
    ap.add_argument("--new", type=int, default=32, help="new tokens per timed run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("CKPT", "FORMAT", "PROMPTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        easympt_child(*args.child)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = write_checkpoint(os.path.join(args.workdir, f"{args.geometry}-random"), args.geometry)
    print(f"checkpoint {ckpt} ({time.perf_counter() - t0:.0f} s)", flush=True)
    prompts = write_prompts(os.path.join(args.workdir, "prompts.json"),
                            {"b1": np.random.default_rng(0).integers(0, 50000, (1, PROMPT)), "long": [[1]]})
    result = {"bench": "geometry", "geometry": args.geometry, **machine(), "new_tokens": args.new, "formats": {}}
    for fmt in args.formats.split(","):
        with Peer("easympt", ckpt, fmt, prompts, script=__file__, flag="--child") as ours:
            info = dict(ours.info)
            print(f"easympt {fmt}: {info['weight_bytes'] / 1e9:.2f} GB of weights loaded in {info['load_s']:.0f} s; "
                  f"peak RSS {info['load_peak_rss'] / 1e9:.2f} GB after loading, {info['engine_peak_rss'] / 1e9:.2f} "
                  f"GB with the packed engine (baseline {info['baseline_rss'] / 1e9:.2f} GB); {info['engine']}",
                  flush=True)
            systems = {"easympt": ours}
            peer = None
            if args.llama_cpp_src:
                peer = Peer("llama-cpp", ckpt, "--prompts", prompts, "--llama-cpp-src", args.llama_cpp_src,
                            "--outtype", PEER_TYPE[fmt])
                if "skipped" in peer.info:
                    info["llama_cpp"] = peer.info
                    peer.close()
                    peer = None
                else:
                    systems[f"llama_cpp_{PEER_TYPE[fmt]}"] = peer
            try:
                figures = decode_tok_s(systems, args.new, args.rounds)
            finally:
                if peer:
                    peer.close()
        row = {**info, **figures.pop("easympt")}
        for name, fig in figures.items():
            row[name] = fig
            row[f"ratio_decode_b1_{name}"] = row["decode_tok_s_b1"] / fig["decode_tok_s_b1"]
            same = sum(a == b for a, b in zip(row["greedy_b1"], fig["greedy_b1"]))
            row[f"greedy_match_{name}"] = f"{same}/{len(fig['greedy_b1'])}"
        result["formats"][fmt] = row
        vs = "".join(f"; {n} {f['decode_tok_s_b1']:.2f} tok/s (easympt {row[f'ratio_decode_b1_{n}']:.2f}x, greedy "
                     f"{row[f'greedy_match_{n}']} equal)" for n, f in figures.items())
        print(f"easympt {fmt}: decode b1 {row['decode_tok_s_b1']:.2f} tok/s{vs}", flush=True)
    if not args.skip_serve:
        fmt = args.formats.split(",")[-1]
        result["serve"] = serve_check(ckpt, fmt)
        s = result["serve"]
        print(f"easympt serve ({fmt} weights): " + (f"answered {s['text']!r} after {s['ready_s']:.0f} s to start; "
              f"peak RSS {s['peak_rss'] / 1e9:.2f} GB" if s["ok"] else f"FAILED: {s}"), flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
