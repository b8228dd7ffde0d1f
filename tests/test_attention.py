"""The blockwise (flash-attention style) kernel and the Pallas kernel (interpret mode on CPU) equal
the dense one, forward and backward, under every mask easympt builds; the model gives the same
logits, cached decode and training gradients with each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easympt.kernels.blockwise import blockwise_attention
from easympt.kernels.dense_attention import dense_attention
from easympt.kernels.mask import AttentionMask
from easympt.layers import alibi_slopes

B, K, G, D = 2, 2, 3, 8


def _inputs(T, S, seed=0):
    """q [B, K, G, T, D] and keys, values in the cache's layouts: kt [B*K, D, S], v [B*K, S, D]."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, K, G, T, D)), jnp.float32)
    k = rng.standard_normal((B, K, S, D))
    v = rng.standard_normal((B, K, S, D))
    return (q, jnp.asarray(k.transpose(0, 1, 3, 2).reshape(B * K, D, S), jnp.float32),
            jnp.asarray(v.reshape(B * K, S, D), jnp.float32))


def test_dense_kernel_reads_the_cache_layouts_as_numpy_attention_does():
    T, S = 5, 12
    q, kt, v = _inputs(T, S)
    mask = _mask("causal", T, S)
    slopes = jnp.asarray(alibi_slopes(K * G)).reshape(K, G)
    out = np.asarray(dense_attention(q, kt, v, mask, slopes, 0.5))  # [B, T, K, G, D]
    k = np.asarray(kt).reshape(B, K, D, S).transpose(0, 1, 3, 2)  # back to [B, K, S, D]
    vv = np.asarray(v).reshape(B, K, S, D)
    allowed = np.asarray(mask.allowed())[:, 0]  # [B, T, S]
    dist = np.abs(np.asarray(mask.q_slots)[:, :, None] - np.arange(S)[None, None])
    for b in range(B):
        for h in range(K):
            for g in range(G):
                for t in range(T):
                    if not allowed[b, t].any():
                        continue
                    s = np.asarray(q)[b, h, g, t] @ k[b, h].T * 0.5 - float(slopes[h, g]) * dist[b, t]
                    s = np.where(allowed[b, t], s, -np.inf)
                    p = np.exp(s - s.max())
                    np.testing.assert_allclose(out[b, t, h, g], (p / p.sum()) @ vv[b, h], atol=1e-5)


