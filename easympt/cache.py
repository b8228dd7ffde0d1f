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

from easympt.dtypes import resolve_dtype

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


def resolve_kv_dtype(dtype, what: str = "kv_dtype"):
    """A KV-cache dtype: a float dtype or name (easympt.dtypes), or int8 (Int8Slots); None stays None."""
    if dtype is None:
        return None
    if (dtype.lower() == "int8") if isinstance(dtype, str) else jnp.dtype(dtype) == jnp.int8:
        return jnp.int8
    try:
        return resolve_dtype(dtype, what)
    except ValueError:
        raise ValueError(f"{what} {dtype!r} is not one of {', '.join(KV_DTYPES)} (or their short names: fp32, "
                         "bf16, fp16)") from None


@flax.struct.dataclass
class Int8Slots:
    """An 8-bit cache buffer: int8 keys or values with one float32 scale per slot and KV head, as
    MaxText's KV quantization keeps them (symmetric, scale = max |x| / 127 over the head's D values).

    `scale` has the buffer's rank with the head dimension kept as 1 (keys [N, 1, S] for q [N, D, S],
    values [N, S, 1] for q [N, S, D]), so slicing or updating slots of both reads the same indices.
    A scale costs 4 bytes per D bytes of int8 (D = 64: 6%)."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    @classmethod
    def zeros(cls, shape, head_axis: int) -> Int8Slots:
        scale_shape = tuple(1 if i == head_axis else n for i, n in enumerate(shape))
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(scale_shape, jnp.float32))

    @classmethod
    def quantize(cls, x: jax.Array, head_axis: int) -> Int8Slots:
        """x (float) rounded to int8 with a scale per slot over `head_axis`."""
        x = x.astype(jnp.float32)
        scale = jnp.max(jnp.abs(x), axis=head_axis, keepdims=True) / 127.0
        q = jnp.round(x / jnp.where(scale == 0, 1.0, scale))
        return cls(jnp.clip(q, -127, 127).astype(jnp.int8), scale)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def update_slots(buffer, x: jax.Array, start: tuple, head_axis: int):
    """`buffer` (an array or Int8Slots) with float keys or values `x` written at `start`."""
    if isinstance(buffer, Int8Slots):
        new = Int8Slots.quantize(x, head_axis)
        return Int8Slots(jax.lax.dynamic_update_slice(buffer.q, new.q, start),
                         jax.lax.dynamic_update_slice(buffer.scale, new.scale, start))
    return jax.lax.dynamic_update_slice(buffer, to_storage(x, buffer.dtype), start)


def slots(buffer, index):
    """buffer[index] for an array or both halves of Int8Slots (index must keep the head axis whole)."""
    return jax.tree_util.tree_map(lambda a: a[index], buffer)


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


def readable(buffer) -> jax.Array:
    """A cache buffer as values: bfloat16 bits as bfloat16, int8 slots as float32 (XLA's path reads a
    dequantized copy; easympt's CPU decode kernel reads the int8 buffer itself), anything else as it is."""
    if isinstance(buffer, Int8Slots):
        return buffer.dequantize()
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

    keys: tuple  # per layer [B*K, D, S]: row b*K + k is batch row b, kv head k (int8: Int8Slots)
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
        if jnp.dtype(dtype) == jnp.int8:
            keys = tuple(Int8Slots.zeros((rows, D, max_length), 1) for _ in range(config.n_layers))
            values = tuple(Int8Slots.zeros((rows, max_length, D), 2) for _ in range(config.n_layers))
        else:
            dtype = storage_dtype(dtype)
            keys = tuple(jnp.zeros((rows, D, max_length), dtype) for _ in range(config.n_layers))
            values = tuple(jnp.zeros((rows, max_length, D), dtype) for _ in range(config.n_layers))
        return cls(
            keys=keys,
            values=values,
            key_valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((batch_size,), jnp.int32),
            n_tokens=jnp.zeros((batch_size,), jnp.int32),
        )


def write_layer(keys, values, k: jax.Array, v: jax.Array, index: jax.Array):
    """New keys and values k, v [B, K, T, D] into one layer's buffers at slots index[b]..index[b]+T.

    One in-place update per batch row (a static loop: B is a compiled shape). The caller guarantees
    index + T <= S (dynamic_update_slice would clamp silently otherwise)."""
    B, K = k.shape[:2]
    for b in range(B):
        keys = update_slots(keys, k[b].transpose(0, 2, 1), (b * K, 0, index[b]), head_axis=1)
        values = update_slots(values, v[b], (b * K, index[b], 0), head_axis=2)
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
