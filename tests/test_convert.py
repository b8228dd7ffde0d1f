"""mpt_from_pretrained / mpt_to_pretrained: formats, dtypes, errors, round trip, hub cache."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_logits_close, full_config, hf_logits, make_hf_checkpoint, random_state_dict, write_checkpoint
from easympt import FlaxMptForCausalLM
from easympt.transform import mpt_from_pretrained, mpt_to_pretrained
from easympt.transform.hf_to_flax import CheckpointError

CFG = full_config()
SD = random_state_dict(CFG, seed=7)


def _leaves(params):
    from easympt.sharding import path_str
    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("fmt, torch_dtype, n_shards", [
    ("safetensors", "float32", 1), ("safetensors", "float32", 3), ("safetensors", "bfloat16", 1),
    ("bin", "float32", 1), ("bin", "float16", 2), ("bin", "bfloat16", 3),
])
def test_formats_and_dtypes(tmp_path, fmt, torch_dtype, n_shards):
    path = write_checkpoint(tmp_path / "c", CFG, SD, fmt=fmt, torch_dtype=torch_dtype, n_shards=n_shards)
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    got = _leaves(params)
    assert got["transformer/blocks_0/attn/Wqkv/kernel"].shape == (64, 192)
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[torch_dtype]
    np.testing.assert_allclose(got["transformer/blocks_1/ffn/up_proj/kernel"],
                               SD["transformer.blocks.1.ffn.up_proj.weight"].T, atol=tol * 2, rtol=tol)
    assert all(x.dtype == np.float32 for x in got.values())  # CPU default


def test_target_dtype_and_device(tmp_path):
    path = write_checkpoint(tmp_path / "c", CFG, SD)
    cpu = jax.devices("cpu")[0]
    params, _ = mpt_from_pretrained(path, dtype=jnp.bfloat16, device=cpu, progress=False)
    for x in jax.tree_util.tree_leaves(params):
        assert x.dtype == jnp.bfloat16 and x.devices() == {cpu}
    params, _ = mpt_from_pretrained(path, dtype="fp16", progress=False)
    assert all(x.dtype == jnp.float16 for x in jax.tree_util.tree_leaves(params))


def test_errors_list_every_bad_tensor(tmp_path):
    sd = dict(SD)
    del sd["transformer.blocks.0.norm_2.weight"]
    del sd["transformer.norm_f.weight"]
    sd["transformer.blocks.0.attn.rotary.weight"] = np.zeros(3, np.float32)
    sd["transformer.blocks.1.ffn.up_proj.weight"] = np.zeros((255, 64), np.float32)
    path = write_checkpoint(tmp_path / "bad", CFG, sd)
    with pytest.raises(CheckpointError) as err:
        mpt_from_pretrained(path, progress=False)
    msg = str(err.value)
    for needle in ("transformer/blocks_0/norm_2/scale", "transformer/norm_f/scale",
                   "transformer.blocks.0.attn.rotary.weight", "transformer.blocks.1.ffn.up_proj.weight: (255, 64)"):
        assert needle in msg


def test_corrupt_and_truncated_files_are_named(tmp_path):
    path = write_checkpoint(tmp_path / "c", CFG, SD)
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mpt_from_pretrained(path, progress=False)
    open(f, "wb").write(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mpt_from_pretrained(path, progress=False)
    path = write_checkpoint(tmp_path / "b", CFG, SD, fmt="bin")
    open(os.path.join(path, "pytorch_model.bin"), "wb").write(b"not a pickle")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        mpt_from_pretrained(path, progress=False)


def test_missing_weights_and_shards(tmp_path):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CFG))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        mpt_from_pretrained(str(tmp_path / "empty"), progress=False)
    path = write_checkpoint(tmp_path / "s", CFG, SD, n_shards=2)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        mpt_from_pretrained(path, progress=False)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        mpt_from_pretrained(str(tmp_path / "nope" / "x"), progress=False, local_files_only=True)


def test_round_trip_hf_easympt_hf(tmp_path, tokens):
    src = make_hf_checkpoint(tmp_path / "src", tie_word_embeddings=False)
    params, config = mpt_from_pretrained(src, dtype="fp32", progress=False)
    out = mpt_to_pretrained(params, config, str(tmp_path / "out"), max_shard_size="40KB")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    from safetensors.numpy import load_file
    orig = load_file(os.path.join(src, "model.safetensors"))
    back = {}
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            back.update(load_file(os.path.join(out, f)))
    assert set(back) == set(orig)
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k])
    ids, mask = tokens
    assert_logits_close(hf_logits(out, ids, mask), hf_logits(src, ids, mask), mask=mask, rtol_scale=1e-6)
    assert not [d for d in os.listdir(tmp_path) if ".partial-" in d]


def test_interrupted_export_leaves_nothing_complete(tmp_path, monkeypatch):
    params, config = mpt_from_pretrained(write_checkpoint(tmp_path / "c", CFG, SD), progress=False)
    import safetensors.numpy

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        mpt_to_pretrained(params, config, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert os.listdir(tmp_path) == ["c"]


def test_resolves_hub_id_from_local_cache(tmp_path, monkeypatch):
    """A hub id is found in a Hugging Face cache laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    snap = cache / "models--acme--mpt-mini" / "snapshots" / ("a" * 40)
    write_checkpoint(snap, CFG, SD)
    (cache / "models--acme--mpt-mini" / "refs").mkdir(parents=True)
    (cache / "models--acme--mpt-mini" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    params, config = mpt_from_pretrained("acme/mpt-mini", progress=False)
    assert config.d_model == 64
    with pytest.raises(FileNotFoundError, match="acme/other"):
        mpt_from_pretrained("acme/other", progress=False)


def test_forward_after_conversion_is_deterministic(tmp_path, tokens):
    params, config = mpt_from_pretrained(write_checkpoint(tmp_path / "c", CFG, SD), dtype="fp32", progress=False)
    model = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)
    ids, mask = tokens
    a = model(ids, mask, params=params).logits
    b = model(ids, mask, params={"params": params}).logits  # the wrapped form is accepted too
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_easympt_checkpoint_round_trip_and_dtype(tmp_path):
    from easympt.checkpoint import is_easympt_checkpoint, load_params, save_params

    params, config = mpt_from_pretrained(write_checkpoint(tmp_path / "c", CFG, SD), progress=False)
    save_params(params, config, str(tmp_path / "e"))
    assert is_easympt_checkpoint(str(tmp_path / "e"))
    back, config2 = load_params(str(tmp_path / "e"), dtype="fp32")
    assert config2.to_dict() == config.to_dict()
    a, b = _leaves(params), _leaves(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    half, _ = load_params(str(tmp_path / "e"), dtype="bf16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(half))


def test_interrupted_easympt_save_is_not_a_checkpoint(tmp_path):
    from easympt.checkpoint import is_easympt_checkpoint, load_params

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(CFG))
    (tmp_path / "e" / "params.orbax-checkpoint-tmp-1").mkdir()  # what orbax leaves when killed mid-save
    assert not is_easympt_checkpoint(str(tmp_path / "e"))
    with pytest.raises(FileNotFoundError, match="not an easympt checkpoint"):
        load_params(str(tmp_path / "e"))


def test_cli_convert_both_directions(tmp_path, tokens):
    """HF (.bin shards) -> easympt -> HF safetensors: same tensors, same logits in transformers."""
    import subprocess
    import sys

    src = write_checkpoint(tmp_path / "src", CFG, SD, fmt="bin", n_shards=2)
    cli = [sys.executable, "-m", "easympt.cli", "convert"]
    r = subprocess.run(cli + [src, str(tmp_path / "m.easympt")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote easympt checkpoint" in r.stdout
    r = subprocess.run(cli + [str(tmp_path / "m.easympt"), str(tmp_path / "hf")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote hf checkpoint" in r.stdout
    ids, mask = tokens
    assert_logits_close(hf_logits(str(tmp_path / "hf"), ids, mask), hf_logits(src, ids, mask), mask=mask,
                        rtol_scale=1e-6)
