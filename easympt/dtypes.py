"""Dtype names and backend-chosen defaults.

XLA's CPU bf16 matmuls are roughly ten times slower than float32, so the
default compute dtype follows the backend instead of a fixed guess.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NAMES = {
    "fp32": jnp.float32, "float32": jnp.float32, "f32": jnp.float32,
    "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
    "fp16": jnp.float16, "float16": jnp.float16, "f16": jnp.float16, "half": jnp.float16,
}


def default_compute_dtype(backend: str | None = None):
    """float32 on CPU, bfloat16 on GPU and TPU."""
    backend = backend or jax.default_backend()
    return jnp.float32 if backend == "cpu" else jnp.bfloat16


def resolve_dtype(dtype, what: str = "dtype"):
    """A jnp dtype from a dtype, a numpy dtype or a name such as 'bf16'; None stays None."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower()
        if key not in _NAMES:
            raise ValueError(f"{what} {dtype!r} is not one of {', '.join(sorted(_NAMES))}")
        return _NAMES[key]
    return jnp.dtype(dtype).type


def inference_dtypes(dtype=None) -> tuple:
    """(compute dtype, weight dtype) an inference model runs for a requested `dtype` (None: by backend).

    On CPU a bfloat16 request means 16-bit weights under float32 compute: XLA:CPU's bfloat16 matrix
    products run ~7x slower than float32 ones (one mpt-125m token: 252 vs 36.5 ms), while easympt's
    CPU kernels read bfloat16 weight panels at half the bytes and widen them exactly in registers
    (easympt.kernels.cpu). Elsewhere weights and compute share the dtype."""
    dtype = resolve_dtype(dtype) or default_compute_dtype()
    if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.bfloat16:
        return jnp.float32, jnp.bfloat16
    return dtype, dtype
