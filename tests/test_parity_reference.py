"""easympt vs a numpy MPT written from llm-foundry's definition, for what
transformers lacks or gets wrong; the reference itself is checked against
transformers where they overlap."""

import numpy as np
import pytest
from safetensors.numpy import load_file

import reference_mpt
from conftest import (assert_logits_close, full_config, hf_logits, make_hf_checkpoint, random_state_dict,
                      write_checkpoint)
from easympt import FlaxMptForCausalLM
from easympt.transform import mpt_from_pretrained


def _easympt_logits(path, ids, mask=None, **kw):
    params, config = mpt_from_pretrained(str(path), dtype="fp32", progress=False)
    return np.asarray(FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)(ids, mask, params=params, **kw).logits)


def test_reference_matches_transformers(tmp_path, tokens):
    path = make_hf_checkpoint(tmp_path / "hf", n_heads=6, d_model=48, attn_config={"clip_qkv": 0.5})
    ids, mask = tokens
    import json
    cfg = json.load(open(path + "/config.json"))
    sd = load_file(path + "/model.safetensors")
    ref = reference_mpt.forward(cfg, sd, ids, mask)
    assert_logits_close(ref, hf_logits(path, ids, mask), mask=mask)


FEATURES = {
    "alibi_bias_max": dict(attn_config={"alibi_bias_max": 4}),
    "6-heads-bias-max-16": dict(n_heads=6, d_model=48, attn_config={"alibi_bias_max": 16}),
    "biases": dict(no_bias=False),
    "qk_ln": dict(attn_config={"qk_ln": True}),
    "qk_ln-biases-gqa": dict(no_bias=False, attn_config={"qk_ln": True, "attn_type": "grouped_query_attention",
                                                         "kv_n_heads": 2}),
    "gqa": dict(n_heads=8, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "mqa": dict(attn_config={"attn_type": "multiquery_attention"}),
    "logit_scale": dict(logit_scale=0.5),
    "logit_scale_inv_sqrt": dict(logit_scale="inv_sqrt_d_model"),
    "mptglu-silu": dict(ffn_config={"ffn_type": "mptglu", "ffn_hidden_size": 96, "ffn_act_fn": {"name": "silu"}}),
    "gelu-tanh-expansion": dict(expansion_ratio=2, ffn_config={"ffn_act_fn": {"name": "gelu", "approximate": "tanh"}}),
    "learned_pos_emb": dict(learned_pos_emb=True, attn_config={"alibi": False}),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "layernorm-untied": dict(norm_type="layernorm", tie_word_embeddings=False),
    "clip-softmax-scale": dict(attn_config={"clip_qkv": 0.4, "softmax_scale": 0.1}),
    "embedding_fraction": dict(embedding_fraction=0.1),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_feature_matches_reference(tmp_path, tokens, name):
    cfg = full_config(**FEATURES[name])
    sd = random_state_dict(cfg, seed=len(name))
    path = write_checkpoint(tmp_path / name, cfg, sd)
    ids, mask = tokens
    ref = reference_mpt.forward(cfg, sd, ids, mask)
    assert_logits_close(_easympt_logits(path, ids, mask), ref, mask=mask)


def test_prefix_lm_matches_reference(tmp_path, tokens):
    cfg = full_config(attn_config={"prefix_lm": True})
    sd = random_state_dict(cfg, seed=3)
    path = write_checkpoint(tmp_path / "p", cfg, sd)
    ids, _ = tokens
    prefix = np.zeros_like(ids)
    prefix[:, :7] = 1
    prefix[2, :12] = 1
    ref = reference_mpt.forward(cfg, sd, ids, prefix_mask=prefix)
    got = _easympt_logits(path, ids, None, prefix_mask=prefix)
    assert_logits_close(got, ref)
    # the prefix really is bidirectional: changing a later prefix token changes an earlier logit
    ids2 = ids.copy()
    ids2[0, 6] = (ids2[0, 6] + 1) % 128
    assert not np.allclose(_easympt_logits(path, ids2, None, prefix_mask=prefix)[0, 0], got[0, 0])


def test_sequence_id_matches_reference(tmp_path, tokens):
    cfg = full_config(attn_config={"attn_uses_sequence_id": True})
    sd = random_state_dict(cfg, seed=4)
    path = write_checkpoint(tmp_path / "s", cfg, sd)
    ids, _ = tokens
    seq = np.zeros_like(ids)
    seq[:, 8:] = 1
    seq[1, 14:] = 2
    ref = reference_mpt.forward(cfg, sd, ids, sequence_id=seq)
    got = _easympt_logits(path, ids, None, sequence_id=seq)
    assert_logits_close(got, ref)
    # packed documents do not see each other: the second document alone gives the same logits
    alone = _easympt_logits(path, ids[:1, 8:], None, sequence_id=np.zeros_like(ids[:1, 8:]))
    np.testing.assert_allclose(got[0, 8:], alone[0], atol=1e-4)


def test_runs_past_max_seq_len(tmp_path):
    """ALiBi extrapolates: a 40-token input on a max_seq_len=16 model (transformers cannot)."""
    cfg = full_config(max_seq_len=16)
    sd = random_state_dict(cfg, seed=5)
    path = write_checkpoint(tmp_path / "long", cfg, sd)
    ids = np.random.default_rng(0).integers(0, 128, (2, 40))
    assert_logits_close(_easympt_logits(path, ids), reference_mpt.forward(cfg, sd, ids))


def test_transformers_ignores_alibi_bias_max(tmp_path, tokens):
    """Why the reference exists: transformers always uses alibi_bias_max=8."""
    path = make_hf_checkpoint(tmp_path / "hf", attn_config={"alibi_bias_max": 2})
    ids, mask = tokens
    import json
    cfg = json.load(open(path + "/config.json"))
    assert cfg["attn_config"]["alibi_bias_max"] == 2
    sd = load_file(path + "/model.safetensors")
    ref = reference_mpt.forward(cfg, sd, ids, mask)
    got = _easympt_logits(path, ids, mask)
    assert_logits_close(got, ref, mask=mask)
    hf = hf_logits(path, ids, mask)
    keep = mask.astype(bool)
    assert np.abs(hf[keep] - ref[keep]).max() > 1e-3


def test_reference_by_query_blocks_equals_the_whole_matrix():
    """The numpy reference's long-input mode (attention a block of query rows at a time, used by
    bench_long_context --reference) gives the same logits, under padding, prefix-LM and sequence ids."""
    rng = np.random.default_rng(3)
    for attn in ({}, {"prefix_lm": True}, {"attn_uses_sequence_id": True}):
        cfg = full_config(attn_config=attn)
        sd = random_state_dict(cfg, seed=5)
        ids = rng.integers(0, cfg["vocab_size"], (2, 23))
        mask = np.ones_like(ids)
        mask[1, :4] = 0
        kw = {"attention_mask": mask}
        if attn.get("prefix_lm"):
            kw["prefix_mask"] = (np.arange(23)[None] < 9).repeat(2, 0)
        if attn.get("attn_uses_sequence_id"):
            kw["sequence_id"] = np.repeat(np.arange(3), 8)[None, :23].repeat(2, 0)
        whole = reference_mpt.forward(cfg, sd, ids, **kw)
        np.testing.assert_allclose(reference_mpt.forward(cfg, sd, ids, query_block=5, **kw), whole, rtol=1e-12, atol=1e-12)
