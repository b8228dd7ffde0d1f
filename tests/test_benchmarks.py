"""The benchmark peer harness: peers run on the same checkpoint and prompts, their figures and
greedy tokens come back to the benchmark. Timings are not checked here (benchmarks measure speed)."""

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_generate_runs_cached_transformers_on_the_same_checkpoint():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_generate.py"), "--geometry", "tiny"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    peer = result["transformers"]
    # the same random checkpoint and prompts: greedy tokens agree position by position
    assert peer["greedy_match_b1"] == "128/128" and peer["greedy_match_b8"] == "1024/1024"
    # figures are reported, not judged here: timings belong to benchmarks, not to tests
    assert {"step_growth_b1", "ratio_decode_b1", "ratio_decode_b8", "ratio_ttft", "threads"} <= set(peer)
    assert "greedy_b1" not in result["easympt"]  # token lists are compared, not printed


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
        from peers import run_peer
    finally:
        sys.path.remove(BENCH)
    with pytest.raises(RuntimeError, match="transformers-train failed"):
        run_peer("transformers-train", str(tmp_path / "missing-checkpoint"), "--steps", "1")


def test_bench_train_runs_the_pytorch_loop_on_the_exported_weights():
    r = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--geometry", "tiny", "--batch", "2",
                        "--seq-len", "32", "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = last_json(r.stdout)
    assert result["transformers"]["tokens_per_s"] > 0 and result["ratio_tokens_per_s"] > 0
    assert result["transformers"]["threads"] >= 1
