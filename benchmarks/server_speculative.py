"""bench_server.py --speculative: prompt-lookup speculative decoding on one server, a request with
drafts against the same request with `"speculative": false`, in turns, batch 1, greedy.

- editing: the prompt holds a piece of code and asks for it again (a rewrite keeps most of it). Target:
  >= 2x the plain decode tok/s, identical tokens.
- nothing to copy: a prompt whose continuation does not repeat it. Target: >= 0.95x (no slowdown).

Default model: the bundled demo model (trained on Python source, so it does copy code); --model another.
With `--llama-cpp-src DIR` (an unpacked llama-cpp-python sdist) llama.cpp runs the same prompts on an
f32 GGUF of the same weights, with and without llama-cpp-python's `LlamaPromptLookupDecoding` (its
defaults but K predicted tokens), greedy, batch 1, timed in the same turns.
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


def llama_cpp_sides(model: str, src: str, k: int, max_tokens: int):
    """{"llama.cpp lookup": f(ids), "llama.cpp": f(ids)} -> {"tokens", "tok_s"}; or None with why not."""
    import os
    import tempfile

    import llama_cpp_peer

    why = llama_cpp_peer.available(src)
    if why:
        return None, why
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    gguf = llama_cpp_peer.write_gguf(model, src, os.path.join(tempfile.mkdtemp(), "model.gguf"), "f32",
                                     tokenizer_dir=model)
    kw = dict(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, verbose=False)
    systems = {"llama.cpp lookup": Llama(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k), **kw),
               "llama.cpp": Llama(**kw)}

    def side(llm):
        def run(ids):
            llm.reset()
            t0 = time.perf_counter()
            r = llm.create_completion(prompt=ids, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
            took = time.perf_counter() - t0
            return {"text": r["choices"][0]["text"], "tok_s": r["usage"]["completion_tokens"] / took}
        return run

    return {name: side(llm) for name, llm in systems.items()}, None


def run(args) -> int:
    from easympt.demo import demo_checkpoint
    from easympt.serve import MPTJaxServer

    server = MPTJaxServer.from_pretrained(args.model or demo_checkpoint(), config={
        "port": 0, "batch_size": 1, "max_length": 1024, "max_new_tokens": 256, "max_compile_tokens": 64,
        "num_speculative_tokens": args.speculative, "prefix_cache_bytes": 0})
    server.fire()
    result = {**machine(), "num_speculative_tokens": args.speculative}
    peers, why = (llama_cpp_sides(args.model or demo_checkpoint(), args.llama_cpp_src, args.speculative,
                                  args.max_tokens) if args.llama_cpp_src else (None, "no --llama-cpp-src"))
    if peers is None:
        print(f"llama.cpp peer skipped: {why}")
    try:
        for name, prompt in (("editing", editing_prompt()), ("nothing_to_copy", fresh_prompt())):
            ids = server.tokenizer(prompt)["input_ids"]
            sides = {side: (lambda side=side: timed(server.url, prompt, side, args.max_tokens)) for side in (True, False)}
            sides.update({n: (lambda f=f: f(ids)) for n, f in (peers or {}).items()})
            runs = in_turns(sides, args.rounds)
            spec, plain = (statistics.median(r["tok_s"] for r in runs[s]) for s in (True, False))
            same = all(a["text"] == b["text"] for a, b in zip(runs[True], runs[False]))
            target = ">= 2" if name == "editing" else ">= 0.95"
            print(f"{name}: {spec:.1f} tok/s with prompt lookup (k={args.speculative}), {plain:.1f} without: "
                  f"{spec / plain:.2f}x (target {target}); greedy text {'identical' if same else 'DIFFERS'}")
            result[name] = {"spec_tok_s": spec, "plain_tok_s": plain, "ratio": spec / plain, "identical": same}
            if peers:
                lk, pl = (statistics.median(r["tok_s"] for r in runs[s]) for s in ("llama.cpp lookup", "llama.cpp"))
                print(f"  llama.cpp (f32 GGUF): {lk:.1f} tok/s with LlamaPromptLookupDecoding, {pl:.1f} without "
                      f"({lk / pl:.2f}x); easympt with prompt lookup / llama.cpp with it: {spec / lk:.2f}x")
                result[name].update(llama_cpp_lookup_tok_s=lk, llama_cpp_tok_s=pl, over_llama_cpp_lookup=spec / lk)
        metrics = httpx.get(server.url + "/metrics").text
        rate = next((line.split()[-1] for line in metrics.splitlines()
                     if line.startswith("easympt_speculative_acceptance_rate ")), "nan")
        print(f"acceptance rate over both workloads: {float(rate):.2f}")
        result["acceptance_rate"] = float(rate)
    finally:
        server.shutdown()
    print(json.dumps(result))
    return 0
