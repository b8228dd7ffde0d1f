"""The timing rules every benchmark and every peer uses, so their figures mean the same thing."""

from __future__ import annotations

import statistics
import time

NEW = 128  # new tokens per timed generation


def median_time(fn, reps=3, warmup=1):
    """Warm-up runs, then the median of `reps` timed runs (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_figures(run, prompts: dict, long_prompt, reps: int = 3) -> dict:
    """Decode and first-token figures of one system; `run(prompts, n_new)` returns its greedy tokens.

    prompts: {"b1": [[ids]], "b8": [[ids] x 8], ...}. decode tok/s = B * (NEW - 1) / (t(NEW new) - t(1 new))
    (prefill and the first token cancel out); step growth = the second half's time per step over the
    first half's (about 1 when the system keeps a KV cache, growing when it recomputes the prefix);
    TTFT = time to one new token after `long_prompt`.
    """
    out = {}
    for name, rows in prompts.items():
        t_full = median_time(lambda: run(rows, NEW), reps)
        t_half = median_time(lambda: run(rows, NEW // 2), reps)
        t_one = median_time(lambda: run(rows, 1), reps)
        out[f"decode_tok_s_{name}"] = len(rows) * (NEW - 1) / (t_full - t_one)
        out[f"t_{name}_{NEW}_s"] = t_full
        out[f"step_growth_{name}"] = ((t_full - t_half) / (NEW - NEW // 2)) / ((t_half - t_one) / (NEW // 2 - 1))
        out[f"greedy_{name}"] = run(rows, NEW)
    out["ttft_512_s"] = median_time(lambda: run(long_prompt, 1), reps)
    return out


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'matching/total' greedy tokens, position by position, row by row."""
    same = sum(sum(x == y for x, y in zip(a, t)) for a, t in zip(ours, theirs))
    return f"{same}/{sum(len(t) for t in theirs)}"
