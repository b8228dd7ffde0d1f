"""easympt's CPU kernels for inference: weight products on weights packed in 48-column panels, and
decode attention over the slots each row holds.

A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
weights. XLA:CPU reads a [K, N] matrix at ~25 GB/s for one row and ~15 GB/s for eight (its small-M
GEMM runs at ~62 GFLOP/s on a 2-core AVX-512 machine whose memory gives ~30 GB/s). Packed as
[ceil(N / 48), K, 48], each panel is one contiguous stream, and the kernel in csrc/cpu_kernels.cc
reads it once for up to eight rows at about the memory bandwidth; for prompts (hundreds of rows) it
is as fast as XLA's dot. XLA's decode attention reads every slot of the cache bucket (a batch of
rows holding 100 of 256 slots reads 256; windows cost a copy); the attention kernel reads slots
0..position of each row and skips the rest. Figures: README, "CPU kernels".

The kernels are a shared library built at install time (optional: no compiler, no kernels) and
registered as XLA FFI targets; they need x86-64 with AVX-512F. They are for inference: the
GenerationEngine uses them when `available()`; training keeps XLA and [K, N] weights.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

from easympt.sharding import path_str

PANEL = 48  # columns per packed panel (three AVX-512 vectors of float32)
TARGET = "easympt_packed_matmul"
ATTENTION_TARGET = "easympt_decode_attention"


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, registered with XLA once; None where it was not built or the CPU lacks AVX-512F."""
    spec = importlib.util.find_spec("easympt._cpu_kernels")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.cdll.LoadLibrary(spec.origin)
    if not lib.EasymptCpuKernelSupported():
        return None
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EasymptPackedMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(lib.EasymptDecodeAttention), platform="cpu")
    return lib


def available() -> bool:
    """Whether packed weights can run here: JAX on CPU, the kernel built for this CPU, and not switched
    off with EASYMPT_CPU_KERNELS=0."""
    if os.environ.get("EASYMPT_CPU_KERNELS", "1") == "0":
        return False
    return jax.default_backend() == "cpu" and _library() is not None


def packed_shape(k: int, n: int) -> tuple[int, int, int]:
    return -(-n // PANEL), k, PANEL


def pack(w: jax.Array) -> jax.Array:
    """[K, N] -> [ceil(N/48), K, 48]: panel p holds columns 48p..48p+47 (zero past N), row by row."""
    K, N = w.shape
    panels = packed_shape(K, N)[0]
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - N)))
    return w.reshape(K, panels, PANEL).transpose(1, 0, 2)


def unpack(packed: jax.Array, n: int) -> jax.Array:
    """The inverse of `pack`: [K, n]."""
    panels, K, _ = packed.shape
    return packed.transpose(1, 0, 2).reshape(K, panels * PANEL)[:, :n]


def packed_rows(packed: jax.Array, rows: jax.Array) -> jax.Array:
    """Rows `rows` [...] of the unpacked matrix's transpose, i.e. columns of W: [..., K] (an embedding
    lookup in a table packed for the tied LM head)."""
    return packed[rows // PANEL, :, rows % PANEL]


def packed_matmul(x: jax.Array, packed: jax.Array, n: int) -> jax.Array:
    """x [M, K] float32 @ W [K, n], with W given packed: [M, n] float32."""
    _require_kernel()
    assert x.ndim == 2 and packed.shape == packed_shape(x.shape[1], n), (x.shape, packed.shape, n)
    if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise TypeError(f"the CPU kernel is float32 only, got {x.dtype} @ {packed.dtype}")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def _require_kernel():
    if _library() is None:
        raise RuntimeError("easympt's CPU kernels are not built here or need AVX-512F (reinstall easympt with a "
                           "C++ compiler, or run without them: cpu_kernels=False)")


# what the attention kernel reads: float32, or bfloat16 (half the bytes), also as its uint16 bits (easympt.cache)
CACHE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.uint16)


def decodes(q: jax.Array, kt: jax.Array, mask, dropout) -> bool:
    """Whether `decode_attention` takes this attention: one new token per row over a float32 or
    bfloat16 cache (causal, no prefix or packed documents), float32 queries, a head size of whole
    vectors, no dropout."""
    return (q.shape[3] == 1 and q.shape[-1] % 16 == 0 and q.dtype == jnp.float32 and kt.dtype in CACHE_DTYPES
            and dropout is None and mask.causal and mask.key_prefix is None and mask.q_segment is None)


def decode_attention(q, kt, v, mask, slopes, scale: float) -> jax.Array:
    """One query per row and head over the slots each row holds (slots 0..q_slot that are valid):
    easympt.attention's dense decode without reading the rest of the cache. q [B, K, G, 1, D],
    kt [B*K, D, S], v [B*K, S, D] (easympt.cache: float32 or bfloat16 bits), slopes [K, G] or None
    -> [B, 1, K, G, D] float32."""
    _require_kernel()
    B, K, G, _, D = q.shape
    slopes = jnp.zeros((K * G,), jnp.float32) if slopes is None else slopes.reshape(-1).astype(jnp.float32)
    out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct((B * K, G, D), jnp.float32))(
        q.reshape(B * K, G, D), kt, v.astype(kt.dtype), mask.q_slots[:, 0].astype(jnp.int32),
        mask.key_valid, slopes, scale=np.float32(scale))
    return out.reshape(B, 1, K, G, D)


_pack_jit = jax.jit(pack)


def _is_embedding(path) -> bool:
    return path_str(path).split("/")[-2:] == ["wte", "embedding"]


def pack_params(params: dict) -> dict:
    """A causal LM's parameters with every dense kernel [K, N] packed, and the token embedding [V, E]
    packed as the tied head reads it (its transpose): the tree a `cpu_kernels=True` module expects."""

    def leaf(path, x):
        if path_str(path).split("/")[-1] == "kernel" and x.ndim == 2:
            return _pack_jit(x)
        if _is_embedding(path):
            return _pack_jit(x.T)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def unpack_params(packed: dict, like: dict) -> dict:
    """The inverse of `pack_params`; `like` gives the plain shapes (e.g. the plain module's eval_shape)."""

    def leaf(path, x, want):
        if x.shape == want.shape:
            return x
        if _is_embedding(path):
            return unpack(x, want.shape[0]).T
        return unpack(x, want.shape[1])

    return jax.tree_util.tree_map_with_path(leaf, packed, like)


def check_packed(params: dict, expected: dict) -> None:
    """Packed params against the packed module's own tree: same keys, same shapes."""
    got = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    wrong = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    if wrong:
        raise ValueError(f"packed parameters do not match the packed model (got, want): {wrong}")
