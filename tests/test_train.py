"""Trainer: overfitting, exact resume, prompt masking, packing, bad data."""

import json

import jax
import numpy as np
import pytest

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.training import DataError, TrainConfig, Trainer, pack, read_examples, tokenize

TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 3}" for i in range(24))


def _setup(tmp_path, tokenizer, **tc):
    cfg = MptConfig.preset("tiny", vocab_size=len(tokenizer), max_seq_len=64,
                           attn_config={"attn_uses_sequence_id": True})
    model = FlaxMptForCausalLM(cfg, dtype="fp32", seed=0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "data.txt").write_text(TEXT)
    rows = pack(tokenize(read_examples(str(tmp_path / "data.txt")), tokenizer, 64, tokenizer.eos_token_id), 64)
    tc = TrainConfig(**{"output_dir": str(tmp_path / "run"), "seq_len": 64, "batch_size": 2, "learning_rate": 3e-3,
                        "warmup_steps": 2, "max_steps": 8, "save_every": 3, **tc})
    return model, rows, tc


def test_tiny_model_overfits(tmp_path, tokenizer):
    model, rows, tc = _setup(tmp_path, tokenizer, max_steps=40, save_every=100)
    losses = Trainer(model, model.params, rows, tc).train()
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:2]), losses


def test_resume_continues_the_same_loss_curve(tmp_path, tokenizer):
    model, rows, tc = _setup(tmp_path / "a", tokenizer)
    full = Trainer(model, model.params, rows, tc).train()
    _, _, tc_b = _setup(tmp_path / "b", tokenizer)
    first = Trainer(model, model.params, rows, tc_b).train(stop_at=4)  # "killed" after step 4; last save at 3
    resumed = Trainer(model, model.params, rows, tc_b)
    assert resumed.restore_latest() and resumed.step == 3
    rest = resumed.train()
    np.testing.assert_allclose(first[:3] + rest, full, rtol=1e-6, atol=1e-6)


def test_packing_and_prompt_masking(tokenizer, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "Q: two", "response": " A: 2"}) + "\n"
                                      + json.dumps({"text": "hello world"}) + "\n")
    ex = tokenize(read_examples(str(tmp_path / "d.jsonl")), tokenizer, 64, tokenizer.eos_token_id)
    n_prompt = len(tokenizer.encode("Q: two", add_special_tokens=False))
    assert ex[0].loss[:n_prompt] == [0] * n_prompt and all(ex[0].loss[n_prompt:])
    rows = pack(ex, 64)
    assert rows["input_ids"].shape == (1, 64)
    k0, k1 = len(ex[0].tokens), len(ex[1].tokens)
    assert list(rows["sequence_id"][0, :k0 + k1]) == [0] * k0 + [1] * k1
    assert rows["loss_mask"][0, :n_prompt].sum() == 0 and rows["loss_mask"][0, k0] == 0  # next doc's first token
    assert rows["attention_mask"][0, k0 + k1:].sum() == 0


