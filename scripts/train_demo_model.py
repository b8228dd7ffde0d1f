"""Rebuild easympt's bundled demo model from scratch, deterministically.

Corpus: the Python standard library's own source as installed with the
interpreter running this script (PSF licence), without its tests, idlelib and
lib2to3. Every 50th file (by a hash of its path) is held out for perplexity.

Steps: (1) a byte-level BPE tokenizer (8192 tokens; <|im_start|>/<|im_end|>
added for ChatML); (2) a small ALiBi MPT trained with easympt's own trainer on
the source, chunked at line boundaries into packed 256-token rows;
(3) a short instruction-tuning pass on pairs read out of the same code with
`ast` (signature -> docstring, docstring -> function, "what does X do"),
formatted in both templates the server uses (Dolly-style for /instruct,
ChatML for /chat), with plain code mixed in so completion is not forgotten.

Defaults take about an hour on 2 CPU cores. The result is written in Hugging
Face format with `training_info.json` (interpreter version, steps, held-out
perplexity, wall time): the same interpreter version and defaults give the
same model.

    python scripts/train_demo_model.py                       # -> easympt/demo_model
    python scripts/train_demo_model.py --steps 20 --instruct-steps 5 --out /tmp/demo   # smoke run
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import shutil
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
GEOMETRY = dict(d_model=192, n_heads=6, n_layers=4, expansion_ratio=4, max_seq_len=2048, vocab_size=8192)
SEQ_LEN = 256


def corpus_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py") and not f.startswith("test")]
    return root, sorted(out, key=lambda p: os.path.relpath(p, root))


def is_heldout(relpath: str) -> bool:
    return int(hashlib.sha1(relpath.encode()).hexdigest(), 16) % 50 == 0


def read_source(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (UnicodeDecodeError, OSError):
        return None


def chunk_lines(text: str, tokenizer, max_tokens: int) -> list[str]:
    """Consecutive lines grouped into chunks of at most `max_tokens` tokens; an over-long line is dropped."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    counts = [len(ids) for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    chunks, cur, used = [], [], 0
    for line, n in zip(lines, counts):
        if n > max_tokens:
            continue
        if used + n > max_tokens and cur:
            chunks.append("".join(cur))
            cur, used = [], 0
        cur.append(line)
        used += n
    if cur and "".join(cur).strip():
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n")[0].strip()


