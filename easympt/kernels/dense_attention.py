"""Dense attention: the whole [T, S] score matrix at once, the fastest kernel for short inputs and
for decode (a few queries over the cache). Layouts as easympt.kernels.mask describes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easympt.kernels.mask import AttentionMask, masked_scores, merged_heads

LONG_DECODE_SLOTS = 16384  # from here a decode step's values are read by a multiply-and-sum on CPU


def dense_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                    dropout=None):
    """The whole [T, S] score matrix at once: fastest for short inputs. `dropout(probs)` is applied
    to the probabilities when given (training with attn_pdrop)."""
    B, K = q.shape[:2]
    s = masked_scores(q, kt, mask, slopes, scale, (None, None), (None, None), precision)
    probs = jax.nn.softmax(s, axis=-1).astype(dtype)
    if dropout is not None:
        probs = dropout(probs)
    T, S = probs.shape[-2:]
    if probs.shape[2] * T == 1 and S >= LONG_DECODE_SLOTS and jax.default_backend() == "cpu":
        # one query over a long cache: XLA:CPU's batched [1, S] x [S, D] product reads the values at
        # half the bandwidth of a fused multiply-and-sum (65,536 slots: 14 vs 27 GB/s; measured)
        p = merged_heads(probs).reshape(-1, S, 1)  # [N, S, 1]: one query per row-and-head (G is 1)
        out = jnp.sum(p * v.astype(dtype), axis=1).reshape(B * K, 1, 1, -1)
    else:
        out = jnp.einsum("ngts,nsd->ngtd", merged_heads(probs), v.astype(dtype), precision=precision)
    return jnp.moveaxis(out.reshape(B, K, *out.shape[1:]), 3, 1)
