"""Quality of easympt's 8- and 4-bit weights and 8-bit KV cache, measured against float32 and next to
llama.cpp's GGUFs of the same weights at the same bits (bf16 vs f16, int8 vs Q8_0, int4 vs Q4_0).

1. The demo model: perplexity of the standard-library files its training held out (every 50th by a
   hash of the path, scripts/train_demo_model.py), scored as `easympt eval` scores (evaluate_texts:
   windows of 256 tokens, stride 128) with each weight format; llama.cpp scores the same windows'
   tokens through its per-token logits. The increase over float32 is each system's own (llama.cpp's
   MPT uses the tanh GELU, so its f32 differs a little from easympt's).
2. Random mpt-125m weights (transformers' init, torch seed 0): the float32 model's greedy 128 tokens
   after a 32-token prompt; per format, the logits of that sequence (teacher-forced) against float32's
   (max and mean |difference|, top-1 agreement) and the format's own free-running greedy tokens
   (how many of the 128 equal float32's, and where the first difference falls). The int8 KV cache
   (float32 weights) is one more row: its logits come from a cached pass, which writes the 8-bit
   keys and values before attending to them, as decode does.

Without llama-cpp-python or --llama-cpp-src the llama.cpp rows are skipped (said in the output).
Prints tables and one JSON line.

    python benchmarks/bench_quantize.py [--llama-cpp-src DIR] [--formats float32,bf16,int8,int4] [--skip-demo]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np

import llama_cpp_peer
from easympt import FlaxMptForCausalLM
from easympt.cache import KVCache
from easympt.demo import demo_checkpoint
from easympt.evaluation import evaluate_texts, local_scorer
from easympt.generation import GenerationEngine, SamplingConfig
from easympt.transform import mpt_from_pretrained
from easympt.transform.hf_to_flax import load_tokenizer
from peers import write_checkpoint
from timing import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

FORMATS = ("float32", "bf16", "int8", "int4")
PEER_FORMAT = {"float32": "f32", "bf16": "f16", "int8": "q8_0", "int4": "q4_0"}
WINDOW, PROMPT, NEW = 256, 32, 128


def easympt_model(ckpt: str, fmt: str):
    """(model, params) of `ckpt` in weight format `fmt`, float32 compute (weights widened in the product)."""
    quantize = fmt if fmt in ("int8", "int4") else None
    dtype = "bf16" if fmt == "bf16" else "fp32"
    params, config = mpt_from_pretrained(ckpt, dtype=dtype, quantize=quantize, progress=False)
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.bfloat16 if fmt == "bf16" else jnp.float32,
                               quantize=quantize, _do_init=False)
    return model, params


def llama(gguf: str, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                 verbose=False)


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of one sequence, every position (a fresh context)."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[:len(tokens)], np.float32)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """llama.cpp's greedy tokens, one eval per token (logits_all: the last row of llm.scores)."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for i in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if i + 1 < n:
            llm.eval([out[-1]])
    return out


def llama_scorer(llm):
    """An easympt.evaluation Scorer over llama.cpp: log-probabilities of tokens 1.. of each window."""

    def score(windows):
        out = []
        for w in windows:
            logits = llama_logits(llm, w)[:-1].astype(np.float64)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            out.append(logp[np.arange(len(w) - 1), w[1:]])
        return out

    return score


def heldout_texts() -> list[str]:
    from train_demo_model import corpus_files, is_heldout, read_source

    root, files = corpus_files()
    texts = [read_source(f) for f in files if is_heldout(os.path.relpath(f, root))]
    return [t for t in texts if t]


def demo_perplexity(formats, src: str | None, tmp: str) -> dict:
    ckpt = demo_checkpoint()
    tok = load_tokenizer(ckpt)
    texts = heldout_texts()
    rows = {}
    for fmt in formats:
        model, params = easympt_model(ckpt, fmt)
        r = evaluate_texts(texts, tok, local_scorer(model, params, WINDOW), WINDOW, batch_size=8, progress=False)
        rows[f"easympt_{fmt}"] = r.to_dict()
        print(f"demo model, easympt {fmt:8}: perplexity {r.perplexity:.4f} over {r.tokens} tokens", flush=True)
    why = llama_cpp_peer.available(src)
    if why:
        print(f"llama.cpp skipped: {why}", flush=True)
        return {"texts": len(texts), **rows, "llama_cpp": {"skipped": why}}
    for fmt in formats:
        kind = PEER_FORMAT[fmt]
        gguf = llama_cpp_peer.write_gguf(ckpt, src, os.path.join(tmp, f"demo-{kind}.gguf"), kind, tokenizer_dir=ckpt)
        r = evaluate_texts(texts, tok, llama_scorer(llama(gguf, WINDOW)), WINDOW, batch_size=8, progress=False)
        rows[f"llama_cpp_{kind}"] = r.to_dict()
        print(f"demo model, llama.cpp {kind:5}: perplexity {r.perplexity:.4f} over {r.tokens} tokens", flush=True)
    return {"texts": len(texts), **rows}


