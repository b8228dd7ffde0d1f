"""One model across two JAX processes (4 CPU devices each, joined by jax.distributed on localhost),
as two hosts of a pod slice would run it: sharded loading, export, orbax checkpoints, training
with resume, and serving with process 0 answering HTTP."""

import json
import os
import signal
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import (assert_logits_close, finish_processes, free_port, full_config, launch_processes,
                      random_state_dict, report_of, wait_for_health, write_checkpoint)

HERE = os.path.dirname(os.path.abspath(__file__))
EASYMPT = [sys.executable, "-m", "easympt.cli"]


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_sharded_load_export_and_checkpoint_across_two_processes(tmp_path):
    """Each process reads only its slices (peak RSS growth well under the weights), the sharded model's
    logits equal one process's, the export equals a one-process export and orbax round-trips."""
    import jax

    from easympt import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained, mpt_to_pretrained

    cfg = full_config(d_model=768, n_heads=12, n_layers=8, vocab_size=8192, max_seq_len=64)
    sd = random_state_dict(cfg, std=0.05)
    src = write_checkpoint(tmp_path / "src", cfg, sd)
    weight_bytes = sum(v.nbytes for v in sd.values())
    del sd
    tiny = full_config(d_model=768, n_heads=12, n_layers=1, vocab_size=8192, max_seq_len=64)
    warm = write_checkpoint(tmp_path / "warm", tiny, random_state_dict(tiny))
    out = tmp_path / "out"
    outs = finish_processes(launch_processes([sys.executable, os.path.join(HERE, "multidevice", "two_process_load.py"),
                                              src, str(out), warm]))
    reports = [report_of(o) for o in outs]
    for r in reports:
        assert r["local_param_bytes"] < 0.6 * weight_bytes, r
        assert r["peak_growth"] <= 0.65 * weight_bytes, (r, weight_bytes)
        assert r["restored_equal"] and r["export_exists"], r

    params, config = mpt_from_pretrained(src, device=jax.devices()[0], progress=False)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (8, 16))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ref = np.asarray(FlaxMptForCausalLM(config, _do_init=False)(ids, mask, params=params).logits)
    assert_logits_close(np.load(out / "logits.npy"), ref, mask)

    one = mpt_to_pretrained(params, config, str(tmp_path / "one"))
    assert sorted(os.listdir(one)) == sorted(os.listdir(out / "export"))
    with open(os.path.join(one, "config.json")) as a, open(out / "export" / "config.json") as b:
        assert json.load(a) == json.load(b)
    mine, theirs = _tensors(one), _tensors(out / "export")
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert np.array_equal(mine[k], theirs[k]), k


SERVE = ["serve", "--no-gradio", "--batch-size", "4", "--max-length", "256", "--max-compile-tokens", "32",
         "--max-new-tokens", "16"]


