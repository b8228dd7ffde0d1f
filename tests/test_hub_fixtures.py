"""Checkpoints as MosaicML published them: verbatim hub files (tests/fixtures/hub), full-size
shapes and meshes built abstractly, shrunken copies in MosaicML's layout end to end."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_logits_close, free_port, mosaicml_tensor_shapes, write_checkpoint
from reference_mpt import forward as reference_forward

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.config import ConfigError
from easympt.plan import memory_plan
from easympt.sharding import MeshFitError, path_str
from easympt.transform import mpt_from_pretrained
from easympt.transform.names import hf_to_flax_name

HUB = os.path.join(os.path.dirname(__file__), "fixtures", "hub")
REPOS = sorted(os.path.relpath(os.path.dirname(p), HUB) for p in glob.glob(os.path.join(HUB, "*", "*", "config.json")))
# geometries whose hub files are not reachable here (see fixtures/hub/README.md): presets stand in
PRESETS = ("mpt-7b", "mpt-7b-8k", "mpt-7b-storywriter", "mpt-30b")
# how each repo is prompted: the template its model card documents
TEMPLATES = {"mosaicml/mpt-7b-instruct": "instruct", "replit/replit-code-v1-3b": "completion",
             "mosaicml/mpt-7b": "completion", "mosaicml/mpt-30b": "completion",
             "replit/replit-code-v1_5-3b": "completion"}
# the four mesh sizes the issue names, as (dp, fsdp, tp, sp)
MESHES = {8: (1, 8, 1, 1), 16: (1, 8, 2, 1), 64: (2, 8, 4, 1), 256: (1, 32, 8, 1)}


def raw_config(repo: str) -> dict:
    with open(os.path.join(HUB, repo, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)


def config_for(name: str) -> tuple[dict, MptConfig]:
    """(config.json dict, MptConfig) of a fixture repo or a preset."""
    if name in PRESETS:
        config = MptConfig.preset(name)
        return config.to_dict(), config
    return raw_config(name), MptConfig.from_pretrained(os.path.join(HUB, name))


def test_fixtures_are_present_and_documented():
    assert {"mosaicml/mpt-7b-instruct", "replit/replit-code-v1-3b", "mosaicml/mpt-7b", "mosaicml/mpt-30b",
            "replit/replit-code-v1_5-3b"} <= set(REPOS)
    readme = open(os.path.join(HUB, "README.md"), encoding="utf-8").read()
    for repo in REPOS:
        assert f"`{repo}/`" in readme, f"{repo} has no provenance line in fixtures/hub/README.md"
        assert set(TEMPLATES) >= {repo}, f"{repo}: say which template it is served with"


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("repo", REPOS)
def test_config_reads_verbatim(repo):
    raw = raw_config(repo)
    config = MptConfig.from_pretrained(os.path.join(HUB, repo))
    assert raw["architectures"] == ["MPTForCausalLM"]  # MosaicML's spelling, as published
    assert config.architecture == "MptForCausalLM"
    for key in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size", "expansion_ratio"):
        assert getattr(config, key) == raw[key]
    assert config.attn_config.alibi == raw["attn_config"]["alibi"]
    assert config.eos_token_id == raw.get("eos_token_id")
    with pytest.raises(ConfigError, match="unknown config field.*not_an_mpt_field"):
        MptConfig.from_dict({**raw, "not_an_mpt_field": 1})
    with pytest.raises(ConfigError, match="unknown attn_config field.*flash_rotary"):
        MptConfig.from_dict({**raw, "attn_config": {**raw["attn_config"], "flash_rotary": True}})


def test_no_op_keys_are_listed_in_the_readme():
    """Every key a real config.json carries that changes nothing is named in the README."""
    from easympt.config import NO_OP_KEYS

    readme = open(os.path.join(os.path.dirname(HUB), "..", "..", "README.md"), encoding="utf-8").read()
    section = readme.split("Keys read and ignored", 1)[1].split("\n\n", 1)[0]
    for key in NO_OP_KEYS:
        assert f"`{key}`" in section, key
    seen = set()
    for repo in REPOS:
        raw = raw_config(repo)
        seen |= {k for k in raw if k not in {f.name for f in dataclasses.fields(MptConfig)}}
        seen |= set(raw["attn_config"]) - {f.name for f in dataclasses.fields(type(MptConfig().attn_config))}
    # architectures is read; a top-level fc_type (replit-code-v1_5-3b) is checked: only "torch" loads
    assert seen - {"architectures", "fc_type"} <= set(NO_OP_KEYS), seen - set(NO_OP_KEYS)


@pytest.mark.parametrize("spelling", ["MPTForCausalLM", "MptForCausalLM", None])
def test_every_causal_lm_spelling_loads(spelling):
    raw = {k: v for k, v in raw_config("mosaicml/mpt-7b-instruct").items() if k != "architectures"}
    if spelling:
        raw["architectures"] = [spelling]
    assert MptConfig.from_dict(raw).architecture == "MptForCausalLM"


def test_another_model_is_refused_by_name(tmp_path):
    raw = raw_config("mosaicml/mpt-7b-instruct")
    with pytest.raises(ConfigError, match="'LlamaForCausalLM'.* is not an MPT model"):
        MptConfig.from_dict({**raw, "architectures": ["LlamaForCausalLM"]})
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not 'mpt'"):
        MptConfig.from_pretrained(str(tmp_path))


# ------------------------------------------------------- full-size, abstractly
def _flax_shapes(config: MptConfig) -> dict[str, tuple]:
    shapes = FlaxMptForCausalLM(config, _do_init=False).params_shape()  # jax.eval_shape: nothing allocated
    return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}


def _as_flax(hf_shapes: dict[str, tuple], config: MptConfig) -> dict[str, tuple]:
    out = {}
    for name, shape in hf_shapes.items():
        flax_name, transpose = hf_to_flax_name(name)
        out[flax_name] = shape[::-1] if transpose else shape
    return out


@pytest.mark.parametrize("name", REPOS + list(PRESETS))
def test_full_size_tree_equals_mosaicml_state_dict(name):
    raw, config = config_for(name)
    assert _flax_shapes(config) == _as_flax(mosaicml_tensor_shapes(raw), config)


def test_full_size_names_equal_the_published_index():
    """mpt-7b-instruct's own pytorch_model.bin.index.json lists exactly the tensors expected."""
    repo = os.path.join(HUB, "mosaicml", "mpt-7b-instruct")
    with open(os.path.join(repo, "pytorch_model.bin.index.json"), encoding="utf-8") as fh:
        index = json.load(fh)
    raw = raw_config("mosaicml/mpt-7b-instruct")
    shapes = mosaicml_tensor_shapes(raw)
    assert set(index["weight_map"]) == set(shapes)
    assert "transformer.wpe.weight" not in shapes  # learned_pos_emb and alibi both true: ALiBi, no wpe
    # the index's byte count is the bf16 size of exactly these tensors
    assert index["metadata"]["total_size"] == 2 * sum(int(np.prod(s)) for s in shapes.values())
    config = MptConfig.from_pretrained(repo)
    assert memory_plan(config, dtype="bf16").param_bytes == index["metadata"]["total_size"]


