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


@pytest.mark.parametrize("dtype,rtol_scale,agree", [("fp32", 1e-4, 1.0), ("bf16", 3e-2, 0.9)])
def test_argmax_matches_transformers(tmp_path, tokens, dtype, rtol_scale, agree):
    """float32: every argmax equal. bf16 (the accelerator default, params and compute) stays within bf16
    error of the float32 reference."""
    path = make_hf_checkpoint(tmp_path / "m", n_heads=6, d_model=96)
    ids, mask = tokens
    params, config = mpt_from_pretrained(path, dtype=dtype, progress=False)
    got = np.asarray(FlaxMptForCausalLM(config, dtype=dtype, _do_init=False)(ids, mask, params=params).logits)
    ref = hf_logits(path, ids, mask)
    assert_logits_close(got, ref, mask=mask, rtol_scale=rtol_scale)
    keep = mask.astype(bool)
    assert (got.argmax(-1)[keep] == ref.argmax(-1)[keep]).mean() >= agree
