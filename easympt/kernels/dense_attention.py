"""Dense attention: the whole [T, S] score matrix at once, the fastest kernel for short inputs and
for decode (a few queries over the cache). Layouts as easympt.kernels.mask describes them.

Its backward pass is written out (custom VJP) rather than left to autodiff: differentiating the
scores' product against keys in the cache's [N, D, S] layout gave XLA:CPU key and value gradients
that contract over the query axis of both operands, which it ran as slow transposing products
(with the softmax backward fused into another), ~45% of a training step's attention time. Here
every product of the backward is a plain batched matrix product, the probabilities and gradients
transposed once where one needs it, and the softmax backward uses flash attention's row term
sum(dout * out) instead of a pass over [T, S].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from easympt.kernels.mask import AttentionMask, masked_scores, merged_heads

LONG_DECODE_SLOTS = 16384  # from here a decode step's values are read by a multiply-and-sum on CPU


def dense_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                    dropout=None):
    """The whole [T, S] score matrix at once: fastest for short inputs. `dropout(probs)` is applied
    to the probabilities when given (training with attn_pdrop; autodiff's backward then)."""
    T, S = q.shape[3], kt.shape[2]
    if q.shape[2] * T == 1 and S >= LONG_DECODE_SLOTS and jax.default_backend() == "cpu":
        # one query over a long cache: XLA:CPU's batched [1, S] x [S, D] product reads the values at
        # half the bandwidth of a fused multiply-and-sum (65,536 slots: 14 vs 27 GB/s; measured)
        probs = _probs(q, kt, mask, slopes, scale, precision).astype(dtype)
        p = merged_heads(probs).reshape(-1, S, 1)  # [N, S, 1]: one query per row-and-head (G is 1)
        out = jnp.sum(p * v.astype(dtype), axis=1).reshape(q.shape[0] * q.shape[1], 1, 1, -1)
        return _heads_last(out, q.shape[1])
    if dropout is not None:
        return _weighted_values(dropout(_probs(q, kt, mask, slopes, scale, precision).astype(dtype)), v, dtype,
                                precision)
    return _attention(q, kt, v, mask, slopes, scale, precision, dtype)


def _probs(q, kt, mask, slopes, scale, precision):
    """Softmax of the masked, biased scores: [B, K, G, T, S] float32."""
    return jax.nn.softmax(masked_scores(q, kt, mask, slopes, scale, (None, None), (None, None), precision), axis=-1)


def _weighted_values(probs, v, dtype, precision):
    """probs [B, K, G, T, S] x v [N, S, D] -> out [B, T, K, G, D]."""
    out = jnp.einsum("ngts,nsd->ngtd", merged_heads(probs), v.astype(dtype), precision=precision)
    return _heads_last(out, probs.shape[1])


def _heads_last(out, K):
    """[N, G, T, D] -> [B, T, K, G, D]."""
    return jnp.moveaxis(out.reshape(out.shape[0] // K, K, *out.shape[1:]), 3, 1)


def _heads_first(x):
    """[B, T, K, G, D] -> [N, G, T, D] (float32)."""
    return merged_heads(jnp.moveaxis(x, 1, 3)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, kt, v, mask, slopes, scale, precision, dtype):
    return _attention_forward(q, kt, v, mask, slopes, scale, precision, dtype)[0]


def _attention_forward(q, kt, v, mask, slopes, scale, precision, dtype):
    probs = _probs(q, kt, mask, slopes, scale, precision)
    out = _weighted_values(probs.astype(dtype), v, dtype, precision)
    return out, (q, kt, v, mask, slopes, probs, out)


def _attention_backward(scale, precision, dtype, res, dout):
    """dq, dkt, dv from the saved probabilities p: dv = p^T do, dp = do v^T, ds = p (dp - rowsum(do o))
    on the allowed slots, dq = ds k, dk = ds^T q (per row-and-head, summed over the G query heads of a
    kv head)."""
    q, kt, v, mask, slopes, probs, out = res
    f32 = jnp.float32
    do, o = _heads_first(dout), _heads_first(out)  # [N, G, T, D]
    p = merged_heads(probs)  # [N, G, T, S]
    dv = jnp.einsum("ngst,ngtd->nsd", jnp.swapaxes(p, 2, 3), do, precision=precision)
    dp = jnp.einsum("ngtd,nsd->ngts", do, v.astype(f32), precision=precision)
    ds = p * (dp - jnp.sum(do * o, axis=-1, keepdims=True)) * scale
    # a query that sees no key (padding) has uniform probabilities over masked slots; their scores
    # are constants, so no gradient flows through them (as autodiff of the mask's `where` has it)
    ds = merged_heads(jnp.where(mask.allowed()[:, :, None], ds.reshape(probs.shape), 0.0))
    dq = jnp.einsum("ngts,nds->ngtd", ds, kt.astype(f32), precision=precision)
    qm = merged_heads(q).astype(f32)  # [N, G, T, D]
    dk = jnp.einsum("ngst,ngtd->nsd", jnp.swapaxes(ds, 2, 3), qm, precision=precision)
    zero_mask = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)  # ints and bools
    # the barrier keeps XLA from folding the transpose into the product (a slow [N, D, S] one again)
    dkt = jnp.swapaxes(jax.lax.optimization_barrier(dk), 1, 2)
    return (dq.reshape(q.shape).astype(q.dtype), dkt.astype(kt.dtype), dv.astype(v.dtype),
            zero_mask, None if slopes is None else jnp.zeros_like(slopes))


_attention.defvjp(_attention_forward, _attention_backward)