def test_wpe_exists_only_without_alibi():
    raw = raw_config("mosaicml/mpt-7b-instruct")
    no_alibi = {**raw, "attn_config": {**raw["attn_config"], "alibi": False}}
    config = MptConfig.from_dict(no_alibi)
    assert "transformer/wpe/embedding" in _flax_shapes(config)
    assert _flax_shapes(config) == _as_flax(mosaicml_tensor_shapes(no_alibi), config)


@pytest.mark.parametrize("n_devices", sorted(MESHES))
@pytest.mark.parametrize("name", REPOS + list(PRESETS))
def test_rules_shard_every_full_size_tensor(name, n_devices):
    """Abstract devices: each tensor's shard shape times its mesh axes gives the whole tensor back."""
    from jax.sharding import AbstractMesh

    from easympt.sharding import MESH_AXES, shardings_for

    _, config = config_for(name)
    mesh = AbstractMesh(MESHES[n_devices], MESH_AXES)
    shapes = FlaxMptForCausalLM(config, _do_init=False).params_shape()
    shardings = shardings_for(mesh, shapes, config.get_partition_rules(), misfit="raise")
    fsdp_tp = MESHES[n_devices][1] * MESHES[n_devices][2]
    device_elements = 0
    for x, s in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(x.shape)
        for dim, part, axes in zip(x.shape, shard, tuple(s.spec) + (None,) * len(x.shape)):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            assert part * int(np.prod([mesh.shape[a] for a in names])) == dim
        if len(x.shape) == 2:  # every matrix is split over both fsdp and tp
            assert np.prod(x.shape) == np.prod(shard) * fsdp_tp, (x.shape, shard, s.spec)
        device_elements += int(np.prod(shard))
    assert memory_plan(config, mesh=MESHES[n_devices]).device_param_bytes == 2 * device_elements


