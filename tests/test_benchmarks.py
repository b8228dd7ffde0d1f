"""The benchmark peer harness: peers run on the same checkpoint and prompts, timed in turns with
easympt, and their figures and greedy tokens come back to the benchmark. Timings are not checked
here (benchmarks measure speed)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_generate_runs_cached_transformers_on_the_same_checkpoint():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_generate.py"), "--geometry", "tiny",
                        "--formats", "fp32,bf16", "--reps", "1",
                        "--max-compile-tokens", "1024"],  # prompts in one chunk: fewer programs to compile
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    peer = result["transformers"]
    # the same random checkpoint and prompts: greedy tokens agree position by position
    assert peer["greedy_match_b1"] == "128/128" and peer["greedy_match_b8"] == "1024/1024"
    # figures are reported, not judged here: timings belong to benchmarks, not to tests
    assert {"step_growth_b1", "spread_b1", "ratio_decode_b1", "ratio_decode_b8", "ratio_ttft", "threads"} <= set(peer)
    assert "greedy_b1" not in result["easympt"]  # token lists are compared, not printed
    half = result["easympt_bf16"]  # the same weights as bf16 under float32 compute, timed in turns too
    assert {"decode_tok_s_b1", "decode_tok_s_b8", "ttft_512_s", "greedy_match_fp32_b1"} <= set(half)
    assert "cpu" in result and "cpu_isa" in result  # figures name the CPU and instruction set


def test_systems_are_timed_in_turns_and_figures_follow_the_definitions(monkeypatch):
    sys.path.insert(0, BENCH)
    try:
        import timing
    finally:
        sys.path.remove(BENCH)
    monkeypatch.setattr(timing, "SETTLE_S", 0.0)
    calls = []

    def system(name, step_s, batch):
        def run(key, n_new):  # a fake system: 0.5 s to the first token, then step_s per token
            calls.append((name, key, n_new))
            B = batch if key == "b8" else 1
            return 0.5 + step_s * (n_new - 1), [[7] * n_new] * B
        return run

    figs = timing.decode_figures({"fast": system("fast", 0.01, 8), "slow": system("slow", 0.04, 8)},
                                 {"fast": ("b1", "b8"), "slow": ("b1",)}, reps=3)
    # every measurement goes round the systems before the next round starts
    assert calls[:4] == [("fast", "b1", 128), ("slow", "b1", 128), ("fast", "b1", 128), ("slow", "b1", 128)]
    assert [c for c in calls if c[0] == "slow" and c[1] == "b8"] == []  # a set a system does not run
    assert abs(figs["fast"]["decode_tok_s_b1"] - 100.0) < 1e-6 and abs(figs["slow"]["decode_tok_s_b1"] - 25.0) < 1e-6
    assert abs(figs["fast"]["decode_tok_s_b8"] - 800.0) < 1e-6
    assert abs(figs["fast"]["step_growth_b1"] - 1.0) < 1e-6 and figs["fast"]["spread_b1"] == 0.0
    assert figs["slow"]["ttft_512_s"] == 0.5 and "decode_tok_s_b8" not in figs["slow"]
    assert figs["fast"]["greedy_b8"] == [[7] * 128] * 8


def test_llama_cpp_peer_says_why_it_is_skipped(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"b1": [[1, 2, 3]], "long": [[1, 2, 3]]}))
    r = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "llama-cpp", str(tmp_path), "--prompts",
                        str(prompts), "--llama-cpp-src", str(tmp_path / "no-such-source")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "skipped" in last_json(r.stdout)


def test_a_failing_peer_is_an_error_that_shows_its_stderr(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        from peers import Peer
    finally:
        sys.path.remove(BENCH)
    with pytest.raises(RuntimeError, match="transformers-train failed"):
        Peer("transformers-train", str(tmp_path / "missing-checkpoint"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"b1": [[1, 2, 3]], "b8": [[1, 2, 3]] * 8, "long": [[1, 2, 3]]}))
    with pytest.raises(RuntimeError, match="transformers-generate failed(.|\n)*missing-checkpoint"):
        Peer("transformers-generate", str(tmp_path / "missing-checkpoint"), "--prompts", str(prompts))


def test_bench_train_runs_the_pytorch_loop_on_the_exported_weights():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--geometry", "tiny", "--batch", "2",
                        "--seq-len", "32", "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    assert result["transformers"]["tokens_per_s"] > 0 and result["ratio_tokens_per_s"] > 0
    assert result["transformers"]["threads"] >= 1
