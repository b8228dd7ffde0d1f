"""llama.cpp as a benchmark peer: a GGUF written from the same checkpoint, driven greedily through
llama-cpp-python's low-level API, as its users run it on a CPU (see shared/notes/llama-cpp-peer.md).

Optional: needs `llama-cpp-python` and llama.cpp's converter (`--llama-cpp-src`: an unpacked
llama-cpp-python sdist or a llama.cpp checkout). Without them the benchmark says so and skips it.
Run through the peer harness: `python benchmarks/peers.py llama-cpp CKPT --prompts FILE --llama-cpp-src DIR`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

# the converter needs a tokenizer beside the weights whose pre-tokenizer it knows: gpt-neox-20b's,
# which every MosaicML MPT uses, is kept verbatim as a test fixture
TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                             "hub", "mosaicml", "mpt-7b-instruct")


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


# Runs llama.cpp's converter with one change: a byte-level BPE whose pre-tokenizer hash the converter
# does not list (the demo model's small tokenizer, trained with `tokenizers`) is written as "gpt-2",
# the pre-tokenizer a ByteLevel BPE without a prefix space uses. The benchmarks hand llama.cpp token
# ids, never text, so only the vocabulary's size and ids must agree.
_CONVERT = """
import importlib.util, inspect, os, sys
path = sys.argv.pop(1)
sys.path.insert(0, os.path.dirname(path))  # as when the script runs itself: its conversion/ package
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", path)
module = importlib.util.module_from_spec(spec)
sys.modules["convert_hf_to_gguf"] = module
spec.loader.exec_module(module)
def known_or_gpt2(original):
    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"
    return get_vocab_base_pre
here = os.path.dirname(os.path.abspath(path))
for mod in list(sys.modules.values()):  # the converter's own modules only
    if not (getattr(mod, "__file__", None) or "").startswith(here):
        continue
    for cls in list(vars(mod).values()):
        if inspect.isclass(cls) and "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = known_or_gpt2(vars(cls)["get_vocab_base_pre"])
module.main()
"""


def write_gguf(ckpt: str, src: str, out: str, outtype: str = "f32", tokenizer_dir: str = TOKENIZER_DIR) -> str:
    """GGUF of an HF MPT checkpoint; the converter knows MosaicML's `MPTForCausalLM` spelling. The
    tokenizer files come from `tokenizer_dir` (default gpt-neox-20b's, which MosaicML's MPTs use)."""
    with tempfile.TemporaryDirectory() as tmp:
        for f in os.listdir(ckpt):
            if os.path.isfile(os.path.join(ckpt, f)):
                shutil.copy(os.path.join(ckpt, f), tmp)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.exists(os.path.join(tokenizer_dir, f)):
                shutil.copy(os.path.join(tokenizer_dir, f), tmp)
        cfg_path = os.path.join(tmp, "config.json")
        cfg = json.load(open(cfg_path))
        cfg["architectures"] = ["MPTForCausalLM"]
        json.dump(cfg, open(cfg_path, "w"))
        # q4_0 is not a converter type: convert to f16, then llama.cpp's own quantizer (its C API)
        convert_to = "f16" if outtype == "q4_0" else outtype
        first = out + ".f16" if outtype == "q4_0" else out
        done = subprocess.run([sys.executable, "-c", _CONVERT, converter(src), tmp, "--outfile", first,
                               "--outtype", convert_to], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed on {ckpt}:\n{done.stderr[-2000:]}")
    if outtype == "q4_0":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        if llama_cpp.llama_model_quantize(first.encode(), out.encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {first} to q4_0")
        os.remove(first)
    return out


def load(gguf: str, prompts: dict):
    """(run, ready line) for peers.serve. Batch 1 only: llama-cpp-python's high-level API decodes one
    sequence."""
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

    return (lambda key, n: [greedy(prompts[key][0], n)]), {"keys": ["b1"], "n_vocab": n_vocab}


def start(ckpt: str, prompts: dict, src: str, outtype: str, tmp: str):
    """(run, ready line) for peers.serve; the GGUF is written into `tmp`."""
    why = available(src)
    if why:
        return None, {"skipped": why}
    run, ready = load(write_gguf(ckpt, src, os.path.join(tmp, "model.gguf"), outtype), prompts)
    return run, {**ready, "outtype": outtype}
