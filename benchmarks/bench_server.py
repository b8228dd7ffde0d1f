"""Server throughput and latency under 1, 4 and 16 concurrent streaming clients,
and a soak run (many requests, random disconnects) that checks for server
errors and RSS growth. Everything talks to 127.0.0.1 only.

    python benchmarks/bench_server.py [--model DIR] [--max-tokens 64] [--soak 1000]
    python benchmarks/bench_server.py --loras 8     # 16 clients spread over 8 LoRA adapters vs the base alone
    python benchmarks/bench_server.py --prefix-cache  # chat turns and a shared system prompt, cache on vs off
    python benchmarks/bench_server.py --speculative 4 --max-tokens 200  # prompt lookup vs plain decode, batch 1

There is no peer here (benchmarks/peers.py says why). The figures that matter: scaling (aggregate
tok/s at 16 clients over 1 client, target >= 4x) and what streaming costs, measured against the same
server's plain (non-streaming) requests: the gap between streamed tokens over the server's time per
token (target <= 1.25), the first streamed token over the plain time to first token plus one step
(target <= 1), and 16 streaming clients' throughput over 16 plain clients' (target >= 0.9; the two
timed in turns, three rounds each).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time

import httpx

from timing import in_turns, machine


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def one_stream(client: httpx.AsyncClient, i: int, max_tokens: int, disconnect_after: int | None = None,
                     model: str | None = None):
    body = {"prompt": f"def function_{i}(x):", "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
            "stream": True, **({"model": model} if model else {})}
    t0 = time.perf_counter()
    ttft, gaps, last, tokens = None, [], None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        n = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if "error" in msg:
                return {"status": 500}
            now = time.perf_counter()
            if msg["choices"][0]["text"]:
                if ttft is None:
                    ttft = now - t0
                elif last is not None:
                    gaps.append(now - last)
                last = now
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            n += 1
            if disconnect_after is not None and n >= disconnect_after:
                return {"status": 499}
    return {"status": 200, "ttft": ttft, "gaps": gaps, "tokens": tokens, "total": time.perf_counter() - t0}


async def one_plain(client: httpx.AsyncClient, i: int, max_tokens: int):
    """A non-streaming completion: (status, tokens, seconds)."""
    body = {"prompt": f"def function_{i}(x):", "max_tokens": max_tokens, "temperature": 0.8, "seed": i}
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json=body)
    if r.status_code != 200:
        return {"status": r.status_code}
    return {"status": 200, "ttft": None, "gaps": [], "tokens": r.json()["usage"]["completion_tokens"],
            "total": time.perf_counter() - t0}


async def plain_step(url: str, max_tokens: int, reps: int = 3) -> dict:
    """One client, no streaming: time to the first token, and the server's time per further token."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_plain(client, 0, max_tokens)  # warm-up
        ones = [await one_plain(client, k, 1) for k in range(reps)]
        fulls = [await one_plain(client, k, max_tokens) for k in range(reps)]
    ttft = sorted(r["total"] for r in ones)[reps // 2]
    steps = sorted((r["total"] - ttft) / max(r["tokens"] - 1, 1) for r in fulls)
    return {"ttft_s": ttft, "step_s": steps[reps // 2]}


async def load(url: str, clients: int, requests_per_client: int, max_tokens: int, stream: bool = True,
               models: list[str] | None = None) -> dict:
    """`models`: client w asks for models[w % len(models)] (LoRA adapters by name; streaming only)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def worker(w):
            if models:
                return [await one_stream(client, w * 1000 + k, max_tokens, model=models[w % len(models)])
                        for k in range(requests_per_client)]
            one = one_stream if stream else one_plain
            return [await one(client, w * 1000 + k, max_tokens) for k in range(requests_per_client)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "tok_s": tokens / wall, "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "chunk_gap_p50_s": pct(gaps, 0.5), "chunk_gap_p99_s": pct(gaps, 0.99)}


async def soak(url: str, n: int, concurrency: int, max_tokens: int, rss) -> dict:
    rng = random.Random(0)
    sem = asyncio.Semaphore(concurrency)
    statuses: dict[int, int] = {}
    rss_after_warmup = None
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i):
            nonlocal rss_after_warmup
            async with sem:
                cut = rng.randint(1, 4) if rng.random() < 0.3 else None
                try:
                    r = await one_stream(client, i, max_tokens, disconnect_after=cut)
                    statuses[r["status"]] = statuses.get(r["status"], 0) + 1
                except httpx.HTTPError:
                    statuses[-1] = statuses.get(-1, 0) + 1
                if i == min(100, n - 1):
                    rss_after_warmup = rss()
        await asyncio.gather(*(one(i) for i in range(n)))
        health = (await client.get("/health")).status_code
    end = rss()
    return {"requests": n, "statuses": statuses, "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "health_after": health, "rss_after_100_mb": rss_after_warmup / 2**20, "rss_end_mb": end / 2**20,
            "rss_growth": (end - rss_after_warmup) / rss_after_warmup}


def random_adapters(model: str, n: int, root: str) -> dict[str, str]:
    """n random rank-8 adapters on all four dense layers of `model`, in PEFT's format: {name: dir}."""
    import jax

    from easympt import MptConfig
    from easympt.adapters import LoraSpec, save_adapter
    from easympt.adapters.peft_format import layer_dims

    config = MptConfig.from_pretrained(model)
    spec = LoraSpec(rank=8, alpha=16.0, targets=("Wqkv", "out_proj", "up_proj", "down_proj"))
    out = {}
    for k in range(n):
        rng = jax.random.PRNGKey(k)
        tree = {"transformer": {}}
        for i in range(config.n_layers):
            block = tree["transformer"][f"blocks_{i}"] = {"attn": {}, "ffn": {}}
            for t in spec.targets:
                K, N = layer_dims(config)[t]
                rng, ka, kb = jax.random.split(rng, 3)
                block["attn" if t in ("Wqkv", "out_proj") else "ffn"][t] = {
                    "lora_a": jax.random.normal(ka, (K, 8)) / K ** 0.5, "lora_b": 0.02 * jax.random.normal(kb, (8, N))}
        out[f"adapter{k}"] = save_adapter(tree, spec, f"{root}/adapter{k}")
    return out


def lora_load(server, args) -> int:
    """16 streaming clients spread over the adapters against 16 on the base model, in turns."""
    names = list(server.config.lora_modules)
    asyncio.run(load(server.url, 16, 1, args.max_tokens, models=names))  # warm-up
    asyncio.run(load(server.url, 16, 1, args.max_tokens))
    rounds = in_turns({"adapters": lambda: asyncio.run(load(server.url, 16, args.requests_per_client,
                                                             args.max_tokens, models=names))["tok_s"],
                       "base": lambda: asyncio.run(load(server.url, 16, args.requests_per_client,
                                                         args.max_tokens))["tok_s"]}, 3, warmup=0)
    adapters, base = (statistics.median(rounds[k]) for k in ("adapters", "base"))
    print(f"16 clients over {len(names)} LoRA adapters: {adapters:.1f} tok/s; on the base model alone: {base:.1f} "
          f"tok/s; ratio {adapters / base:.2f} (target >= 0.8; medians of 3 rounds in turns)")
    print(json.dumps({**machine(), "loras": len(names), "adapters_tok_s_16": adapters, "base_tok_s_16": base,
                      "ratio": adapters / base, "decode_steps": args.decode_steps, "max_tokens": args.max_tokens}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the offline demo checkpoint)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--soak", type=int, default=1000, help="soak requests (0 to skip)")
    ap.add_argument("--decode-steps", type=int, default=1,
                    help="engine steps per dispatch (1: every token streams as it is made)")
    ap.add_argument("--loras", type=int, default=0,
                    help="serve this many random rank-8 LoRA adapters and time 16 clients spread over them against "
                         "16 clients of the base model, in turns (the only measurement then)")
    ap.add_argument("--prefix-cache", action="store_true",
                    help="time a 10-turn chat and 16 users sharing a system prompt with the prefix cache on and off "
                         "(benchmarks/server_prefix.py; the only measurement then)")
    ap.add_argument("--speculative", type=int, default=0, metavar="K",
                    help="time prompt-lookup speculative decoding with K draft tokens against plain decoding at batch "
                         "1 (benchmarks/server_speculative.py; the only measurement then)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in turns (--prefix-cache, --speculative)")
    ap.add_argument("--llama-cpp-src", default=None,
                    help="--speculative: also time llama.cpp with and without its prompt-lookup decoding "
                         "(an unpacked llama-cpp-python sdist, for its GGUF converter)")
    args = ap.parse_args()
    if args.speculative:
        import server_speculative

        return server_speculative.run(args)
    if args.prefix_cache:
        import server_prefix

        return server_prefix.run(args)

    from easympt.demo import demo_checkpoint
    from easympt.serve import MPTJaxServer

    model = args.model or demo_checkpoint()
    config = {"port": 0, "batch_size": 16, "max_length": 512, "max_new_tokens": args.max_tokens,
              "max_compile_tokens": 16, "max_queue": 256, "decode_steps": args.decode_steps}
    if args.loras:
        import tempfile

        config["lora_modules"] = random_adapters(model, args.loras, tempfile.mkdtemp())
        config["max_lora_rank"] = 8
    server = MPTJaxServer.from_pretrained(model, config=config)
    server.fire()
    if args.loras:
        try:
            return lora_load(server, args)
        finally:
            server.shutdown()

    def rss() -> int:  # this process holds the server: its resident set
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    result = {"model": model, "max_tokens": args.max_tokens, "decode_steps": args.decode_steps, "load": []}
    try:
        # warm-up: every shape a request of this length meets (prompt buckets, cache windows) compiles here
        asyncio.run(load(server.url, 4, 1, args.max_tokens))
        for clients in (1, 4, 16):
            r = asyncio.run(load(server.url, clients, args.requests_per_client, args.max_tokens))
            result["load"].append(r)
            print(f"{clients:3d} clients: {r['tok_s']:8.1f} tok/s  ttft p50 {r['ttft_p50_s']:.3f}s "
                  f"p99 {r['ttft_p99_s']:.3f}s  chunk gap p50 {r['chunk_gap_p50_s']:.3f}s "
                  f"p99 {r['chunk_gap_p99_s']:.3f}s  errors {r['errors']}")
        result["scaling_16_over_1"] = result["load"][2]["tok_s"] / result["load"][0]["tok_s"]
        print(f"16 clients / 1 client aggregate throughput: {result['scaling_16_over_1']:.2f}x")
        plain = asyncio.run(plain_step(server.url, args.max_tokens))
        # 16 streaming clients against 16 plain ones, in turns (3 rounds, medians): a change in the
        # machine's speed during the run falls on both
        rounds = in_turns({s: lambda s=s: asyncio.run(load(server.url, 16, args.requests_per_client, args.max_tokens,
                                                           stream=s))["tok_s"] for s in (True, False)}, 3, warmup=0)
        stream16, plain16 = (statistics.median(rounds[s]) for s in (True, False))
        one = result["load"][0]
        result["streaming"] = {
            "plain_ttft_s": plain["ttft_s"], "plain_step_s": plain["step_s"], "plain_tok_s_16": plain16,
            "stream_tok_s_16": stream16, "gap_p50_over_step": one["chunk_gap_p50_s"] / plain["step_s"],
            "first_token_over_ttft_plus_step": one["ttft_p50_s"] / (plain["ttft_s"] + plain["step_s"]),
            "stream_over_plain_16": stream16 / plain16}
        st = result["streaming"]
        print(f"streaming (1 client) vs plain requests: gap p50 / time per token {st['gap_p50_over_step']:.2f} "
              f"(target <= 1.25; plain {1e3 * plain['step_s']:.1f} ms/token); first streamed token / (plain TTFT + "
              f"one token) {st['first_token_over_ttft_plus_step']:.2f} (target <= 1); 16 clients streaming / plain "
              f"throughput {st['stream_over_plain_16']:.2f} (target >= 0.9; {stream16:.1f} / {plain16:.1f} tok/s, "
              "medians of 3 rounds in turns)")
        if args.soak:
            s = asyncio.run(soak(server.url, args.soak, 16, 16, rss))
            result["soak"] = s
            print(f"soak: {s['requests']} requests, statuses {s['statuses']}, server errors {s['server_errors']}, "
                  f"RSS {s['rss_after_100_mb']:.0f} -> {s['rss_end_mb']:.0f} MiB ({100 * s['rss_growth']:+.1f}%)")
    finally:
        server.shutdown()
    print(json.dumps({**machine(), **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