def _serve_on_two_processes(checkpoint, tmp_path, *flags):
    port = free_port()
    procs = launch_processes(EASYMPT + SERVE + [checkpoint, "--port", str(port), *flags], log_dir=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        for i, p in enumerate(procs):
            assert p.poll() is None, (tmp_path / f"process-{i}.log").read_text()[-4000:]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return procs, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the two-process server did not come up in 300 s"
        time.sleep(0.5)


def _stream_text(url, body) -> str:
    parts = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(parts)


def test_serving_across_two_processes(lm_checkpoint, server, tmp_path):
    """Process 0 answers HTTP with the same greedy text as one process, streams it, and Ctrl-C on
    process 0 ends both."""
    procs, url = _serve_on_two_processes(lm_checkpoint, tmp_path)
    try:
        assert httpx.get(url + "/status").json()["processes"] == 2
        body = {"prompt": "def main(args):", "max_tokens": 12, "temperature": 0}
        want = httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        burst = [httpx.post(url + "/v1/completions", json=b, timeout=120) for b in
                 (body, {**body, "prompt": "import os"}, body)]
        assert all(r.status_code == 200 for r in burst), burst[0].text
        assert burst[0].json()["choices"][0]["text"] == want == burst[2].json()["choices"][0]["text"]
        assert _stream_text(url, body) == want
        # a chat's next turn: the second process follows the leader's prefix cache hits too
        turn = {**body, "prompt": "def main(args):\n    for name in args:\n        print(name, len(name))\n" * 3}
        want = httpx.post(server.url + "/v1/completions", json=turn, timeout=120).json()["choices"][0]["text"]
        again = {**turn, "prompt": turn["prompt"] + want + "\nmain([])"}
        want2 = httpx.post(server.url + "/v1/completions", json=again, timeout=120).json()["choices"][0]["text"]
        assert [httpx.post(url + "/v1/completions", json=b, timeout=120).json()["choices"][0]["text"]
                for b in (turn, again)] == [want, want2]
        metrics = httpx.get(url + "/metrics").text
        assert "easympt_prefix_cache_hits_total 0.0" not in metrics and "easympt_prefix_cache_hits_total" in metrics
        procs[0].send_signal(signal.SIGINT)
        for p in procs:
            p.wait(60)
        logs = [(tmp_path / f"process-{i}.log").read_text() for i in range(2)]
        assert [p.returncode for p in procs] == [0, 0], logs[1][-3000:]
        assert "following process 0" in logs[1] and "the leader stopped serving" in logs[1]
    finally:
        for p in procs:
            p.kill()


def test_a_lost_follower_makes_the_server_unavailable(lm_checkpoint, tmp_path):
    """Killing process 1 turns /health to 503 within seconds and requests get a 503 naming why; never a hang."""
    procs, url = _serve_on_two_processes(lm_checkpoint, tmp_path, "--no-precompile")  # it serves nothing
    try:
        procs[1].kill()
        procs[1].wait(10)
        t0 = time.monotonic()
        while httpx.get(url + "/health", timeout=5).status_code == 200:
            assert time.monotonic() - t0 < 10, "/health still ok 10 s after the follower died"
            time.sleep(0.2)
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30)
        assert r.status_code == 503 and "follower" in r.json()["error"]["message"]
    finally:
        for p in procs:
            p.kill()


def test_training_across_two_processes_equals_one_device_and_resumes(tmp_path):
    """Each process feeds its own rows of every batch; the losses equal one device's with the same global
    batches, orbax checkpoints are written by both, and a stopped run resumes on the same curve."""
    script = [sys.executable, os.path.join(HERE, "multidevice", "two_process_train.py")]
    two = report_of(finish_processes(launch_processes(script + [str(tmp_path / "two")]))[0])
    one = report_of(finish_processes(launch_processes(script + [str(tmp_path / "one")], n=1, devices_each=1))[0])
    assert two["sharded"] and not one["sharded"]
    np.testing.assert_allclose(two["whole"], one["whole"], rtol=2e-5)
    assert two["restored"] and two["resumed_at"] == 2
    np.testing.assert_allclose(two["first"][:2] + two["rest"], two["whole"], rtol=2e-5)
    assert two["eval"] == pytest.approx(one["eval"], rel=2e-5)


def test_train_and_convert_commands_across_two_processes(lm_checkpoint, tmp_path):
    """`easympt train` and `easympt convert` given the same flags on two processes: the loss curve and the
    export equal a one-process run's; the orbax checkpoint both wrote holds the same weights."""
    from easympt.checkpoint import load_params
    from easympt.training.run import run_training
    from easympt.training.trainer import TrainConfig

    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(60)))
    settings = dict(seq_len=32, batch_size=8, max_steps=2, save_every=2, learning_rate=1e-3, warmup_steps=1)
    flags = [f for k, v in settings.items() for f in ("--" + k.replace("_", "-"), str(v))]
    finish_processes(launch_processes(EASYMPT + ["train", lm_checkpoint, "--data", str(data), *flags, "--output-dir",
                                                 str(tmp_path / "two"), "--export", str(tmp_path / "two-export")]))
    run_training(lm_checkpoint, str(data), TrainConfig(output_dir=str(tmp_path / "one"), **settings),
                 export_dir=str(tmp_path / "one-export"), progress=False)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    np.testing.assert_allclose(losses("two"), losses("one"), rtol=2e-5)
    two, one = _tensors(tmp_path / "two-export"), _tensors(tmp_path / "one-export")
    assert two.keys() == one.keys()
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)

    finish_processes(launch_processes(EASYMPT + ["convert", str(tmp_path / "two-export"), str(tmp_path / "ck.easympt")]))
    from easympt.transform import mpt_from_pretrained

    restored, _ = load_params(str(tmp_path / "ck.easympt"))
    exported, _ = mpt_from_pretrained(str(tmp_path / "two-export"), progress=False)
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(exported)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
