"""Training data: text / JSONL files -> packed fixed-length sequences.

Documents are concatenated into rows of `seq_len` tokens with a
`sequence_id` per token, so with `attn_uses_sequence_id` packed documents
do not attend to each other, and a `loss_mask` that is 0 on prompt tokens
(prompt/response data), on padding and on the first token of each
document (nothing before it in its document predicts it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from easympt.textfiles import is_jsonl, json_lines, read_text

log = logging.getLogger("easympt.train")


class DataError(ValueError):
    """Training data that cannot be used as given: names the file and line."""


@dataclass(frozen=True)
class Example:
    tokens: list[int]
    loss: list[int]  # 1 where the token is a training target


def read_examples(path: str) -> list[tuple[str, str]]:
    """(prompt, text) pairs: a .txt file is one document per blank-line-separated block;
    JSONL lines carry {"text"} or {"prompt", "response"}."""
    raw = read_text(path, DataError)
    if not is_jsonl(path):
        return [("", block.strip()) for block in raw.split("\n\n") if block.strip()]
    out = []
    for n, row in json_lines(path, raw, DataError):
        if "prompt" in row and "response" in row:
            out.append((str(row["prompt"]), str(row["response"])))
        elif "text" in row:
            out.append(("", str(row["text"])))
        else:
            raise DataError(f"{path}:{n}: needs a 'text' field or 'prompt' and 'response' fields")
    return out


def tokenize(pairs: list[tuple[str, str]], tokenizer, seq_len: int, eos_id: int | None) -> list[Example]:
    """Token lists with loss masks; a document longer than `seq_len` is skipped with a warning."""
    out, skipped = [], 0
    for prompt, text in pairs:
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        t = tokenizer.encode(text, add_special_tokens=False)
        if eos_id is not None:
            t = t + [eos_id]
        if len(p) + len(t) > seq_len:
            skipped += 1
            continue
        out.append(Example(p + t, [0] * len(p) + [1] * len(t)))
    if skipped:
        log.warning("skipped %d of %d documents longer than seq_len %d tokens", skipped, len(pairs), seq_len)
    if not out:
        raise DataError(f"no document fits in seq_len {seq_len} tokens")
    return out


def pack(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Greedy first-fit packing in order: input_ids, sequence_id, loss_mask, attention_mask [N, seq_len]."""
    rows: list[list[Example]] = []
    used: list[int] = []
    for ex in examples:
        if rows and used[-1] + len(ex.tokens) <= seq_len:
            rows[-1].append(ex)
            used[-1] += len(ex.tokens)
        else:
            rows.append([ex])
            used.append(len(ex.tokens))
    n = len(rows)
    ids = np.zeros((n, seq_len), np.int32)
    seq = np.zeros((n, seq_len), np.int32)
    loss = np.zeros((n, seq_len), np.float32)
    attn = np.zeros((n, seq_len), np.int32)
    for r, docs in enumerate(rows):
        pos = 0
        for d, ex in enumerate(docs):
            k = len(ex.tokens)
            ids[r, pos:pos + k] = ex.tokens
            seq[r, pos:pos + k] = d
            loss[r, pos:pos + k] = ex.loss
            loss[r, pos] = 0.0  # a document's first token has no context inside its document
            attn[r, pos:pos + k] = 1
            pos += k
        seq[r, pos:] = len(docs)  # padding is its own (masked) sequence
    return {"input_ids": ids, "sequence_id": seq, "loss_mask": loss, "attention_mask": attn}