def test_a_mesh_that_cannot_shard_is_an_error_naming_axis_size_and_mesh():
    config = MptConfig.from_pretrained(os.path.join(HUB, "mosaicml", "mpt-7b-instruct"))
    with pytest.raises(MeshFitError, match=r"size 4096 does not divide over mesh axis fsdp of size 3 \(mesh"):
        memory_plan(config, mesh=(1, 3, 1, 1))


# ------------------------------------------------- shrunken copies, end to end
SHRINK = {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128}


def shrunken_checkpoint(repo: str, out_dir, tokenizer=None, seed: int = 0) -> tuple[str, dict, dict]:
    """Verbatim config.json with only the geometry reduced, random bf16 weights written as MosaicML
    saved them (two pytorch_model-*.bin shards + index), and the repo's other files beside them.
    A repo without a tokenizer file here (replit) gets `tokenizer`, a small stand-in."""
    from conftest import random_state_dict

    raw = raw_config(repo)
    has_tokenizer = os.path.isfile(os.path.join(HUB, repo, "tokenizer.json"))
    cfg = {**raw, **SHRINK}
    if grouped_query(repo):  # 2 KV heads for the shrunken 4 query heads (replit-code-v1_5-3b: 8 for 24)
        cfg["attn_config"] = {**raw["attn_config"], "kv_n_heads": 2}
    if not has_tokenizer:
        cfg["vocab_size"] = len(tokenizer)
    sd = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in random_state_dict(cfg, seed=seed).items()}
    path = write_checkpoint(out_dir, cfg, sd, fmt="bin", torch_dtype="bfloat16", n_shards=2)
    for f in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        if has_tokenizer or f == "generation_config.json":
            shutil.copy(os.path.join(HUB, repo, f), os.path.join(path, f))
    if not has_tokenizer:
        tokenizer.save_pretrained(path)
    return path, cfg, sd


@pytest.fixture(scope="module")
def replit_tokenizer():
    """Replit's special tokens at Replit's ids (<|pad|> 0, <|endoftext|> 1 = eos_token_id, <|unk|> 2)."""
    from easympt.demo import train_tokenizer

    tok = train_tokenizer(vocab_size=320, files=[json.__file__], special_tokens=("<|pad|>", "<|endoftext|>", "<|unk|>"))
    assert tok.convert_tokens_to_ids("<|endoftext|>") == raw_config("replit/replit-code-v1-3b")["eos_token_id"]
    return tok


def grouped_query(repo: str) -> bool:
    return raw_config(repo)["attn_config"].get("attn_type") == "grouped_query_attention"


def _tokenizer_for(repo, replit_tokenizer):
    return None if os.path.isfile(os.path.join(HUB, repo, "tokenizer.json")) else replit_tokenizer