def agreement(ref_logits, logits, ref_tokens, tokens) -> dict:
    """Teacher-forced logits against the reference's, and free-running greedy tokens against its tokens."""
    diff = np.abs(logits - ref_logits)
    same = np.asarray(tokens[:NEW]) == np.asarray(ref_tokens[:NEW])
    return {"logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
            "logits_scale": float(np.abs(ref_logits).max()),
            "top1_agreement": float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
            "greedy_equal": int(same.sum()),
            "greedy_first_difference": None if same.all() else int(np.argmin(same))}


def greedy(model, params, prompt: list[int], kv_dtype=None) -> list[int]:
    engine = GenerationEngine(model, params, max_length=PROMPT + NEW + 32, max_compile_tokens=32, kv_dtype=kv_dtype)
    assert engine.module.cpu_kernels, "the greedy runs are meant to use easympt's CPU kernels, as a CPU user gets"
    P = engine.pad_prompts([prompt])[0].shape[1]
    prefix = engine.prefill_batch([prompt], [SamplingConfig(temperature=0.0, max_new_tokens=NEW)], eos_ids=(),
                                  cache_len=engine.decode_cache_len(P, NEW))
    first = int(prefix.token[0])
    _, out = engine.generate(engine.params, engine.start(prefix), n_steps=NEW - 1)
    return [first] + [int(t) for t in np.asarray(out)[0] if t >= 0]


def sequence_logits(model, params, seq: list[int], kv_dtype=None) -> np.ndarray:
    """Logits predicting seq[PROMPT:] (positions PROMPT-1 .. end-1); with kv_dtype, through a cache of it."""
    ids = jnp.asarray([seq[:-1]])
    if kv_dtype is None:
        logits = model(ids, params=params).logits
    else:
        cache = KVCache.zeros(model.config, 1, len(seq), kv_dtype)
        logits, _ = model.module.apply({"params": params}, ids, None, cache)
    return np.asarray(logits[0, PROMPT - 1:], np.float32)


def random_model_agreement(formats, src: str | None, tmp: str) -> dict:
    ckpt = write_checkpoint("mpt-125m", os.path.join(tmp, "mpt-125m"), max_seq_len=2048)
    prompt = np.random.default_rng(0).integers(0, 50000, PROMPT).tolist()
    ref_model, ref_params = easympt_model(ckpt, "float32")
    ref_tokens = greedy(ref_model, ref_params, prompt)
    seq = prompt + ref_tokens
    ref_logits = sequence_logits(ref_model, ref_params, seq)
    rows = {}
    for fmt in formats:
        model, params = (ref_model, ref_params) if fmt == "float32" else easympt_model(ckpt, fmt)
        rows[f"easympt_{fmt}"] = agreement(ref_logits, sequence_logits(model, params, seq), ref_tokens,
                                           greedy(model, params, prompt))
    rows["easympt_float32_int8_kv_cache"] = agreement(
        ref_logits, sequence_logits(ref_model, ref_params, seq, jnp.int8), ref_tokens,
        greedy(ref_model, ref_params, prompt, kv_dtype="int8"))
    why = llama_cpp_peer.available(src)
    if why:
        rows["llama_cpp"] = {"skipped": why}
    else:
        for fmt in formats:
            kind = PEER_FORMAT[fmt]
            llm = llama(llama_cpp_peer.write_gguf(ckpt, src, os.path.join(tmp, f"125m-{kind}.gguf"), kind),
                        PROMPT + NEW + 32)
            run = llama_greedy(llm, prompt, NEW)
            rows[f"llama_cpp_{kind}"] = agreement(ref_logits, llama_logits(llm, seq[:-1])[PROMPT - 1:], ref_tokens, run)
    for name, r in rows.items():
        if "skipped" in r:
            print(f"mpt-125m, {name}: skipped ({r['skipped']})")
            continue
        first = r["greedy_first_difference"]
        print(f"mpt-125m, {name:30}: logits max |d| {r['logits_max_abs_diff']:.4f} "
              f"(mean {r['logits_mean_abs_diff']:.5f}, scale {r['logits_scale']:.2f}), top-1 {r['top1_agreement']:.1%}, "
              f"greedy {r['greedy_equal']}/{NEW} equal to easympt float32's"
              f"{'' if first is None else f' (first difference at token {first})'}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--llama-cpp-src", default=None, help="an unpacked llama-cpp-python sdist or llama.cpp checkout")
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args(argv)
    formats = args.formats.split(",")
    unknown = set(formats) - set(FORMATS)
    if unknown or formats[0] != "float32":
        ap.error(f"--formats: float32 first, then any of {', '.join(FORMATS[1:])} (got {args.formats})")
    with tempfile.TemporaryDirectory() as tmp:
        result = {"bench": "quantize", **machine(), "formats": formats}
        if not args.skip_demo:
            result["demo"] = demo_perplexity(formats, args.llama_cpp_src, tmp)
        result["mpt_125m"] = random_model_agreement(formats, args.llama_cpp_src, tmp)
    demo = result.get("demo", {})
    for fmt in formats[1:]:
        for system, kind in (("easympt", fmt), ("llama_cpp", PEER_FORMAT[fmt])):
            base = demo.get(f"{system}_{FORMATS[0] if system == 'easympt' else 'f32'}")
            row = demo.get(f"{system}_{kind}")
            if base and row:
                row["perplexity_increase"] = row["perplexity"] / base["perplexity"] - 1
                print(f"demo model, {system} {kind}: perplexity +{row['perplexity_increase']:.3%} over its float32")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