def instruction_pairs(module: str, source: str) -> list[tuple[str, str]]:
    """(instruction, answer) pairs from the documented public functions of one module."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    pairs = []
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(doc) < 20:
            continue
        summary = first_paragraph(doc)
        signature = f"def {node.name}({ast.unparse(node.args)}):"
        pairs.append((f"Write a docstring for this Python function:\n{signature}", summary))
        pairs.append((f"What does {module}.{node.name} do?", summary.split("\n")[0]))
        body = "\n".join(lines[node.lineno - 1:node.end_lineno])
        if node.col_offset == 0 and len(body) < 600:
            pairs.append((f"Write a Python function {node.name} that does this: {summary.split(chr(10))[0]}", body))
    return pairs


def formatted_examples(pairs: list[tuple[str, str]]) -> list[dict]:
    """Each pair in the /instruct template and, alternately, as a ChatML turn."""
    from easympt.serve.mpt import chatml, dolly_instruct

    out = []
    for i, (instruction, answer) in enumerate(pairs):
        if i % 2 == 0:
            prompt = dolly_instruct(None, instruction)
            out.append({"prompt": prompt, "response": answer})
        else:
            prompt = chatml([{"role": "user", "content": instruction}])
            out.append({"prompt": prompt, "response": answer + "<|im_end|>"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "easympt", "demo_model"))
    ap.add_argument("--work", default=os.path.join(REPO, "build", "demo_model_work"))
    ap.add_argument("--steps", type=int, default=1100, help="pre-training steps (16 x 256 tokens each)")
    ap.add_argument("--instruct-steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from easympt.config import MptConfig
    from easympt.demo import train_tokenizer
    from easympt.model import FlaxMptForCausalLM
    from easympt.training.run import run_training
    from easympt.training.trainer import TrainConfig
    from easympt.transform import mpt_to_pretrained

    t0 = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    root, files = corpus_files()
    train_files = [f for f in files if not is_heldout(os.path.relpath(f, root))]
    heldout_files = [f for f in files if is_heldout(os.path.relpath(f, root))]
    print(f"corpus: {len(files)} files under {root} ({len(heldout_files)} held out)", flush=True)

    tokenizer = train_tokenizer(GEOMETRY["vocab_size"] - 2, files=train_files, chat_tokens=True)
    assert len(tokenizer) == GEOMETRY["vocab_size"], len(tokenizer)
    config = MptConfig.preset("mpt-7b", **GEOMETRY, eos_token_id=tokenizer.eos_token_id,
                              attn_config={"alibi": True, "attn_uses_sequence_id": True})
    model = FlaxMptForCausalLM(config, _do_init=False)
    init_dir = mpt_to_pretrained(model.init_weights(jax.random.PRNGKey(args.seed), (1, 1)), config,
                                 os.path.join(args.work, "init"), tokenizer=tokenizer)

    def chunks_of(paths):
        rows = []
        for p in paths:
            text = read_source(p)
            if text:
                rows += [{"text": c} for c in chunk_lines(text, tokenizer, SEQ_LEN - 1)]
        return rows

    code_rows, heldout_rows = chunks_of(train_files), chunks_of(heldout_files)
    write_jsonl(os.path.join(args.work, "code.jsonl"), code_rows)
    write_jsonl(os.path.join(args.work, "heldout.jsonl"), heldout_rows)
    print(f"{len(code_rows)} training chunks, {len(heldout_rows)} held-out chunks", flush=True)

    base_tc = TrainConfig(output_dir=os.path.join(args.work, "pretrain"), seq_len=SEQ_LEN, batch_size=16,
                          learning_rate=3e-3, warmup_steps=max(1, args.steps // 20), max_steps=args.steps,
                          weight_decay=0.1, save_every=max(1, args.steps // 4), keep_last=1, seed=args.seed)
    base = run_training(init_dir, os.path.join(args.work, "code.jsonl"), base_tc,
                        eval_data=os.path.join(args.work, "heldout.jsonl"),
                        export_dir=os.path.join(args.work, "base"))
    print(f"pre-training: {base}", flush=True)

    pairs = []
    for p in train_files:
        text = read_source(p)
        if text:
            module = os.path.relpath(p, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            pairs += instruction_pairs(module, text)
    rng = np.random.default_rng(args.seed)
    examples = formatted_examples(pairs)
    mix = examples + [code_rows[i] for i in rng.permutation(len(code_rows))[:len(examples) // 3]]
    mix = [mix[i] for i in rng.permutation(len(mix))]
    write_jsonl(os.path.join(args.work, "instruct.jsonl"), mix)
    print(f"{len(pairs)} instruction pairs, {len(mix)} instruction-pass examples", flush=True)

    tune_tc = TrainConfig(output_dir=os.path.join(args.work, "instruct"), seq_len=SEQ_LEN, batch_size=16,
                          learning_rate=1e-3, warmup_steps=max(1, args.instruct_steps // 10),
                          max_steps=args.instruct_steps, weight_decay=0.1,
                          save_every=max(1, args.instruct_steps // 2), keep_last=1, seed=args.seed)
    tuned = run_training(os.path.join(args.work, "base"), os.path.join(args.work, "instruct.jsonl"), tune_tc,
                         eval_fraction=0.02, export_dir=args.out + ".tmp")
    print(f"instruction pass: {tuned}", flush=True)

    heldout = held_out_perplexity(args.out + ".tmp", os.path.join(args.work, "heldout.jsonl"))
    info = {"corpus": f"CPython {platform.python_version()} standard library source (PSF licence), "
                      f"{len(train_files)} files; {len(heldout_files)} held out",
            "python": platform.python_version(), "geometry": GEOMETRY, "seq_len": SEQ_LEN,
            "pretrain_steps": args.steps, "instruct_steps": args.instruct_steps, "seed": args.seed,
            "tokens_per_step": 16 * SEQ_LEN, "heldout_loss": heldout["eval_loss"],
            "heldout_perplexity": heldout["eval_perplexity"],
            "pretrain_heldout_perplexity": base["eval_perplexity"],
            "instruct_eval_perplexity": tuned["eval_perplexity"],
            "wall_seconds": round(time.time() - t0), "cpu_count": os.cpu_count(), "jax": jax.__version__}
    with open(os.path.join(args.out + ".tmp", "training_info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    for name in os.listdir(args.out + ".tmp"):
        if name.endswith(".png") or name.startswith("metrics"):
            os.remove(os.path.join(args.out + ".tmp", name))
    shutil.copy(os.path.join(args.work, "pretrain", "loss.png"), os.path.join(args.out + ".tmp", "pretrain_loss.png"))
    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(args.out + ".tmp", args.out)
    print(json.dumps(info), flush=True)
    return 0


def held_out_perplexity(model_dir: str, heldout_jsonl: str) -> dict:
    """Loss of the final model on the held-out files (the same rows the pre-training evaluated)."""
    from transformers import AutoTokenizer

    from easympt.model import FlaxMptForCausalLM
    from easympt.training.data import pack, read_examples, tokenize
    from easympt.training.trainer import TrainConfig, Trainer
    from easympt.transform import mpt_from_pretrained

    params, config = mpt_from_pretrained(model_dir, dtype="fp32", progress=False)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = pack(tokenize(read_examples(heldout_jsonl), tok, SEQ_LEN, tok.eos_token_id), SEQ_LEN)
    tc = TrainConfig(output_dir=os.path.join(os.path.dirname(heldout_jsonl), "final_eval"), seq_len=SEQ_LEN,
                     batch_size=16)
    return Trainer(FlaxMptForCausalLM(config, _do_init=False), params, rows, tc, rows).evaluate()


if __name__ == "__main__":
    sys.exit(main())