@pytest.mark.parametrize("repo", REPOS)
def test_shrunken_copy_matches_reference_and_transformers(repo, tmp_path, replit_tokenizer):
    import torch
    from transformers import MptForCausalLM

    path, cfg, sd = shrunken_checkpoint(repo, tmp_path / "m", _tokenizer_for(repo, replit_tokenizer))
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    assert config.architecture == "MptForCausalLM"
    ids = np.random.default_rng(0).integers(3, cfg["vocab_size"], size=(2, 24))
    mask = np.ones_like(ids)
    mask[1, :7] = 0
    model = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)
    got = model(ids, attention_mask=mask, params=params).logits
    assert_logits_close(got, reference_forward(cfg, sd, ids, attention_mask=mask), mask=mask)

    from easympt.generation import Generator
    from easympt.transform.hf_to_flax import load_tokenizer

    gen = Generator(model, params, load_tokenizer(path), max_length=96, max_compile_tokens=16)
    gen.eos_ids = ()
    ours = gen.generate([ids[0].tolist()], max_new_tokens=24, temperature=0)[0].token_ids
    if grouped_query(repo):  # transformers' MptForCausalLM has no grouped-query attention: llm-foundry's reference
        assert ours == _greedy_reference(cfg, sd, ids[0].tolist(), 24)
        return
    hf = MptForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no remote code needed
    with torch.inference_mode():
        ref = hf.generate(torch.tensor(ids[:1]), max_new_tokens=24, do_sample=False, use_cache=True,
                          eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("repo", REPOS)
def test_export_loads_in_transformers_without_remote_code(repo, tmp_path, replit_tokenizer):
    from transformers import MptForCausalLM

    from easympt.transform import mpt_to_pretrained

    path, _, _ = shrunken_checkpoint(repo, tmp_path / "m", _tokenizer_for(repo, replit_tokenizer))
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    out = mpt_to_pretrained(params, config, str(tmp_path / "export"))
    written = json.load(open(os.path.join(out, "config.json"), encoding="utf-8"))
    assert written["architectures"] == ["MptForCausalLM"] and "auto_map" not in written
    if grouped_query(repo):  # transformers' MptConfig refuses grouped-query attention; easympt reads it back
        again, _ = mpt_from_pretrained(out, dtype="fp32", progress=False)
        assert all(bool((np.asarray(a) == np.asarray(b)).all())
                   for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)))
        return
    _, info = MptForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _greedy_reference(cfg, sd, ids, n):
    out = list(ids)
    for _ in range(n):
        logits = reference_forward(cfg, sd, np.asarray([out]))
        out.append(int(np.argmax(logits[0, -1])))
    return out[len(ids):]


@pytest.mark.parametrize("repo", REPOS)
def test_serves_with_its_template_and_stops_on_its_eos(repo, tmp_path, replit_tokenizer):
    """The repo's template formats the prompt; its eos ends the reply. The eos is made the second
    greedy token by swapping two embedding rows (tied head), which leaves the prompt's forward pass
    untouched when neither token occurs in it."""
    import httpx

    from easympt.serve import MPTJaxServer
    from easympt.transform.hf_to_flax import load_tokenizer
    from easympt.serve.mpt import dolly_instruct

    tok = _tokenizer_for(repo, replit_tokenizer)
    path, cfg, sd = shrunken_checkpoint(repo, tmp_path / "base", tok)
    tokenizer = load_tokenizer(path)  # replit-code-v1_5-3b's config is one transformers' MptConfig refuses
    eos = cfg.get("eos_token_id", tokenizer.eos_token_id)
    assert eos == tokenizer.eos_token_id  # the repo's eos: <|endoftext|> (id 0 for mosaicml, 1 for replit)
    template = TEMPLATES[repo]
    for text in ("Name three colours of the rainbow.", "def fibonacci(n):", "Write a haiku about rivers."):
        prompt = dolly_instruct(None, text) if template == "instruct" else text
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        g1, g2 = _greedy_reference(cfg, sd, ids, 2)
        if len({g1, g2, eos}) == 3 and not {g2, eos} & set(ids):
            break
    else:
        pytest.skip("no prompt leaves the swapped tokens out of the prompt")
    swapped = dict(sd)
    wte = sd["transformer.wte.weight"].copy()
    wte[[g2, eos]] = wte[[eos, g2]]
    swapped["transformer.wte.weight"] = wte
    path = write_checkpoint(tmp_path / "swapped", cfg, swapped, fmt="bin", torch_dtype="bfloat16", n_shards=2)
    tokenizer.save_pretrained(path)

    server = MPTJaxServer.from_pretrained(path, config=dict(
        host="127.0.0.1", port=free_port(), batch_size=2, max_length=128, max_new_tokens=16,
        max_compile_tokens=16, pre_compile=False), progress=False)
    server.fire()
    try:
        if template == "instruct":
            r = httpx.post(server.url + "/instruct", json={"instruction": text, "greedy": True}, timeout=300)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["response"] == tokenizer.decode([g1])
            assert body["tokens_used"] == len(ids) + 1  # g1; the eos ends the reply and is not text
        else:
            r = httpx.post(server.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 16,
                                                                  "temperature": 0}, timeout=300)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["text"] == tokenizer.decode([g1]) and choice["finish_reason"] == "stop"
            assert r.json()["usage"]["completion_tokens"] in (1, 2)
    finally:
        server.shutdown()


