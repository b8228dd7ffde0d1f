"""bench_server.py --speculative: prompt-lookup speculative decoding on one server, a request with
drafts against the same request with `"speculative": false`, in turns, batch 1, greedy.

- editing: the prompt holds a piece of code and asks for it again (a rewrite keeps most of it). Target:
  >= 2x the plain decode tok/s, identical tokens.
- nothing to copy: a prompt whose continuation does not repeat it. Target: >= 0.95x (no slowdown).

Decode tok/s is (N - 1) / (t(N tokens) - t(1 token)), both requests timed in the same round, as
bench_generate times decode: the prompt's prefill (the same with or without drafts) is left out. The
end-to-end rate (N / t(N tokens), prefill and HTTP included) is printed beside it.

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


def decode_rates(complete, max_tokens: int) -> dict:
    """complete(n) -> (text, completion tokens) of one greedy request for n new tokens: the text of
    `max_tokens`, its end-to-end tok/s and its decode tok/s (the one-token request's time taken off)."""
    t0 = time.perf_counter()
    complete(1)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    text, n = complete(max_tokens)
    took = time.perf_counter() - t0
    return {"text": text, "tok_s": n / took, "decode_tok_s": (n - 1) / max(took - first, 1e-9)}


def timed(url: str, prompt: str, speculative: bool, max_tokens: int) -> dict:
    def complete(n):
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "speculative": speculative}
        r = httpx.post(url + "/v1/completions", json=body, timeout=600).json()
        return r["choices"][0]["text"], r["usage"]["completion_tokens"]
    return decode_rates(complete, max_tokens)


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
            def complete(n):
                llm.reset()
                r = llm.create_completion(prompt=ids, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)
                return r["choices"][0]["text"], r["usage"]["completion_tokens"]
            return decode_rates(complete, max_tokens)
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

            def median(side, key="decode_tok_s"):
                return statistics.median(r[key] for r in runs[side])

            spec, plain = median(True), median(False)
            e2e = median(True, "tok_s") / median(False, "tok_s")
            same = all(a["text"] == b["text"] for a, b in zip(runs[True], runs[False]))
            target = ">= 2" if name == "editing" else ">= 0.95"
            print(f"{name}: decode {spec:.1f} tok/s with prompt lookup (k={args.speculative}), {plain:.1f} without: "
                  f"{spec / plain:.2f}x (target {target}; end to end, prefill and HTTP included: {e2e:.2f}x); "
                  f"greedy text {'identical' if same else 'DIFFERS'}")
            result[name] = {"spec_tok_s": spec, "plain_tok_s": plain, "ratio": spec / plain,
                            "end_to_end_ratio": e2e, "identical": same}
            if peers:
                lk, pl = median("llama.cpp lookup"), median("llama.cpp")
                lk_e2e = median("llama.cpp lookup", "tok_s") / median("llama.cpp", "tok_s")
                print(f"  llama.cpp (f32 GGUF): decode {lk:.1f} tok/s with LlamaPromptLookupDecoding, {pl:.1f} "
                      f"without ({lk / pl:.2f}x; end to end {lk_e2e:.2f}x); easympt with prompt lookup / llama.cpp "
                      f"with it: {spec / lk:.2f}x")
                result[name].update(llama_cpp_lookup_tok_s=lk, llama_cpp_tok_s=pl, over_llama_cpp_lookup=spec / lk,
                                    llama_cpp_end_to_end_ratio=lk_e2e)
        metrics = httpx.get(server.url + "/metrics").text
        rate = next((line.split()[-1] for line in metrics.splitlines()
                     if line.startswith("easympt_speculative_acceptance_rate ")), "nan")
        print(f"acceptance rate over both workloads: {float(rate):.2f}")
        result["acceptance_rate"] = float(rate)
    finally:
        server.shutdown()
    print(json.dumps(result))
    return 0
