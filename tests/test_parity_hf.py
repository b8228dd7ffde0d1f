"""easympt vs transformers' PyTorch MptForCausalLM on random checkpoints."""

import numpy as np
import pytest

from conftest import assert_logits_close, hf_logits, make_hf_checkpoint
from easympt import FlaxMptForCausalLM
from easympt.transform import mpt_from_pretrained

CASES = {
    "4-heads": dict(n_heads=4, d_model=64),
    "6-heads": dict(n_heads=6, d_model=96),
    "12-heads": dict(n_heads=12, d_model=96),
    "clip_qkv": dict(attn_config={"clip_qkv": 0.3}),
    "softmax_scale": dict(attn_config={"softmax_scale": 0.05}),
    "untied-head": dict(tie_word_embeddings=False),
    "3-layers-eps": dict(n_layers=3, layer_norm_epsilon=1e-3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, tokens, case):
    path = make_hf_checkpoint(tmp_path / case, seed=len(case), **CASES[case])
    ids, mask = tokens
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    model = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)
    got = model(ids, attention_mask=mask, params=params).logits
    assert_logits_close(got, hf_logits(path, ids, mask), mask=mask)
    # and without a mask: the plain causal path
    assert_logits_close(model(ids, params=params).logits, hf_logits(path, ids))


def test_argmax_matches_transformers(tmp_path, tokens):
    path = make_hf_checkpoint(tmp_path / "m", n_heads=6, d_model=96)
    ids, mask = tokens
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    got = np.asarray(FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)(ids, mask, params=params).logits)
    ref = hf_logits(path, ids, mask)
    keep = mask.astype(bool)
    assert (got.argmax(-1)[keep] == ref.argmax(-1)[keep]).all()


def test_bf16_compute_tracks_transformers(tmp_path, tokens):
    """The accelerator default (bf16 params and compute) stays within bf16 error of the float32 reference."""
    path = make_hf_checkpoint(tmp_path / "m", n_heads=6, d_model=96)
    ids, mask = tokens
    params, config = mpt_from_pretrained(path, dtype="bf16", progress=False)
    got = np.asarray(FlaxMptForCausalLM(config, dtype="bf16", _do_init=False)(ids, mask, params=params).logits)
    ref = hf_logits(path, ids, mask)
    assert_logits_close(got, ref, mask=mask, rtol_scale=3e-2)
    keep = mask.astype(bool)
    assert (got.argmax(-1)[keep] == ref.argmax(-1)[keep]).mean() >= 0.9
