"""`easympt ...` as a user types it."""

import os
import signal
import subprocess
import sys

import httpx

from conftest import free_port, wait_for_health

EASYMPT = [sys.executable, "-m", "easympt.cli"]


def run(*args, timeout=600):
    return subprocess.run(EASYMPT + list(args), capture_output=True, text=True, timeout=timeout)


def test_help_for_every_command():
    for cmd in ("generate", "convert", "serve", "train", "bench"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "usage: easympt " + cmd in r.stdout


def test_bench_runs_the_checkout_benchmark_scripts():
    r = run("bench", "train", "--help")
    assert r.returncode == 0 and "--seq-len" in r.stdout
    assert run("bench", "nope").returncode == 2


def test_generate_without_model_uses_the_demo_model():
    r = run("generate", "def read_lines(path):", "--max-new-tokens", "8", "--max-length", "64",
            "--max-compile-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert "finish_reason" in r.stderr


def test_generate_streams_text(lm_checkpoint):
    r = run("generate", lm_checkpoint, "def f(x):", "--max-new-tokens", "8", "--max-length", "64",
            "--max-compile-tokens", "8", "--temperature", "0", "--kv-dtype", "bf16", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "finish_reason" in r.stderr
    from easympt.kernels import cpu  # --verbose names what runs: the CPU kernels' instruction set, or XLA

    isa = cpu.active_isa()
    assert (f"easympt's CPU kernels ({isa})" if isa else "weight products by XLA") in r.stderr, r.stderr
    r = run("generate", lm_checkpoint, "x", "--kv-dtype", "int2")
    assert r.returncode == 2 and "kv_dtype 'int2'" in r.stderr


def test_bad_model_is_a_clear_error(tmp_path):
    r = run("generate", str(tmp_path / "missing"), "x")
    assert r.returncode == 2 and "not a local directory" in r.stderr


def test_convert_round_trip(lm_checkpoint, tmp_path):
    r = run("convert", lm_checkpoint, str(tmp_path / "out"), "--max-shard-size", "100KB")
    assert r.returncode == 0, r.stderr
    files = os.listdir(tmp_path / "out")
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files


def test_serve_answers_over_http_and_stops_on_ctrl_c(lm_checkpoint):
    """Started the way a script's background job (or a pytest-xdist worker) starts it, with SIGINT
    ignored, the server still stops on Ctrl-C."""
    port = free_port()
    proc = subprocess.Popen(EASYMPT + ["serve", lm_checkpoint, "--port", str(port), "--max-length", "128",
                                       "--max-compile-tokens", "16", "--max-new-tokens", "16", "--no-gradio"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(proc, url)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(30)
