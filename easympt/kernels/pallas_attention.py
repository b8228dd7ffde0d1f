"""A Pallas flash-attention kernel that takes ALiBi as per-head slopes.

No attention kernel JAX can reach takes ALiBi the way MPT defines it: cuDNN (through
`jax.nn.dot_product_attention`) and the Pallas TPU/GPU flash kernels take a bias as a [B, H, T, S]
tensor, which is the quadratic memory the blockwise kernel exists to avoid. This kernel computes the
bias inside each block from the heads' slopes and the slots' positions, and applies every mask
easympt builds (causal, padding, prefix-LM, sequence ids) per block, from per-token vectors.

One program per (batch row x kv head, query block): its queries of all G heads sharing that kv
head, an online softmax over key blocks, float32 accumulation. Inputs in the KV cache's layouts
(keys [B*K, D, S], values [B*K, S, D]). On CPU it runs in Pallas' interpret mode (tests); on an
accelerator it compiles through Pallas (Triton on GPU). Its backward pass is the
blockwise kernel's (flash attention's, from the saved log-sum-exp); `attention="pallas"` selects it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from easympt.kernels.blockwise import flash_attention_vjp, pad_to_blocks
from easympt.kernels.mask import NEG, AttentionMask


def _kernel(q_ref, kt_ref, v_ref, q_slots_ref, q_seg_ref, k_slots_ref, k_valid_ref, k_prefix_ref, k_seg_ref,
            slopes_ref, o_ref, lse_ref, *, scale, tk, n_kb, causal, has_prefix, has_segments):
    _, G, tq, D = q_ref.shape
    q = q_ref[0].reshape(G * tq, D).astype(jnp.float32)
    q_slots = q_slots_ref[0]  # [tq]
    q_seg = q_seg_ref[0]
    slopes = slopes_ref[0].astype(jnp.float32)  # [G]

    def step(j, carry):
        m, l, acc = carry
        keys = pl.ds(j * tk, tk)
        kt = kt_ref[0, :, keys].astype(jnp.float32)  # [D, tk]
        v = v_ref[0, keys, :].astype(jnp.float32)  # [tk, D]
        # this block's mask, by AttentionMask's own rules (a batch of one row)
        block = AttentionMask(q_slots[None], k_slots_ref[0, keys], k_valid_ref[0, keys][None] != 0,
                              (k_prefix_ref[0, keys][None] != 0) if has_prefix else None,
                              q_seg[None] if has_segments else None,
                              k_seg_ref[0, keys][None] if has_segments else None, causal)
        s = jnp.dot(q, kt).reshape(G, tq, tk) * scale
        s = s - slopes[:, None, None] * block.distance()
        s = jnp.where(block.allowed()[0], s, NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.dot(p.reshape(G * tq, tk), v).reshape(G, tq, D)
        return m_new, l, acc

    init = (jnp.full((G, tq), NEG, jnp.float32), jnp.zeros((G, tq), jnp.float32), jnp.zeros((G, tq, D), jnp.float32))
    if causal and not has_prefix:  # key blocks past this query block's last slot hold nothing it may see
        n_visit = jnp.clip((jnp.max(q_slots) - k_slots_ref[0, 0]) // tk + 1, 1, n_kb)
    else:
        n_visit = n_kb
    m, l, acc = jax.lax.fori_loop(0, n_visit, step, init)
    o_ref[0] = (acc / l[..., None]).astype(o_ref.dtype)
    lse_ref[0] = m + jnp.log(l)


def _forward(q, kt, v, mask: AttentionMask, slopes, scale, tq, tk, interpret):
    """Padded inputs (whole blocks) -> out [B, K, G, Tp, D] float32 and log-sum-exp [B, K, G, Tp]."""
    B, K, G, Tp, D = q.shape
    N, Sp = kt.shape[0], kt.shape[2]
    zeros_k = jnp.zeros((B, Sp), jnp.int32)
    key_prefix = zeros_k if mask.key_prefix is None else mask.key_prefix.astype(jnp.int32)
    q_seg = jnp.zeros((B, Tp), jnp.int32) if mask.q_segment is None else mask.q_segment.astype(jnp.int32)
    k_seg = zeros_k if mask.k_segment is None else mask.k_segment.astype(jnp.int32)
    slopes = jnp.zeros((K, G), jnp.float32) if slopes is None else slopes.astype(jnp.float32)
    row = lambda n, i: (n // K, 0)  # noqa: E731  (per batch row, all key slots)
    q_row = lambda n, i: (n // K, i)  # noqa: E731  (per batch row, this query block)
    block = lambda n, i: (n, 0, i, 0)  # noqa: E731
    out, lse = pl.pallas_call(
        functools.partial(_kernel, scale=scale, tk=tk, n_kb=Sp // tk, causal=mask.causal,
                          has_prefix=mask.key_prefix is not None, has_segments=mask.q_segment is not None),
        out_shape=(jax.ShapeDtypeStruct((N, G, Tp, D), jnp.float32), jax.ShapeDtypeStruct((N, G, Tp), jnp.float32)),
        grid=(N, Tp // tq),
        in_specs=[
            pl.BlockSpec((1, G, tq, D), block),
            pl.BlockSpec((1, D, Sp), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((1, Sp, D), lambda n, i: (n, 0, 0)),
            pl.BlockSpec((1, tq), q_row),
            pl.BlockSpec((1, tq), q_row),
            pl.BlockSpec((1, Sp), lambda n, i: (0, 0)),
            pl.BlockSpec((1, Sp), row),
            pl.BlockSpec((1, Sp), row),
            pl.BlockSpec((1, Sp), row),
            pl.BlockSpec((1, G), lambda n, i: (n % K, 0)),
        ],
        out_specs=(pl.BlockSpec((1, G, tq, D), block), pl.BlockSpec((1, G, tq), lambda n, i: (n, 0, i))),
        interpret=interpret,
    )(q.reshape(N, G, Tp, D), kt, v, mask.q_slots.astype(jnp.int32), q_seg, mask.k_slots.astype(jnp.int32)[None],
      mask.key_valid.astype(jnp.int32), key_prefix, k_seg, slopes)
    return out.reshape(B, K, G, Tp, D), lse.reshape(B, K, G, Tp)


# the gradient: the blockwise kernel's flash backward from this kernel's output and log-sum-exp
_pallas_flash = flash_attention_vjp(_forward, precision_of=lambda interpret: None)


def pallas_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                     q_block: int = 64, k_block: int = 64, interpret: bool | None = None):
    """Same result as dense_attention: q [B, K, G, T, D], kt [B*K, D, S], v [B*K, S, D] -> [B, T, K, G, D].
    The forward pass is the Pallas kernel; gradients come from the blockwise kernel's flash backward.
    `interpret` defaults to True on CPU (Pallas compiles for accelerators only)."""
    del precision  # products accumulate in float32 inside the kernel
    T, S = q.shape[3], kt.shape[2]
    tq, tk = min(q_block, T), min(k_block, S)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    q, kt, v, padded = pad_to_blocks(q, kt, v, mask, tq, tk)
    slopes = None if slopes is None else jnp.asarray(slopes, jnp.float32)
    out = _pallas_flash(q, kt, v, padded, slopes, float(scale), tq, tk, bool(interpret))
    return jnp.moveaxis(out[:, :, :, :T], 3, 1).astype(dtype)
