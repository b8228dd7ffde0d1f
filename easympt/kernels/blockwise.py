"""Blockwise (flash-attention style) attention for long inputs.

An online softmax over key blocks for one query block at a time, so temporaries are O(tq * tk)
whatever T and S are; with a causal mask it visits only the key blocks at or before a query block's
last slot (in decode: only the cache blocks a row has filled). Its backward pass is the
flash-attention one (custom VJP): probabilities are recomputed block by block from the saved
log-sum-exp, never stored. The Pallas kernel (easympt.kernels.pallas_attention) shares that backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from easympt.kernels.mask import NEG, AttentionMask, masked_scores, merged_heads

Q_BLOCK, K_BLOCK = 512, 512


def _pad_to(x, n, axis, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks_to_visit(mask: AttentionMask, q_start, tq, tk, n_kb):
    """Key blocks a query block needs: with a causal mask (no prefix), only those starting at or
    before the block's last query slot, over the batch; otherwise all of them."""
    if not mask.causal or mask.key_prefix is not None:
        return n_kb
    last = jnp.max(jax.lax.dynamic_slice_in_dim(mask.q_slots, q_start, tq, axis=1))
    first_slot = mask.k_slots[0]
    return jnp.clip((last - first_slot) // tk + 1, 1, n_kb)


def _block(q_block, kt, v, j, tk, mask, slopes, scale, q_window, precision):
    """Key block j: (kt block [N, D, tk], v block [N, tk, D], its masked, biased scores against q_block)."""
    ks = j * tk
    kb = jax.lax.dynamic_slice_in_dim(kt, ks, tk, axis=2)
    vb = jax.lax.dynamic_slice_in_dim(v, ks, tk, axis=1)
    return kb, vb, masked_scores(q_block, kb, mask, slopes, scale, q_window, (ks, tk), precision)


def _forward(q, kt, v, mask, slopes, scale, tq, tk, precision):
    """out [B, K, G, T, D] (float32) and log-sum-exp [B, K, G, T]; T, S multiples of tq, tk."""
    B, K, G, T, D = q.shape
    n_kb = kt.shape[2] // tk

    def q_block(qi):
        qs = qi * tq
        qb = jax.lax.dynamic_slice_in_dim(q, qs, tq, axis=3)

        def step(j, carry):
            m, l, acc = carry
            _, vb, s = _block(qb, kt, v, j, tk, mask, slopes, scale, (qs, tq), precision)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            # probabilities in the value dtype for the product, accumulated in float32 (as flash
            # attention does); converting v instead would let XLA hoist a float32 copy of the cache
            pv = jnp.einsum("ngqs,nsd->ngqd", merged_heads(p.astype(vb.dtype)), vb, precision=precision,
                            preferred_element_type=jnp.float32)
            acc = acc * corr[..., None] + pv.reshape(acc.shape)
            return m_new, l, acc

        init = (jnp.full((B, K, G, tq), NEG, jnp.float32), jnp.zeros((B, K, G, tq), jnp.float32),
                jnp.zeros((B, K, G, tq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _blocks_to_visit(mask, qs, tq, tk, n_kb), step, init)
        return acc / l[..., None], m + jnp.log(l)

    out, lse = jax.lax.map(q_block, jnp.arange(T // tq))  # [nq, B, K, G, tq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, T, D)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)
    return out, lse


def _backward(q, kt, v, mask, slopes, scale, tq, tk, precision, out, lse, dout):
    """Flash-attention's backward: dq, dkt, dv with probabilities recomputed per block."""
    B, K, G, T, D = q.shape
    n_kb = kt.shape[2] // tk
    delta = jnp.sum(dout * out, axis=-1)  # [B, K, G, T]

    def q_block(qi, carry):
        dk, dv, dq = carry
        qs = qi * tq
        qb = jax.lax.dynamic_slice_in_dim(q, qs, tq, axis=3)
        dob = jax.lax.dynamic_slice_in_dim(dout, qs, tq, axis=3)
        lse_b = jax.lax.dynamic_slice_in_dim(lse, qs, tq, axis=3)
        delta_b = jax.lax.dynamic_slice_in_dim(delta, qs, tq, axis=3)

        def step(j, inner):
            dk, dv, dqb = inner
            ks = j * tk
            kb, vb, s = _block(qb, kt, v, j, tk, mask, slopes, scale, (qs, tq), precision)
            p = jnp.exp(s - lse_b[..., None])
            dv_b = jnp.einsum("ngqs,ngqd->nsd", merged_heads(p), merged_heads(dob), precision=precision)
            dp = jnp.einsum("ngqd,nsd->ngqs", merged_heads(dob), vb.astype(jnp.float32), precision=precision)
            ds = p * (dp.reshape(p.shape) - delta_b[..., None]) * scale
            dq_b = jnp.einsum("ngqs,nds->ngqd", merged_heads(ds), kb.astype(jnp.float32), precision=precision)
            dqb = dqb + dq_b.reshape(dqb.shape)
            dk_b = jnp.einsum("ngqs,ngqd->nds", merged_heads(ds), merged_heads(qb.astype(jnp.float32)),
                              precision=precision)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, jax.lax.dynamic_slice_in_dim(dk, ks, tk, 2) + dk_b, ks, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, jax.lax.dynamic_slice_in_dim(dv, ks, tk, 1) + dv_b, ks, 1)
            return dk, dv, dqb

        dqb = jnp.zeros((B, K, G, tq, D), jnp.float32)
        dk, dv, dqb = jax.lax.fori_loop(0, _blocks_to_visit(mask, qs, tq, tk, n_kb), step, (dk, dv, dqb))
        return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, dqb, qs, axis=3)

    init = (jnp.zeros(kt.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    dk, dv, dq = jax.lax.fori_loop(0, T // tq, q_block, init)
    return dq, dk, dv


def _flash_backward(scale, tq, tk, precision, res, dout):
    """Gradients of q, kt, v (and zeros for the mask and slopes) from a flash forward's residuals
    (q, kt, v, mask, slopes, out, lse)."""
    q, kt, v, mask, slopes, out, lse = res
    dq, dk, dv = _backward(q, kt, v, mask, slopes, scale, tq, tk, precision, out, lse, dout.astype(jnp.float32))
    zero_mask = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)  # ints and bools
    return (dq.astype(q.dtype), dk.astype(kt.dtype), dv.astype(v.dtype), zero_mask,
            None if slopes is None else jnp.zeros_like(slopes))


def flash_attention_vjp(forward, precision_of=lambda option: option):
    """An attention function with flash attention's backward from a kernel's forward pass
    `forward(q, kt, v, mask, slopes, scale, tq, tk, option) -> (out, lse)`: the backward needs only the
    inputs, the output and the log-sum-exp. `option` is the forward's static setting (matmul
    precision here, interpret mode for the Pallas kernel); `precision_of(option)` is the backward's."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
    def attention(q, kt, v, mask, slopes, scale, tq, tk, option):
        return forward(q, kt, v, mask, slopes, scale, tq, tk, option)[0]

    def fwd(q, kt, v, mask, slopes, scale, tq, tk, option):
        out, lse = forward(q, kt, v, mask, slopes, scale, tq, tk, option)
        return out, (q, kt, v, mask, slopes, out, lse)

    def bwd(scale, tq, tk, option, res, dout):
        return _flash_backward(scale, tq, tk, precision_of(option), res, dout)

    attention.defvjp(fwd, bwd)
    return attention


_flash = flash_attention_vjp(_forward)


def blockwise_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                        q_block: int = Q_BLOCK, k_block: int = K_BLOCK):
    """Same result as dense_attention, in O(q_block * k_block) temporaries (no dropout)."""
    T, S = q.shape[3], kt.shape[2]
    tq, tk = min(q_block, T), min(k_block, S)
    qpad, kpad, vpad, padded = pad_to_blocks(q, kt, v, mask, tq, tk)
    out = _flash(qpad, kpad, vpad, padded, slopes, float(scale), tq, tk, precision)
    return jnp.moveaxis(out[:, :, :, :T], 3, 1).astype(dtype)  # [B, T, K, G, D]


def pad_to_blocks(q, kt, v, mask: AttentionMask, tq: int, tk: int):
    """Queries and keys padded to whole blocks, with the mask to match: padded queries are discarded
    by the caller; padded keys are invalid and placed past every real slot."""
    B, T, S = q.shape[0], q.shape[3], kt.shape[2]
    Tp, Sp = _round_up(T, tq), _round_up(S, tk)
    qpad = _pad_to(q, Tp, axis=3)
    kpad, vpad = _pad_to(kt, Sp, axis=2), _pad_to(v, Sp, axis=1)
    last_q = mask.q_slots[:, -1:]
    padded = mask.replace(
        q_slots=jnp.concatenate([mask.q_slots, jnp.broadcast_to(last_q, (B, Tp - T))], axis=1),
        k_slots=jnp.concatenate([mask.k_slots, mask.k_slots[-1] + 1 + jnp.arange(Sp - S, dtype=mask.k_slots.dtype)]),
        key_valid=_pad_to(mask.key_valid, Sp, axis=1, value=False),
        key_prefix=None if mask.key_prefix is None else _pad_to(mask.key_prefix, Sp, axis=1, value=False),
        q_segment=None if mask.q_segment is None else _pad_to(mask.q_segment, Tp, axis=1, value=-1),
        k_segment=None if mask.k_segment is None else _pad_to(mask.k_segment, Sp, axis=1, value=-2))
    return qpad, kpad, vpad, padded


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