def test_readme_first_example_runs_on_a_mosaicml_layout_checkpoint(tmp_path, capsys):
    """The README's quick start, pointed at a checkpoint laid out as mosaicml/mpt-7b-instruct ships."""
    import re

    path, _, _ = shrunken_checkpoint("mosaicml/mpt-7b-instruct", tmp_path / "mpt-7b-instruct")
    readme = open(os.path.join(os.path.dirname(HUB), "..", "..", "README.md"), encoding="utf-8").read()
    first = re.findall(r"```python\n(.*?)```", readme.split("## Quick start", 1)[1], re.S)[0]
    code = first.replace("demo_checkpoint()", repr(path)).replace("/tmp/mpt-export", str(tmp_path / "export"))
    exec(compile(code, "README.md", "exec"), {})
    assert "(2, " in capsys.readouterr().out
    assert json.load(open(tmp_path / "export" / "config.json"))["architectures"] == ["MptForCausalLM"]


# ------------------------------------------------------------- easympt plan
def test_plan_reads_a_hub_id_from_config_json_alone(tmp_path, monkeypatch, capsys):
    """Only config.json in the cache (no weights): the plan needs nothing else."""
    import huggingface_hub.constants as hub_constants

    from easympt.cli import main

    snap = tmp_path / "hub" / "models--mosaicml--mpt-7b-instruct" / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    shutil.copy(os.path.join(HUB, "mosaicml", "mpt-7b-instruct", "config.json"), snap / "config.json")
    (tmp_path / "hub" / "models--mosaicml--mpt-7b-instruct" / "refs").mkdir()
    (tmp_path / "hub" / "models--mosaicml--mpt-7b-instruct" / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["plan", "mosaicml/mpt-7b-instruct", "--mesh", "1,1,8,1", "--device-memory", "4GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["n_params"] == 6_649_286_656 and plan["fits"] is True and plan["n_devices"] == 8
    assert plan["kv_bytes_per_token"] == 2 * 32 * 4096 * 2  # K and V, 32 layers, d_model 4096, bf16
    assert main(["plan", "mosaicml/mpt-7b-instruct", "--device-memory", "8GB"]) == 1  # 13.3 GB of weights
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_bad_input_is_a_clear_error(capsys):
    from easympt.cli import main

    assert main(["plan", os.path.join(HUB, "mosaicml", "mpt-7b-instruct"), "--mesh", "1,3,1,1"]) == 2
    assert "does not divide over mesh axis fsdp of size 3" in capsys.readouterr().err
    assert main(["plan", "mpt-7b", "--mesh", "8,1"]) == 2
    assert "give 4 positive sizes for dp,fsdp,tp,sp" in capsys.readouterr().err
    assert main(["plan", "/nonexistent/dir"]) == 2
