"""The bundled demo model: what it is made of, that transformers agrees with it,
and that `make serve` on it answers over HTTP."""

import json
import os
import signal
import subprocess
import time

import numpy as np

from conftest import free_port, wait_for_health
from easympt.demo import demo_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_model_is_a_small_hf_checkpoint():
    path = demo_checkpoint()
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_info.json"} <= names
    size = sum(os.path.getsize(os.path.join(path, n)) for n in names)
    assert size <= 30 * 2**20, size
    info = json.load(open(os.path.join(path, "training_info.json")))
    assert info["heldout_perplexity"] < 50  # a trained model, not random weights (those are ~vocab size)
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["attn_config"]["alibi"] and config["vocab_size"] == 8192


def test_transformers_gives_the_same_greedy_tokens():
    import torch
    from transformers import MptForCausalLM

    from easympt.generation import Generator

    path = demo_checkpoint()
    gen = Generator.from_pretrained(path, dtype="fp32", max_length=128, max_compile_tokens=16, progress=False)
    prompt = "def read_config(path):\n"
    ours = gen.generate(prompt, max_new_tokens=32, temperature=0).token_ids
    ids = torch.tensor([gen.encode(prompt)])
    model = MptForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                eos_token_id=model.config.eos_token_id, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert ours == theirs[:len(ours)] and len(ours) >= min(len(theirs), 1)


def test_make_serve_answers_over_http():
    import httpx

    port = free_port()
    proc = subprocess.Popen(["make", "serve", f"SERVE_ARGS=--port {port} --max-length 512 --batch-size 2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url, timeout_s=400)
        deadline = time.time() + 120
        r = httpx.post(url + "/instruct", json={"instruction": "What does os.path.join do?", "greedy": True,
                                                "max_new_tokens": 24}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["response"].strip()
        while httpx.get(url + "/gradio_chat/", timeout=30).status_code != 200:  # mounted just after /health
            assert time.time() < deadline and proc.poll() is None, "the Gradio pages did not come up"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_held_out_perplexity_in_the_readme_matches_training_info():
    info = json.load(open(os.path.join(demo_checkpoint(), "training_info.json")))
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert f"{info['heldout_perplexity']:.2f}" in readme
    assert np.isfinite(info["heldout_loss"])
