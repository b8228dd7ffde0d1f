"""The KV cache: one preallocated buffer per layer plus per-row bookkeeping.

Every row (decode slot) has its own write index, so rows of different
lengths share one batch and a finished row can be refilled without touching
the others (continuous batching). Slots are absolute positions in the buffer;
ALiBi only needs their differences, so left padding costs nothing but masked
slots.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


# logical axes of one layer's key (or value) buffer, mapped to mesh axes by easympt.sharding
CACHE_AXES = ("batch", "kv_heads", "kv_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    keys: tuple  # per layer [B, K, S, D]: heads-major, so attention reads each head contiguously
    values: tuple  # per layer [B, K, S, D]
    key_valid: jax.Array  # [B, S] bool: slot holds a real (non-padding) token
    index: jax.Array  # [B] int32: next slot to write
    n_tokens: jax.Array  # [B] int32: real tokens seen so far (learned position ids)

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    @property
    def max_length(self) -> int:
        return self.key_valid.shape[1]

    @classmethod
    def zeros(cls, config, batch_size: int, max_length: int, dtype=jnp.float32) -> KVCache:
        shape = (batch_size, config.kv_heads, max_length, config.head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)),
            key_valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((batch_size,), jnp.int32),
            n_tokens=jnp.zeros((batch_size,), jnp.int32),
        )


def write_rows(buffer: jax.Array, update: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """Write update[b] into buffer[b] at slot index[b] along `axis`, for every row b.

    buffer [B, ..., S, ...], update [B, ..., T, ...] (slots on `axis`), index [B].
    The caller guarantees index + T <= S (dynamic_update_slice would clamp
    silently otherwise).
    """

    def one(buf, upd, i):
        start = tuple(i if d == axis - 1 else 0 for d in range(buf.ndim))
        return jax.lax.dynamic_update_slice(buf, upd.astype(buf.dtype), start)

    return jax.vmap(one)(buffer, update, index)
