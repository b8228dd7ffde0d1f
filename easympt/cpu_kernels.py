"""easympt's CPU matrix product for inference, on weights packed in 48-column panels.

A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
weights. XLA:CPU reads a [K, N] matrix at ~25 GB/s for one row and ~15 GB/s for eight (its small-M
GEMM runs at ~62 GFLOP/s on a 2-core AVX-512 machine whose memory gives ~33 GB/s). Packed as
[ceil(N / 48), K, 48], each panel is one contiguous stream, and the kernel in csrc/cpu_kernels.cc
reads it once for up to eight rows at the memory bandwidth; for prompts (hundreds of rows) it is as
fast as XLA's dot (measured in the README, "CPU kernel").

The kernel is a shared library built at install time (optional: no compiler, no kernel) and
registered as an XLA FFI target; it needs x86-64 with AVX-512F. Packing is for inference: the
GenerationEngine packs its copy of the weights when `available()`; training keeps [K, N] weights.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp

PANEL = 48  # columns per packed panel (three AVX-512 vectors of float32)
TARGET = "easympt_packed_matmul"


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
    if _library() is None:
        raise RuntimeError("packed weights need easympt's CPU kernel, which is not built here or needs AVX-512F "
                           "(reinstall easympt with a C++ compiler, or run unpacked: cpu_kernels=False)")
    assert x.ndim == 2 and packed.shape == packed_shape(x.shape[1], n), (x.shape, packed.shape, n)
    if x.dtype != jnp.float32 or packed.dtype != jnp.float32:
        raise TypeError(f"the CPU kernel is float32 only, got {x.dtype} @ {packed.dtype}")
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def pack_params(params: dict) -> dict:
    """A causal LM's parameters with every dense kernel [K, N] packed, and the token embedding [V, E]
    packed as the tied head reads it (its transpose): the tree a `packed=True` module expects."""

    def leaf(path, x):
        names = tuple(getattr(k, "key", k) for k in path)
        if names[-1] == "kernel" and x.ndim == 2:
            return _pack_jit(x)
        if names[-2:] == ("wte", "embedding"):
            return _pack_jit(x.T)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


_pack_jit = jax.jit(pack)


def unpack_params(packed: dict, like: dict) -> dict:
    """The inverse of `pack_params`; `like` gives the plain shapes (e.g. the plain module's eval_shape)."""

    def leaf(path, x, want):
        if x.shape == want.shape:
            return x
        names = tuple(getattr(k, "key", k) for k in path)
        if names[-2:] == ("wte", "embedding"):
            return unpack(x, want.shape[0]).T
        return unpack(x, want.shape[1])

    return jax.tree_util.tree_map_with_path(leaf, packed, like)


def check_packed(params: dict, expected: dict) -> None:
    """Packed params against the packed module's own tree: same keys, same shapes."""
    got = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    wrong = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    if wrong:
        raise ValueError(f"packed parameters do not match the packed model (got, want): {wrong}")
