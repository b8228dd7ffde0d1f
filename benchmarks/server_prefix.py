"""bench_server.py --prefix-cache: what the automatic prefix cache buys a server, on one server timed
in turns with its cache on and off (off: the scheduler runs without its index, as a server started with
prefix_cache_bytes 0 does).

- chat: a 10-turn conversation over /v1/chat/completions (streamed, greedy); each turn resends the
  whole history (>= 1,500 tokens by turn 10). Target: the 10th turn's time to first token <= 0.2x
  without the cache, and every greedy reply identical.
- shared system prompt: 16 users, each with their own question after the same ~900-token system
  prompt (seen before), 32 sampled tokens each. Target: aggregate tok/s >= 1.5x without the cache.

Random mpt-125m weights with mpt-7b's gpt-neox tokenizer; the text is the README's.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import httpx

from timing import in_turns, machine

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "hub", "mosaicml", "mpt-7b-instruct")


def write_checkpoint(path: str) -> str:
    """mpt-125m geometry, random weights (torch seed 0), max_seq_len 2048, and the gpt-neox tokenizer."""
    import shutil

    from peers import write_checkpoint as write_weights

    write_weights("mpt-125m", path, max_seq_len=2048)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(TOKENIZER, f)):
            shutil.copy(os.path.join(TOKENIZER, f), path)
    return path


def text_pieces(tokenizer, n_tokens: int, count: int, offset: int) -> list[str]:
    """`count` pieces of README text of about n_tokens tokens each, starting `offset` pieces in."""
    with open(os.path.join(os.path.dirname(HERE), "README.md")) as fh:
        ids = tokenizer(fh.read())["input_ids"]
    out = []
    for k in range(offset, offset + count):
        start = (k * n_tokens) % max(1, len(ids) - n_tokens)
        out.append(tokenizer.decode(ids[start:start + n_tokens]))
    return out


async def stream_chat(client: httpx.AsyncClient, messages: list[dict], max_tokens: int, **sampling) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, **sampling}
    t0, ttft, parts, tokens = time.perf_counter(), None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            assert "error" not in msg, msg
            delta = msg["choices"][0]["delta"].get("content") if msg.get("choices") else None
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(delta)
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "text": "".join(parts), "tokens": tokens,
            "total": time.perf_counter() - t0}


async def chat(url: str, users: list[str], max_tokens: int) -> dict:
    """One conversation: a turn per user message, each resending the history; the last turn's TTFT."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    replies, ttfts = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for user in users:
            messages.append({"role": "user", "content": user})
            r = await stream_chat(client, messages, max_tokens, temperature=0)
            messages.append({"role": "assistant", "content": r["text"]})
            replies.append(r["text"])
            ttfts.append(r["ttft"])
    return {"ttft_last": ttfts[-1], "ttfts": ttfts, "replies": replies}


async def shared_system(url: str, system: str, questions: list[str], max_tokens: int) -> float:
    """Every question at once after the same system prompt: aggregate completion tok/s."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(stream_chat(client, [{"role": "system", "content": system},
                                                          {"role": "user", "content": q}], max_tokens,
                                                         temperature=0.8, seed=i) for i, q in enumerate(questions)))
        wall = time.perf_counter() - t0
    return sum(d["tokens"] for d in done) / wall


def run(args) -> int:
    import tempfile

    from transformers import AutoTokenizer

    from easympt.serve import MPTJaxServer

    model = args.model or write_checkpoint(os.path.join(tempfile.mkdtemp(), "mpt-125m"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    server = MPTJaxServer.from_pretrained(model, config={
        "port": 0, "batch_size": 16, "max_length": 2048, "max_new_tokens": 64, "max_compile_tokens": 64,
        "max_queue": 256, "decode_steps": args.decode_steps})
    server.fire()
    index = server.scheduler.prefix
    assert index is not None, "the server started without a prefix cache"

    def cache(on: bool):
        server.scheduler.prefix = index if on else None  # between runs: the engine thread is idle

    rounds = {"on": [], "off": []}
    try:
        prompt_tokens = None
        # chat: conversation r (its own text) once with the cache and once without, in turns
        for r in range(args.rounds + 1):  # round 0 warms every shape up
            users = text_pieces(tokenizer, 120, 10, offset=10 * r)
            for side in ("on", "off"):
                cache(side == "on")
                time.sleep(0.05)
                rounds[side].append(asyncio.run(chat(server.url, users, 32)))
            if prompt_tokens is None:
                history = [{"role": "system", "content": "You are a helpful assistant."}]
                for u, a in zip(users, rounds["on"][0]["replies"]):
                    history += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
                prompt_tokens = len(server.encode_prompt(server.format_messages(history[:-1]), 0))
        same = all(a["replies"] == b["replies"] for a, b in zip(rounds["on"], rounds["off"]))
        on_ttft = statistics.median(x["ttft_last"] for x in rounds["on"][1:])
        off_ttft = statistics.median(x["ttft_last"] for x in rounds["off"][1:])
        print(f"chat, turn 10 ({prompt_tokens} prompt tokens): time to first token {on_ttft:.3f} s with the prefix "
              f"cache, {off_ttft:.3f} s without: {on_ttft / off_ttft:.3f}x (target <= 0.2); greedy replies "
              f"{'identical' if same else 'DIFFER'} (medians of {args.rounds} conversations in turns)")

        system = " ".join(text_pieces(tokenizer, 900, 1, offset=7))
        questions = [f"Question {i}: " + q for i, q in enumerate(text_pieces(tokenizer, 24, 16, offset=50))]
        for side in ("on", "off"):  # the system prompt has been seen before (the cache side keeps it)
            cache(side == "on")
            asyncio.run(shared_system(server.url, system, questions[:1], 32))
        shared = in_turns({side: (lambda side=side: (cache(side == "on"), asyncio.run(
            shared_system(server.url, system, questions, 32)))[1]) for side in ("on", "off")}, args.rounds, warmup=0)
        on_tps, off_tps = (statistics.median(shared[s]) for s in ("on", "off"))
        print(f"16 users sharing a {len(tokenizer(system)['input_ids'])}-token system prompt: {on_tps:.1f} tok/s with "
              f"the prefix cache, {off_tps:.1f} without: {on_tps / off_tps:.2f}x (target >= 1.5; medians of "
              f"{args.rounds} rounds in turns)")
        cache(True)
        stats = index.stats()
        print(f"prefix cache: {stats}")
        print(json.dumps({**machine(), "prefix_cache": True, "chat_prompt_tokens": prompt_tokens,
                          "chat_ttft_on_s": on_ttft, "chat_ttft_off_s": off_ttft, "chat_ttft_ratio": on_ttft / off_ttft,
                          "greedy_identical": same, "shared_tok_s_on": on_tps, "shared_tok_s_off": off_tps,
                          "shared_ratio": on_tps / off_tps, "cache": stats}))
    finally:
        server.shutdown()
    return 0
