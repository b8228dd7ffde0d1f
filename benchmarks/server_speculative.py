"""bench_server.py --speculative: prompt-lookup speculative decoding on one server, a request with
drafts against the same request with `"speculative": false`, in turns, batch 1, greedy.

- editing: the prompt holds a piece of code and asks for it again (a rewrite keeps most of it). Target:
  >= 2x the plain decode tok/s, identical tokens.
- nothing to copy: a prompt whose continuation does not repeat it. Target: >= 0.95x (no slowdown).

Default model: the bundled demo model (trained on Python source, so it does copy code); --model another.
llama.cpp's peer (`LlamaPromptLookupDecoding`) is not run here: see the README's limits.
"""

from __future__ import annotations

import inspect
import json
import statistics
import textwrap
import time

import httpx

from timing import in_turns, machine


def editing_prompt() -> str:
    source = textwrap.dedent(inspect.getsource(textwrap.TextWrapper._split)).strip()
    return f"{source}\n\n\n# the same method, unchanged:\n{source.splitlines()[0]}\n"


def fresh_prompt() -> str:
    return "import os\n\n\ndef walk_tree(top, visit):\n    \"\"\"Call visit(path) for every file under top.\"\"\"\n"


def timed(url: str, prompt: str, speculative: bool, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "speculative": speculative}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=600).json()
    took = time.perf_counter() - t0
    return {"text": r["choices"][0]["text"], "tok_s": r["usage"]["completion_tokens"] / took}


def run(args) -> int:
    from easympt.demo import demo_checkpoint
    from easympt.serve import MPTJaxServer

    server = MPTJaxServer.from_pretrained(args.model or demo_checkpoint(), config={
        "port": 0, "batch_size": 1, "max_length": 1024, "max_new_tokens": 256, "max_compile_tokens": 64,
        "num_speculative_tokens": args.speculative, "prefix_cache_bytes": 0})
    server.fire()
    result = {**machine(), "num_speculative_tokens": args.speculative}
    try:
        for name, prompt in (("editing", editing_prompt()), ("nothing_to_copy", fresh_prompt())):
            runs = in_turns({side: (lambda side=side: timed(server.url, prompt, side, args.max_tokens))
                             for side in (True, False)}, args.rounds)
            spec, plain = (statistics.median(r["tok_s"] for r in runs[s]) for s in (True, False))
            same = all(a["text"] == b["text"] for a, b in zip(runs[True], runs[False]))
            target = ">= 2" if name == "editing" else ">= 0.95"
            print(f"{name}: {spec:.1f} tok/s with prompt lookup (k={args.speculative}), {plain:.1f} without: "
                  f"{spec / plain:.2f}x (target {target}); greedy text {'identical' if same else 'DIFFERS'}")
            result[name] = {"spec_tok_s": spec, "plain_tok_s": plain, "ratio": spec / plain, "identical": same}
        metrics = httpx.get(server.url + "/metrics").text
        rate = next((line.split()[-1] for line in metrics.splitlines()
                     if line.startswith("easympt_speculative_acceptance_rate ")), "nan")
        print(f"acceptance rate over both workloads: {float(rate):.2f}")
        result["acceptance_rate"] = float(rate)
    finally:
        server.shutdown()
    print(json.dumps(result))
    return 0