def test_prompt_tokens_contribute_no_loss(tmp_path, tokenizer):
    """The loss is the mean cross-entropy over unmasked targets only, computed here by hand."""
    model, rows, _ = _setup(tmp_path, tokenizer)
    batch = {k: v[:1] for k, v in rows.items()}
    batch["loss_mask"] = batch["loss_mask"].copy()
    batch["loss_mask"][0, :20] = 0  # a 20-token "prompt"
    logits = np.asarray(model(batch["input_ids"], batch["attention_mask"], params=model.params,
                              sequence_id=batch["sequence_id"]).logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(logp[0, :-1], batch["input_ids"][0, 1:, None], -1)[:, 0]
    w = batch["loss_mask"][0, 1:]
    expected = (ce * w).sum() / w.sum()
    got = float(model.loss(model.params, batch, jax.random.PRNGKey(0), True))
    assert abs(got - expected) < 1e-4 * expected
    assert abs(got - ce[w > 0].mean()) < 1e-4 * expected and abs(ce.mean() - expected) > 1e-3


@pytest.mark.parametrize("content, match", [("", "empty file"), ('{"text": "a"}\n{broken\n', ":2: not a JSON line"),
                                            ('{"title": "x"}\n', "needs a 'text' field")])
def test_bad_data_is_a_clear_error(tmp_path, content, match):
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(DataError, match=match):
        read_examples(str(tmp_path / "d.jsonl"))


def test_too_long_documents_are_skipped_or_refused(tokenizer, caplog):
    with pytest.raises(DataError, match="no document fits"):
        tokenize([("", "x " * 200)], tokenizer, 16, None)
    ex = tokenize([("", "x " * 200), ("", "short")], tokenizer, 16, None)
    assert len(ex) == 1 and "skipped 1 of 2" in caplog.text


def test_cli_train_resume_and_export(tmp_path, lm_checkpoint, tokens):
    """`easympt train` end to end: metrics, loss plot, a second call resumes, the export runs in transformers."""
    import os
    import subprocess
    import sys

    from conftest import assert_logits_close, hf_logits
    from easympt.checkpoint import load_params

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"prompt": f"Q{i}:", "response": f" def g{i}(): pass"})
                                                for i in range(30)))
    (tmp_path / "t.yaml").write_text("seq_len: 48\nbatch_size: 2\nlearning_rate: 0.001\nwarmup_steps: 1\n")
    cmd = [sys.executable, "-m", "easympt.cli", "train", lm_checkpoint, "--config", str(tmp_path / "t.yaml"),
           "--data", str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path / "run"), "--save-every", "2",
           "--export", str(tmp_path / "hf")]
    r = subprocess.run(cmd + ["--max-steps", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(cmd + ["--max-steps", "4"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["resumed"] and result["step"] == 4 and np.isfinite(result["eval_loss"])
    log = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in log if "loss" in x] == [1, 2, 3, 4] and any("eval_loss" in x for x in log)
    assert os.path.getsize(tmp_path / "run" / "loss.png") > 1000
    params, config = load_params(str(tmp_path / "run" / "checkpoints" / "4"), dtype="fp32")
    ids, mask = tokens
    ids = ids % config.vocab_size
    got = np.asarray(FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)(ids, mask, params=params).logits)
    assert_logits_close(got, hf_logits(str(tmp_path / "hf"), ids, mask), mask=mask)
    r = subprocess.run(cmd[:5] + ["--data", str(tmp_path / "missing.txt"), "--output-dir", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_fsdp8_step_equals_one_device_step():
    import os
    import subprocess
    import sys

    here = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(here, "multidevice", "train_step.py")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout.split("REPORT ", 1)[1])
    assert rep["shard"][0] * 8 == rep["global"][0]  # Wqkv's input dim really is split over fsdp
    np.testing.assert_allclose(rep["loss_eight"], rep["loss_one"], rtol=1e-5)
    assert rep["max_param_diff"] < 1e-5


def test_remat_gives_the_same_loss_and_gradients(tokenizer, tmp_path):
    model, rows, _ = _setup(tmp_path, tokenizer)
    remat = FlaxMptForCausalLM(model.config, dtype="fp32", _do_init=False, remat=True)
    batch = {k: v[:2] for k, v in rows.items()}
    key = jax.random.PRNGKey(0)
    la, ga = jax.value_and_grad(lambda p: model.loss(p, batch, key, True))(model.params)
    lb, gb = jax.value_and_grad(lambda p: remat.loss(p, batch, key, True))(model.params)
    assert abs(float(la) - float(lb)) < 1e-6
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    # the backward pass recomputes each block's forward: more matrix products than without remat
    dots = [str(jax.make_jaxpr(jax.grad(lambda p: m.loss(p, batch, key, True)))(model.params)).count("dot_general")
            for m in (model, remat)]
    assert dots[1] > dots[0], dots
