"""The timing rules every benchmark and every peer uses, so their figures mean the same thing."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time

NEW = 128  # new tokens per timed generation
SETTLE_S = 0.05  # pause before each timed run: the previous system's spinning threads go to sleep


def machine() -> dict:
    """What a figure was measured on: the CPU's name and easympt's CPU-kernel instruction set (null: XLA)."""
    from easympt.kernels import cpu

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "cpu_isa": cpu.active_isa()}


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


def in_turns(runs: dict, rounds: int, warmup: int = 1) -> dict[str, list]:
    """Call every run (name -> no-argument callable) in turn, `warmup` rounds and then `rounds` rounds,
    each after a pause of SETTLE_S: name -> the timed rounds' results. Taken in turns, a change in the
    machine's speed during the measurement (this VM's memory bandwidth moves by a third between
    minutes) falls on every run alike instead of on whichever ran then."""
    results: dict[str, list] = {name: [] for name in runs}
    for rnd in range(warmup + rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_S)
            out = run()
            if rnd >= warmup:
                results[name].append(out)
    return results


def in_blocks(runs: dict, rounds: int, block: int, before=None) -> dict[str, list]:
    """Work a user repeats back to back (training steps): each run `block + 1` times in a row, the first
    untimed (it pays for taking the machine over), system after system, `rounds` times: name -> the
    timed results. `before(name)` is called before each block (a process can give back memory it keeps
    but no longer uses, so that it does not slow the next system; see easympt.host_memory)."""
    results: dict[str, list] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            if before is not None:
                before(name)
            time.sleep(SETTLE_S)
            run()
            results[name].extend(run() for _ in range(block))
    return results


def timed(run, key: str, n_new: int) -> tuple[float, list]:
    """(seconds, greedy tokens) of one `run(key, n_new)`: how a system times itself, in its own process."""
    t0 = time.perf_counter()
    tokens = run(key, n_new)
    return time.perf_counter() - t0, tokens


def decode_figures(systems: dict, keys: dict[str, tuple[str, ...]], reps: int = 3) -> dict[str, dict]:
    """Decode and first-token figures of several systems, measured in turns.

    systems: name -> `timed_run(key, n_new)` giving (seconds, greedy tokens) for the prompt set `key`
    ("b1", "b8": decode; "long": the 512-token prompt); keys: name -> the decode sets it runs. Every
    measurement (a prompt set and a number of new tokens) is taken from each system in turn
    (`in_turns`: 1 warm-up and `reps` rounds).

    decode tok/s = B * (NEW - 1) / (t(NEW new) - t(1 new)) (prefill and the first token cancel out); step
    growth = the second half's time per step over the first half's (about 1 when the system keeps a KV
    cache, growing when it recomputes the prefix); TTFT = time to one new token after the long prompt.
    """
    times: dict[str, dict] = {name: {} for name in systems}
    tokens: dict[str, dict] = {name: {} for name in systems}
    plan = [(k, n) for k in ("b1", "b8") for n in (NEW, NEW // 2, 1)] + [("long", 1)]
    for key, n in plan:
        runs = {name: functools.partial(run, key, n) for name, run in systems.items()
                if key == "long" or key in keys[name]}
        for name, results in in_turns(runs, reps).items():
            times[name][(key, n)] = [t for t, _ in results]
            if n == NEW:
                tokens[name][key] = results[-1][1]
    out = {}
    for name in systems:
        med = {kn: statistics.median(ts) for kn, ts in times[name].items()}
        fig = {}
        for key in keys[name]:
            t_full, t_half, t_one = med[(key, NEW)], med[(key, NEW // 2)], med[(key, 1)]
            B = len(tokens[name][key])
            fig[f"decode_tok_s_{key}"] = B * (NEW - 1) / (t_full - t_one)
            fig[f"t_{key}_{NEW}_s"] = t_full
            fig[f"step_growth_{key}"] = ((t_full - t_half) / (NEW - NEW // 2)) / ((t_half - t_one) / (NEW // 2 - 1))
            fig[f"spread_{key}"] = (max(times[name][(key, NEW)]) - min(times[name][(key, NEW)])) / t_full
            fig[f"greedy_{key}"] = tokens[name][key]
        fig["ttft_512_s"] = med[("long", 1)]
        out[name] = fig
    return out


def same_tokens(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """'matching/total' greedy tokens, position by position, row by row."""
    same = sum(sum(x == y for x, y in zip(a, t)) for a, t in zip(ours, theirs))
    return f"{same}/{sum(len(t) for t in theirs)}"
