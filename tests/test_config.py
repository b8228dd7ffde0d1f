import json

import pytest

from conftest import full_config, make_hf_checkpoint
from easympt import ConfigError, MptConfig


def test_reads_transformers_config_json(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m", attn_config={"clip_qkv": 2.0, "alibi_bias_max": 4})
    c = MptConfig.from_pretrained(path)
    assert (c.d_model, c.n_heads, c.n_layers, c.vocab_size) == (64, 4, 2, 128)
    assert c.attn_config.clip_qkv == 2.0 and c.attn_config.alibi_bias_max == 4
    assert c.hidden_size == 64 and c.head_dim == 16 and c.kv_heads == 4 and c.ffn_hidden_size == 256


def test_round_trip_through_config_json(tmp_path):
    c = MptConfig.from_dict(full_config(
        attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True},
        ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 100, "ffn_act_fn": {"name": "silu"}},
        logit_scale="inv_sqrt_d_model",
        init_config={"name": "kaiming_normal_", "init_div_is_residual": True}))
    c.save_pretrained(tmp_path)
    back = MptConfig.from_pretrained(str(tmp_path))
    assert back == c
    assert back.init_config == c.init_config
    assert back.kv_heads == 2 and back.ffn_hidden_size == 100


def test_transformers_reads_our_config(tmp_path):
    from transformers import MptConfig as HFConfig

    MptConfig.preset("tiny").save_pretrained(tmp_path)
    hf = HFConfig.from_pretrained(str(tmp_path))
    assert hf.d_model == 64 and hf.n_heads == 4 and hf.attn_config.alibi


def test_presets():
    assert MptConfig.preset("mpt-125m").d_model == 768
    assert MptConfig.preset("mpt-125m").vocab_size == 50368
    seven = MptConfig.preset("mpt-7b")
    assert (seven.d_model, seven.n_heads, seven.n_layers, seven.vocab_size) == (4096, 32, 32, 50432)
    assert MptConfig.preset("mpt-7b-8k").max_seq_len == 8192
    assert MptConfig.preset("mpt-30b").n_layers == 48
    assert MptConfig.preset("tiny", n_layers=3).n_layers == 3
    with pytest.raises(ConfigError, match="unknown preset 'mpt-9b'"):
        MptConfig.preset("mpt-9b")


@pytest.mark.parametrize("overrides, message", [
    (dict(attn_config={"attn_type": "foo"}), "attn_type 'foo' is not one of"),
    (dict(attn_config={"rope": True}), "rope=True is not implemented"),
    (dict(attn_config={"qk_gn": True}), "qk_gn"),
    (dict(attn_config={"sliding_window_size": 128}), "sliding_window_size"),
    (dict(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 3}), "kv_n_heads 3"),
    (dict(attn_config={"fused_qkv": False}), "fused_qkv"),
    (dict(attn_config={"unknown_knob": 1}), "unknown attn_config field"),
    (dict(norm_type="groupnorm"), "norm_type 'groupnorm'"),
    (dict(ffn_config={"ffn_type": "mb_moe"}), "ffn_type 'mb_moe'"),
    (dict(ffn_config={"ffn_type": "mptmlp", "ffn_act_fn": {"name": "swish2"}}), "swish2"),
    (dict(ffn_config={"ffn_type": "mptmlp", "fc_type": "te"}), "fc_type"),
    (dict(logit_scale="huge"), "logit_scale 'huge'"),
    (dict(d_model=65), "not divisible by n_heads"),
    (dict(block_overrides={"order": [1]}), "block_overrides"),
    (dict(fc_type="te"), "fc_type"),
    (dict(init_config={"name": "orthogonal_"}), "init_config.name"),
    (dict(moe_top_k=2), "unknown config field"),
])
def test_unsupported_values_fail_loudly(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps(full_config(**overrides)))
    with pytest.raises(ConfigError, match=message) as err:
        MptConfig.from_pretrained(str(tmp_path))
    assert "config.json in" in str(err.value)


def test_not_mpt(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not 'mpt'"):
        MptConfig.from_pretrained(str(tmp_path))


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        MptConfig.from_pretrained(str(tmp_path))
