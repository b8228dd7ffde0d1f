"""Perplexity and bits per byte of text, locally or through a running server's OpenAI API.

Every token of a document is scored once. A document starts after the tokenizer's BOS (else
EOS) token, so its first token is scored too, as lm-evaluation-harness's rolling loglikelihood
does. A document longer than `max_length` is cut into overlapping windows of `max_length` tokens
that start `stride` tokens apart; each window scores only the tokens the previous one did not, so
every token after the first window sees at least `max_length - stride` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from easympt.textfiles import is_jsonl, json_lines, read_text

# windows [n][m_i] -> log-probabilities of tokens 1..m_i-1 of each window, given the tokens before
Scorer = Callable[[list[list[int]]], list[np.ndarray]]


class EvalDataError(ValueError):
    """Evaluation data that cannot be used: names the file and line."""


def read_texts(path: str) -> list[str]:
    """A .txt file is one document; a JSONL file has one {"text": ...} document per line."""
    raw = read_text(path, EvalDataError)
    if not is_jsonl(path):
        return [raw]
    texts = []
    for n, row in json_lines(path, raw, EvalDataError):
        if not isinstance(row.get("text"), str):
            raise EvalDataError(f"{path}:{n}: needs a string 'text' field")
        texts.append(row["text"])
    return texts


def sliding_windows(ids: list[int], max_length: int, stride: int) -> Iterator[tuple[list[int], int]]:
    """(window, n_scored): windows of at most `max_length` tokens, `stride` apart; the last
    n_scored tokens of each are scored, so every token but ids[0] is scored exactly once."""
    if not 0 < stride < max_length:
        raise ValueError(f"stride {stride} must lie in [1, max_length {max_length})")
    scored_to = 1  # ids[0] is context only
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        if end > scored_to:
            yield ids[begin:end], end - scored_to
            scored_to = end
        if end == len(ids):
            return


@dataclass(frozen=True)
class EvalResult:
    documents: int
    tokens: int
    bytes: int
    nll: float  # summed negative log-likelihood, nats

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
                "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def evaluate_texts(texts: list[str], tokenizer, scorer: Scorer, max_length: int, stride: int | None = None,
                   batch_size: int = 8, progress: bool = True) -> EvalResult:
    """Score every token of every text with `scorer`, `batch_size` windows per call."""
    from tqdm.auto import tqdm

    stride = stride or max_length // 2
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a document with")
    windows, n_tokens, n_bytes = [], 0, 0
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
        windows += list(sliding_windows([start] + ids, max_length, stride))
    nll = 0.0
    bar = tqdm(total=n_tokens, desc="scoring", unit="tok", disable=not progress)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        for (window, n_scored), lp in zip(chunk, scorer([w for w, _ in chunk])):
            assert len(lp) == len(window) - 1, (len(lp), len(window))
            nll -= float(np.sum(lp[len(lp) - n_scored:], dtype=np.float64))
            bar.update(n_scored)
    bar.close()
    return EvalResult(len(texts), n_tokens, n_bytes, nll)


def local_scorer(model, params, max_length: int) -> Scorer:
    """Scores windows with the model in this process: one compiled [batch, max_length] shape,
    right-padded (causal attention: padding after a token cannot change its score)."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def next_token_logprobs(params, tokens, mask):
        logits = model(tokens, attention_mask=mask, params=params).logits[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

    batch_shape = {}

    def score(windows: list[list[int]]) -> list[np.ndarray]:
        n = batch_shape.setdefault("n", len(windows))  # keep the first batch's size: one compile
        tokens = np.zeros((max(n, len(windows)), max_length), np.int32)
        mask = np.zeros_like(tokens)
        for r, w in enumerate(windows):
            tokens[r, :len(w)], mask[r, :len(w)] = w, 1
        lp = np.asarray(next_token_logprobs(params, jnp.asarray(tokens), jnp.asarray(mask)))
        return [lp[r, :len(w) - 1] for r, w in enumerate(windows)]

    return score


def server_scorer(url: str, model_name: str | None = None, api_key: str | None = None,
                  timeout_s: float = 600) -> Scorer:
    """Scores windows through a server's /v1/completions (echo, max_tokens 0), as evaluation
    harnesses do: any OpenAI-compatible server that returns prompt log-probabilities works."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers)

    def score(windows: list[list[int]]) -> list[np.ndarray]:
        body = {"prompt": windows, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0}
        if model_name:
            body["model"] = model_name
        r = client.post("/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url}/v1/completions answered {r.status_code}: {r.text[:500]}")
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        return [np.asarray(c["logprobs"]["token_logprobs"][1:], np.float64) for c in choices]

    return score
