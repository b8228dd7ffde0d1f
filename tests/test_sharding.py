"""Partition rules, and sharded loading on a simulated 8-device CPU mesh."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import full_config, random_state_dict, write_checkpoint
from easympt import FlaxMptForCausalLM, MptConfig
from easympt.sharding import PartitionRuleError, create_mesh, match_partition_rules

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = [
    dict(),
    dict(no_bias=False, attn_config={"qk_ln": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    dict(tie_word_embeddings=False, learned_pos_emb=True, attn_config={"alibi": False}),
    dict(norm_type="rmsnorm", ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 96}),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fsdp", [True, False])
def test_rules_cover_every_parameter(variant, fsdp):
    config = MptConfig.from_dict(full_config(**variant))
    shapes = FlaxMptForCausalLM(config, _do_init=False).params_shape()
    specs = match_partition_rules(config.get_partition_rules(fsdp=fsdp), shapes)
    flat = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P))
    assert len(flat) == len(jax.tree_util.tree_leaves(shapes))
    wqkv = specs["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"]
    assert wqkv == (P("fsdp", "tp") if fsdp else P(None, "tp"))


def test_unmatched_parameter_is_an_error():
    config = MptConfig.preset("tiny")
    shapes = FlaxMptForCausalLM(config, _do_init=False).params_shape()
    shapes["transformer"]["mystery"] = {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    rules = config.get_partition_rules()[:-2]  # drop the lm_head rules too: not needed by a tied model
    with pytest.raises(PartitionRuleError, match="transformer/mystery/kernel"):
        match_partition_rules(rules, shapes)


def test_mesh_shapes():
    mesh = create_mesh((1, -1, 1, 1))
    assert mesh.axis_names == ("dp", "fsdp", "tp", "sp")
    with pytest.raises(ValueError, match="needs"):
        create_mesh((2, 3, 1, 1))


@pytest.mark.parametrize("shape", ["1,8,1,1", "1,4,2,1", "2,4,1,1"], ids=["fsdp8", "fsdp4xtp2", "dp2xfsdp4"])
def test_sharded_loading_on_8_simulated_devices(tmp_path, shape):
    cfg = full_config(n_heads=8, d_model=64, vocab_size=128)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=2))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(HERE, "multidevice", "sharded_load.py"), path, shape],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    dp, fsdp, tp, _ = (int(s) for s in shape.split(","))
    # Wqkv [64, 192]: in-dim over fsdp, out-dim over tp
    assert report["wqkv"]["shard"] == [64 // fsdp, 192 // tp]
    assert report["wqkv"]["n_devices"] == 8
    # wte [128, 64]: vocab over tp, embed over fsdp
    assert report["wte"]["shard"] == [128 // tp, 64 // fsdp]
    assert report["down"]["shard"] == [256 // tp, 64 // fsdp]
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["logit_scale"])
    assert report["restored_wqkv_shard"] == report["wqkv"]["shard"] and report["restored_equal"]
