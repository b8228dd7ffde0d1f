"""Which key slots each query sees, kept per token (O(T + S)), never materialised as [T, S]: every
attention kernel builds the [tq, tk] piece it needs from an `AttentionMask`.

Shapes: B batch, K kv heads, G query heads per kv head, T queries, S key slots, D head dim,
N = B * K (the KV cache's merged batch-and-heads dimension).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

NEG = float(jnp.finfo(jnp.float32).min)  # the score of a masked slot (as transformers and the dense path use)


@flax.struct.dataclass
class AttentionMask:
    """Which key slots each query may attend, kept per token rather than per pair.

    q_slots [B, T] and k_slots [S] are absolute positions (ALiBi distances and causality);
    key_valid [B, S] marks real keys; key_prefix [B, S] marks prefix-LM keys every query of its
    row may see; q_segment [B, T] / k_segment [B, S] keep packed documents apart.
    """

    q_slots: jax.Array
    k_slots: jax.Array
    key_valid: jax.Array
    key_prefix: jax.Array | None = None
    q_segment: jax.Array | None = None
    k_segment: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=True)

    def allowed(self, q: slice | tuple = (None, None), k: slice | tuple = (None, None)) -> jax.Array:
        """[B, 1, tq, tk] bool for queries q = (start, size) and keys k = (start, size) (None: all)."""
        qs = _take(self.q_slots, q, axis=1)
        ks = _take(self.k_slots, k, axis=0)
        allowed = _take(self.key_valid, k, axis=1)[:, None, :]
        if self.causal or self.key_prefix is not None:
            order = ks[None, None, :] <= qs[:, :, None]
            if self.key_prefix is not None:
                order = order | _take(self.key_prefix, k, axis=1)[:, None, :]
            allowed = allowed & order
        if self.q_segment is not None:
            allowed = allowed & (_take(self.q_segment, q, axis=1)[:, :, None]
                                 == _take(self.k_segment, k, axis=1)[:, None, :])
        return allowed[:, None]

    def distance(self, q=(None, None), k=(None, None)) -> jax.Array:
        """|q_slot - k_slot| as float32 [B, tq, tk]: ALiBi's distance."""
        qs = _take(self.q_slots, q, axis=1)
        ks = _take(self.k_slots, k, axis=0)
        return jnp.abs(qs[:, :, None] - ks[None, None, :]).astype(jnp.float32)


def _take(x, window, axis):
    start, size = window
    if start is None:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def merged_heads(x):
    """[B, K, ...] -> [B*K, ...]: the cache's merged batch-and-heads dimension."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def masked_scores(q, kt, mask: AttentionMask, slopes, scale, qw, kw, precision):
    """Masked, biased scores of one block: q [B, K, G, tq, D], kt [N, D, tk] -> [B, K, G, tq, tk] f32."""
    B, K = q.shape[:2]
    s = jnp.einsum("ngqd,nds->ngqs", merged_heads(q), kt.astype(q.dtype), precision=precision,
                   preferred_element_type=jnp.float32) * scale
    s = s.reshape(B, K, *s.shape[1:])
    if slopes is not None:  # slopes [K, G]
        s = s - slopes[None, :, :, None, None] * mask.distance(qw, kw)[:, None, None]
    return jnp.where(mask.allowed(qw, kw)[:, :, None], s, NEG)
