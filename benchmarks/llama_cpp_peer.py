"""llama.cpp as a benchmark peer: a GGUF written from the same checkpoint, driven greedily through
llama-cpp-python's low-level API, as its users run it on a CPU (see shared/notes/llama-cpp-peer.md).

Optional: needs `llama-cpp-python` and llama.cpp's converter (`--llama-cpp-src`: an unpacked
llama-cpp-python sdist or a llama.cpp checkout). Without them the benchmark says so and skips it.

    python benchmarks/llama_cpp_peer.py CKPT_DIR --llama-cpp-src DIR   # prints one JSON line
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from timing import median_time

# the converter needs a tokenizer beside the weights whose pre-tokenizer it knows: gpt-neox-20b's,
# which every MosaicML MPT uses, is kept verbatim as a test fixture
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                             "hub", "mosaicml", "mpt-7b-instruct")
NEW = 128  # new tokens, as bench_generate


def converter(src: str) -> str | None:
    found = glob.glob(os.path.join(src, "**", "convert_hf_to_gguf.py"), recursive=True)
    return found[0] if found else None


def available(src: str | None) -> str | None:
    """None when the peer can run, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)"
    if not src or not converter(src):
        return "no llama.cpp converter (pass --llama-cpp-src: an unpacked llama-cpp-python sdist)"
    return None


def write_gguf(ckpt: str, src: str, out: str, outtype: str = "f32") -> str:
    """GGUF of an HF MPT checkpoint; the converter knows MosaicML's `MPTForCausalLM` spelling."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(ckpt):
            shutil.copy(os.path.join(ckpt, f), tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(TOKENIZER_DIR, f), tmp)
        cfg_path = os.path.join(tmp, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["architectures"] = ["MPTForCausalLM"]
        json.dump(cfg, open(cfg_path, "w"))
        subprocess.run([sys.executable, converter(src), tmp, "--outfile", out, "--outtype", outtype], check=True,
                       capture_output=True, text=True)
    return out


def measure(gguf: str, p1: list[int], plong: list[int], reps: int = 3) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512, logits_all=False,
                verbose=False)
    n_vocab = llm.n_vocab()

    def greedy(prompt: list[int], n: int) -> list[int]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if i + 1 < n:
                llm.eval([out[-1]])
        return out

    median = lambda fn: median_time(fn, reps=reps)  # noqa: E731

    t_full, t_one = median(lambda: greedy(p1, NEW)), median(lambda: greedy(p1, 1))
    return {"decode_tok_s_b1": (NEW - 1) / (t_full - t_one), "ttft_512_s": median(lambda: greedy(plong, 1)),
            "greedy_b1": [greedy(p1, NEW)], "n_vocab": n_vocab}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--llama-cpp-src", required=True)
    ap.add_argument("--outtype", default="f32")
    ap.add_argument("--prompts", required=True, help='JSON file {"b1": [ids], "long": [ids]}')
    args = ap.parse_args()
    why = available(args.llama_cpp_src)
    if why:
        print(json.dumps({"skipped": why}))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        gguf = write_gguf(args.ckpt, args.llama_cpp_src, os.path.join(tmp, "model.gguf"), args.outtype)
        prompts = json.load(open(args.prompts))
        result = measure(gguf, prompts["b1"], prompts["long"])
    result["outtype"] = args.outtype
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