def _mask(kind, T, S):
    index = jnp.asarray([S - T, S - T - 3]) if S > T else jnp.zeros((B,), jnp.int32)
    q_slots = index[:, None] + jnp.arange(T)[None]
    valid = jnp.ones((B, S), bool).at[1, :5].set(False)  # row 1 left-padded
    if S > T:  # cache: slots past each row's writes are empty
        valid = valid & (jnp.arange(S)[None] < (index + T)[:, None])
    kw = {}
    if kind == "prefix":
        kw["key_prefix"] = valid & (jnp.arange(S)[None] < 9)
    if kind == "sequence_id":
        seg = jnp.asarray(np.repeat(np.arange((S + 6) // 7), 7)[:S])[None].repeat(B, 0)
        kw.update(q_segment=seg[:, -T:], k_segment=seg)
    return AttentionMask(q_slots, jnp.arange(S), valid, causal=kind != "bidirectional", **kw)


CASES = [("causal", 37, 37), ("causal", 64, 64), ("prefix", 37, 37), ("sequence_id", 40, 40),
         ("bidirectional", 21, 21), ("causal", 1, 96), ("causal", 5, 64), ("causal", 13, 50)]


def _pallas(*args, q_block, k_block):
    from easympt.kernels.pallas_attention import pallas_attention  # Pallas interpret mode on CPU

    return pallas_attention(*args, q_block=q_block, k_block=k_block)


@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("kind,T,S", CASES)
def test_dense_kernels_written_backward_equals_autodiff(kind, T, S, alibi):
    """The dense kernel's custom VJP against JAX's own derivative of the same forward (the dropout
    path is differentiated by autodiff; an identity dropout leaves its forward unchanged)."""
    q, k, v = _inputs(T, S)
    mask = _mask(kind, T, S)
    slopes = jnp.asarray(alibi_slopes(K * G)).reshape(K, G) if alibi else None
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, K, G, D)), jnp.float32)

    def loss(q, k, v, **kw):
        return jnp.sum(dense_attention(q, k, v, mask, slopes, 0.3, **kw) * w)

    written = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    autodiff = jax.jit(jax.grad(lambda *a: loss(*a, dropout=lambda p: p), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(written, autodiff):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["blockwise", "pallas"])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("kind,T,S", CASES)
def test_blocked_kernels_equal_dense_forward_and_backward(kind, T, S, alibi, kernel):
    q, k, v = _inputs(T, S)
    mask = _mask(kind, T, S)
    slopes = jnp.asarray(alibi_slopes(K * G)).reshape(K, G) if alibi else None
    scale = 1 / np.sqrt(D)
    rows = np.broadcast_to(np.asarray(mask.allowed()[:, 0]), (B, T, S)).any(-1)  # queries that see a key

    def loss(fn, q, k, v, **kw):
        out = fn(q, k, v, mask, slopes, scale, **kw)
        w = jnp.asarray(np.random.default_rng(1).standard_normal(out.shape), jnp.float32)
        return jnp.sum(out * w * jnp.asarray(rows)[:, :, None, None, None]), out

    (ld, od), gd = jax.value_and_grad(lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    fn = blockwise_attention if kernel == "blockwise" else _pallas
    (lb, ob), gb = jax.value_and_grad(lambda *a: loss(fn, *a, q_block=8, k_block=16),
                                      argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(ob)[rows], np.asarray(od)[rows], atol=2e-5, rtol=1e-5)
    for a, b in zip(gb, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_blockwise_under_jit_with_gqa_single_block():
    q, k, v = _inputs(9, 9)
    mask = _mask("causal", 9, 9)
    slopes = jnp.asarray(alibi_slopes(K * G)).reshape(K, G)
    a = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask, slopes, 0.3))(q, k, v)
    b = dense_attention(q, k, v, mask, slopes, 0.3)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("kernel", ["blockwise", "pallas"])
@pytest.mark.parametrize("variant", [{}, {"attn_config": {"alibi": True, "qk_ln": True, "attn_type":
                                                            "grouped_query_attention", "kv_n_heads": 2}}])
def test_model_logits_and_cached_decode_equal_with_either_kernel(tmp_path, variant, kernel):
    from conftest import full_config, random_state_dict, write_checkpoint

    from easympt import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained

    cfg = full_config(**variant)
    params, config = mpt_from_pretrained(write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg)), dtype="fp32",
                                         progress=False)
    ids = np.random.default_rng(0).integers(0, cfg["vocab_size"], (2, 40))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    dense = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False, attention="dense")
    block = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False, attention=kernel)
    a = np.asarray(dense(ids, attention_mask=mask, params=params).logits)
    b = np.asarray(block(ids, attention_mask=mask, params=params).logits)
    keep = mask.astype(bool)
    np.testing.assert_allclose(b[keep], a[keep], atol=1e-4 * max(1, np.abs(a).max()))
    # decode one token at a time into a cache (a 30-token prompt through the kernel): same as the full pass
    cache = block.init_cache(2, 64)
    out = block(ids[:, :30], attention_mask=mask[:, :30], params=params, cache=cache)
    steps = [out.logits[:, -1]]
    cache = out.cache
    for t in range(30, 39):
        out = block(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], params=params, cache=cache)
        steps.append(out.logits[:, -1])
        cache = out.cache
    np.testing.assert_allclose(np.stack(steps, 1), a[:, 29:39], atol=1e-4 * max(1, np.abs(a).max()))


def test_training_gradients_equal_with_either_kernel(tmp_path):
    from conftest import full_config, random_state_dict, write_checkpoint

    from easympt import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained

    cfg = full_config(attn_config={"attn_uses_sequence_id": True})
    params, config = mpt_from_pretrained(write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg)), dtype="fp32",
                                         progress=False)
    rng = np.random.default_rng(2)
    batch = {"input_ids": jnp.asarray(rng.integers(0, cfg["vocab_size"], (2, 48))),
             "attention_mask": jnp.ones((2, 48), jnp.int32), "loss_mask": jnp.ones((2, 48), jnp.int32),
             "sequence_id": jnp.asarray(np.repeat(np.arange(4), 12)[None].repeat(2, 0))}
    grads = []
    for attention in ("dense", "blockwise", "pallas"):
        m = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False, attention=attention)
        grads.append(jax.grad(lambda p: m.loss(p, batch, jax.random.PRNGKey(0), True))(params))
    for other in grads[1:]:
        for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(other)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-3)


def test_decode_over_a_long_cache_equals_the_blockwise_kernel():
    """One query (G = 1) over LONG_DECODE_SLOTS slots: the dense kernel's multiply-and-sum path for
    the values (CPU) gives what the blockwise kernel gives."""
    from easympt.kernels.dense_attention import LONG_DECODE_SLOTS

    S = LONG_DECODE_SLOTS
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((B, K, 1, 1, D)), jnp.float32)
    kt = jnp.asarray(rng.standard_normal((B * K, D, S)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B * K, S, D)), jnp.float32)
    mask = _mask("causal", 1, S)
    slopes = jnp.asarray(alibi_slopes(K)).reshape(K, 1)
    np.testing.assert_allclose(np.asarray(dense_attention(q, kt, v, mask, slopes, 0.3)),
                               np.asarray(blockwise_attention(q, kt, v, mask, slopes, 0.3)), atol=2e-5)
