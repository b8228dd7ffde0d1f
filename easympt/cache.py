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


def storage_dtype(dtype):
    """What a cache of `dtype` is stored as: on CPU a bfloat16 cache is kept as its uint16 bits.
    XLA:CPU writes one slot of a bfloat16 buffer by converting the whole buffer (19 ms per update of
    a 75 MB cache, against 0.05 ms for the same update as uint16 or float32)."""
    if jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu":
        return jnp.uint16
    return dtype


def to_storage(x: jax.Array, dtype) -> jax.Array:
    """Keys or values `x` as a buffer of `dtype` stores them (see storage_dtype)."""
    if dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(dtype)


def readable(buffer: jax.Array) -> jax.Array:
    """A cache buffer as values: bfloat16 bits as bfloat16, anything else as it is."""
    return jax.lax.bitcast_convert_type(buffer, jnp.bfloat16) if buffer.dtype == jnp.uint16 else buffer


# logical axes of one layer's key (or value) buffer, as a memory plan counts them (easympt.plan);
# the buffers themselves merge batch and kv_heads into their first dimension (see KVCache)
CACHE_AXES = ("batch", "kv_heads", "kv_length", "head_dim")


@flax.struct.dataclass
class KVCache:
    """Keys are stored [B*K, D, S] and values [B*K, S, D] per layer: the layouts in which XLA's batched
    matrix-vector products read the cache with no copy, and batch and heads merged so the decode
    step reads the buffer it just wrote without a reshape (on XLA:CPU a reshape of an updated buffer
    cost a transposing copy of every layer's cache at every step; measured 10 ms of a 33 ms step at
    1,024 slots)."""

    keys: tuple  # per layer [B*K, D, S]: row b*K + k is batch row b, kv head k
    values: tuple  # per layer [B*K, S, D]
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
        rows, D = batch_size * config.kv_heads, config.head_dim
        dtype = storage_dtype(dtype)
        return cls(
            keys=tuple(jnp.zeros((rows, D, max_length), dtype) for _ in range(config.n_layers)),
            values=tuple(jnp.zeros((rows, max_length, D), dtype) for _ in range(config.n_layers)),
            key_valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((batch_size,), jnp.int32),
            n_tokens=jnp.zeros((batch_size,), jnp.int32),
        )


def write_layer(keys: jax.Array, values: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array):
    """New keys and values k, v [B, K, T, D] into one layer's buffers at slots index[b]..index[b]+T.

    One in-place update per batch row (a static loop: B is a compiled shape). The caller guarantees
    index + T <= S (dynamic_update_slice would clamp silently otherwise)."""
    B, K = k.shape[:2]
    for b in range(B):
        keys = jax.lax.dynamic_update_slice(keys, to_storage(k[b].transpose(0, 2, 1), keys.dtype), (b * K, 0, index[b]))
        values = jax.lax.dynamic_update_slice(values, to_storage(v[b], values.dtype), (b * K, index[b], 0))
    return keys, values


def cache_rows(slots: jax.Array, kv_heads: int) -> jax.Array:
    """Buffer rows [n*K] of batch rows `slots` [n] (a slot past the batch gives rows past the buffer)."""
    return (slots[:, None] * kv_heads + jnp.arange(kv_heads)).reshape(-1)


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
