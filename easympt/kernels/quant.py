"""8- and 4-bit weight formats: quantizing a float matrix, and reading it back.

Weight-only, symmetric, as llama.cpp's Q8_0 / Q4_0 and MaxText's int8 weights are:
- `int8`: one float32 scale per output channel; q = round(w / s), s = max|w| / 127 over the input
  dimension. A dense kernel [K, N] gives int8 [K, N] and scale [1, N]; the embedding [V, E] (the tied
  LM head's [E, V] transposed) gives int8 [V, E] and scale [V, 1].
- `int4`: a bfloat16 scale per group of 32 input rows and output column (llama.cpp's Q4_0 blocks):
  d = m / -8 where m is the group's value of largest magnitude, q = clip(round(w / d) + 8, 0, 15),
  two values per byte: kernel uint8 [K/2, N] (row 2i in the low nibble of byte i, row 2i + 1 in the
  high one) and scale [K/32, N]. The embedding is at most int8 (its rows are looked up one at a time
  and the head's error lands straight on the logits), so an int4 model keeps an int8 embedding.

A scale has the matrix's rank, with size 1 along a dimension it does not vary over, so it shards by
the matrix's own partition rule (easympt.sharding). Norms and biases stay float.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

FORMATS = ("int8", "int4")
GROUP = 32  # int4: input rows per scale


def check_format(quantize: str | None) -> str | None:
    """`quantize` if it names a weight format easympt implements (None: float weights), else a ValueError."""
    if quantize is None or quantize in FORMATS:
        return quantize
    raise ValueError(f"quantize={quantize!r} is not one of {', '.join(FORMATS)} (or None for float weights)")


def embedding_format(quantize: str | None) -> str | None:
    """The embedding's format in a model of weight format `quantize`: at most int8."""
    return None if quantize is None else "int8"


def check_int4_shape(shape, name: str = "matrix") -> None:
    K = shape[0]
    if K % GROUP:
        raise ValueError(f"int4 weights group {GROUP} input rows per scale: {name} {tuple(shape)} has {K} input rows, "
                         f"not a multiple of {GROUP}; quantize it as int8")


def quantized_shapes(quantize: str, shape, axis: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays a float matrix of `shape` becomes ({"q": ..., "scale": ...}); `axis`: the input
    (reduced) dimension, 0 for a dense kernel [K, N], 1 for an embedding [V, E] (int8 only)."""
    shape = tuple(shape)
    if quantize == "int8":
        scale = tuple(1 if i == axis else n for i, n in enumerate(shape))
        return {"q": jax.ShapeDtypeStruct(shape, jnp.int8), "scale": jax.ShapeDtypeStruct(scale, jnp.float32)}
    check_int4_shape(shape)
    K, N = shape
    return {"q": jax.ShapeDtypeStruct((K // 2, N), jnp.uint8),
            "scale": jax.ShapeDtypeStruct((K // GROUP, N), jnp.bfloat16)}


@functools.partial(jax.jit, static_argnames=("axis",))
def quantize_int8(w: jax.Array, axis: int = 0) -> tuple[jax.Array, jax.Array]:
    """w -> (int8 q, float32 scale) with w ~ q * scale; one scale per slice along `axis`."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axis, keepdims=True) / 127.0
    q = jnp.round(w / jnp.where(scale == 0, 1.0, scale))
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


@jax.jit
def quantize_int4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w [K, N] (K a multiple of 32) -> (uint8 [K/2, N] nibble pairs, bfloat16 scale [K/32, N])."""
    K, N = w.shape
    g = w.astype(jnp.float32).reshape(K // GROUP, GROUP, N)
    biggest = jnp.take_along_axis(g, jnp.argmax(jnp.abs(g), axis=1)[:, None], axis=1)  # signed, [K/32, 1, N]
    d = (biggest / -8.0).astype(jnp.bfloat16)  # rounded first: q is chosen for the scale that is stored
    df = d.astype(jnp.float32)
    q = jnp.clip(jnp.round(g / jnp.where(df == 0, 1.0, df)) + 8, 0, 15).astype(jnp.uint8).reshape(K, N)
    return q[0::2] | (q[1::2] << 4), d[:, 0]


def quantize(w: jax.Array, quantize: str, axis: int = 0) -> dict[str, jax.Array]:
    """A float matrix in format `quantize`: {"q", "scale"} (see the module docstring)."""
    if quantize == "int8":
        q, scale = quantize_int8(w, axis=axis)
    else:
        check_int4_shape(w.shape)
        q, scale = quantize_int4(w)
    return {"q": q, "scale": scale}


def int4_values(q: jax.Array) -> jax.Array:
    """uint8 [K/2, N] nibble pairs -> int32 [K, N] values q - 8 in [-8, 7]."""
    lo = (q & 15).astype(jnp.int32) - 8
    hi = (q >> 4).astype(jnp.int32) - 8
    return jnp.stack([lo, hi], axis=1).reshape(2 * q.shape[0], *q.shape[1:])


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The float matrix a quantized one stands for, in `dtype` (int8 or int4 by q's dtype)."""
    if q.dtype == jnp.int8:
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    if q.dtype != jnp.uint8:
        raise TypeError(f"quantized weights are int8 or uint8 (int4 pairs), got {q.dtype}")
    v = int4_values(q)
    K, N = v.shape
    w = v.reshape(K // GROUP, GROUP, N).astype(jnp.float32) * scale.astype(jnp.float32)[:, None, :]
    return w.reshape(K, N).astype(dtype)
