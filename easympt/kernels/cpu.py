"""easympt's CPU kernels for inference, the Python side: which instruction set runs, the packed-panel
weight product and decode attention over the slots each row holds.

A decode step multiplies a few rows by every weight matrix once, so it is bound by reading the
weights. XLA:CPU reads a [K, N] matrix at ~25 GB/s for one row and ~15 GB/s for eight (its small-M
GEMM runs at ~62 GFLOP/s on a 2-core AVX-512 machine whose memory gives ~30 GB/s). Packed as
[ceil(N / 48), K, 48], each panel is one contiguous stream, and the kernel (csrc/cpu_kernels.inc)
reads it once for all rows at about the memory bandwidth. XLA's decode attention reads every slot of
the cache bucket; the attention kernel reads slots 0..position of each row and skips the rest.
Figures: README, "CPU kernels".

One C++ source is built at install time into a shared library per instruction set: `avx512`
(AVX-512F), `avx2` (AVX2 + FMA, x86-64-v3) and `portable` (the compiler's baseline: SSE2 on
x86-64, NEON on aarch64). The best one the CPU runs is chosen at run time (cpuid, asked of the
portable library), never by the flags of the machine that built the wheel; `EASYMPT_CPU_ISA`
forces one, `EASYMPT_CPU_KERNELS=0` turns them off. Each library registers its own XLA FFI
targets, so every path can be called (and tested) in one process. The kernels are for inference:
the GenerationEngine uses them when `available()`; training keeps XLA and [K, N] weights.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 48  # columns per packed panel (three AVX-512 vectors of float32; the layout on every ISA)
ISAS = ("avx512", "avx2", "portable")  # best first
ISA_ENV = "EASYMPT_CPU_ISA"


def _library_path(isa: str) -> str | None:
    """Where the library built for `isa` is installed (setup.py: easympt.kernels._cpu_<isa>), or None."""
    spec = importlib.util.find_spec(f"easympt.kernels._cpu_{isa}")  # found, not imported: no Python module
    return None if spec is None else spec.origin


@functools.cache
def _load(isa: str) -> ctypes.CDLL | None:
    """The library built for `isa`, its FFI targets registered with XLA once; None where it was not built."""
    path = _library_path(isa)
    if path is None:
        return None
    lib = ctypes.CDLL(path)  # RTLD_LOCAL: each ISA's library keeps its own symbols
    jax.ffi.register_ffi_target(_target("packed_matmul", isa), jax.ffi.pycapsule(lib.EasymptPackedMatmul),
                                platform="cpu")
    jax.ffi.register_ffi_target(_target("packed_matmul_quant", isa), jax.ffi.pycapsule(lib.EasymptPackedMatmulQuant),
                                platform="cpu")
    jax.ffi.register_ffi_target(_target("decode_attention", isa), jax.ffi.pycapsule(lib.EasymptDecodeAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(_target("decode_attention_int8", isa),
                                jax.ffi.pycapsule(lib.EasymptDecodeAttentionInt8), platform="cpu")
    return lib


def _target(kernel: str, isa: str) -> str:
    return f"easympt_{kernel}_{isa}"


@functools.cache
def built_isas() -> tuple[str, ...]:
    """The instruction sets whose library was built and which this CPU runs, best first. Only the
    portable library is asked (its code runs anywhere); the others are loaded only once chosen."""
    portable = _load("portable")
    if portable is None:
        return ()
    portable.EasymptCpuSupports.argtypes = [ctypes.c_char_p]
    return tuple(isa for isa in ISAS if portable.EasymptCpuSupports(isa.encode()) and _library_path(isa))


def active_isa() -> str | None:
    """The instruction set the kernels run with here: `EASYMPT_CPU_ISA` when set (an error if this
    CPU or build lacks it), else the best of `built_isas()`; None when none is built or JAX is not on
    CPU or `EASYMPT_CPU_KERNELS=0`."""
    if os.environ.get("EASYMPT_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return None
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        return check_isa(forced)
    isas = built_isas()
    return isas[0] if isas else None


def check_isa(isa: str) -> str:
    """`isa` if its kernels run here, else a ValueError naming what is missing."""
    if isa not in ISAS:
        raise ValueError(f"{ISA_ENV}={isa!r} is not one of {', '.join(ISAS)}")
    if isa not in built_isas():
        raise ValueError(f"{ISA_ENV}={isa!r}: easympt's {isa} CPU kernels are not built here or this CPU lacks "
                         f"the instruction set (available: {', '.join(built_isas()) or 'none'})")
    return isa


def available() -> bool:
    """Whether packed weights can run here: JAX on CPU, a kernel library built for this CPU, and not
    switched off with EASYMPT_CPU_KERNELS=0."""
    return active_isa() is not None


def _kernel_isa(isa: str | None) -> str:
    """The library a call runs: `isa` when given (tests run every path), else the active one."""
    chosen = check_isa(isa) if isa is not None else active_isa()
    if chosen is None:
        raise RuntimeError("easympt's CPU kernels are not built here (reinstall easympt with a C++ compiler) or are "
                           "off (EASYMPT_CPU_KERNELS=0); run without them: cpu_kernels=False")
    _load(chosen)
    return chosen


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


# what the weight product reads: float32, or bfloat16 panels (half the bytes), widened exactly in registers
WEIGHT_DTYPES = (jnp.float32, jnp.bfloat16)


def packed_matmul(x: jax.Array, packed: jax.Array, n: int, isa: str | None = None) -> jax.Array:
    """x [M, K] float32 @ W [K, n], with W given packed (float32 or bfloat16): [M, n] float32. `isa`:
    the instruction set's library to run (default: the active one)."""
    target = _target("packed_matmul", _kernel_isa(isa))
    assert x.ndim == 2 and packed.shape == packed_shape(x.shape[1], n), (x.shape, packed.shape, n)
    if x.dtype != jnp.float32 or packed.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"the CPU kernel multiplies float32 rows by float32 or bfloat16 weights, got {x.dtype} @ "
                        f"{packed.dtype}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed)


def packed_matmul_quant(x: jax.Array, packed: jax.Array, scale: jax.Array, n: int, isa: str | None = None) -> jax.Array:
    """x [M, K] float32 @ W [K, n], W given in 8 or 4 bits packed by easympt.kernels.linear.pack_quantized:
    int8 panels [ceil(n/48), K, 48] with float32 scales [1, 48 * panels], or int4 pairs uint8
    [ceil(n/48), K/2, 48] with bfloat16 scales [ceil(n/48), K/32, 48] -> [M, n] float32."""
    target = _target("packed_matmul_quant", _kernel_isa(isa))
    panels, K = packed_shape(x.shape[1], n)[:2]
    rows = K if packed.dtype == jnp.int8 else K // 2
    assert x.ndim == 2 and packed.shape == (panels, rows, PANEL), (x.shape, packed.shape, n)
    if x.dtype != jnp.float32 or packed.dtype not in (jnp.int8, jnp.uint8):
        raise TypeError(f"the CPU kernel multiplies float32 rows by int8 or int4 (uint8 pairs) weights, got "
                        f"{x.dtype} @ {packed.dtype}")
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, packed, scale)


# what the attention kernel reads: float32, or bfloat16 (half the bytes), also as its uint16 bits (easympt.cache),
# or int8 slots with a float32 scale each (easympt.cache.Int8Slots: a quarter of float32's bytes)
CACHE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.uint16, jnp.int8)


def decodes(q: jax.Array, kt, mask, dropout) -> bool:
    """Whether `decode_attention` takes this attention: one new token per row over a float32, bfloat16
    or int8 cache (causal, no prefix or packed documents), float32 queries, a head size of whole
    vectors, no dropout."""
    return (q.shape[3] == 1 and q.shape[-1] % 16 == 0 and q.dtype == jnp.float32 and kt.dtype in CACHE_DTYPES
            and dropout is None and mask.causal and mask.key_prefix is None and mask.q_segment is None)


def decode_attention(q, kt, v, mask, slopes, scale: float, isa: str | None = None) -> jax.Array:
    """One query per row and head over the slots each row holds (slots 0..q_slot that are valid):
    easympt.kernels.dense_attention's decode without reading the rest of the cache. q [B, K, G, 1, D],
    kt [B*K, D, S], v [B*K, S, D] (easympt.cache: float32, bfloat16 bits, or Int8Slots), slopes [K, G]
    or None -> [B, 1, K, G, D] float32. `isa` as for `packed_matmul`."""
    B, K, G, _, D = q.shape
    isa = _kernel_isa(isa)
    slopes = jnp.zeros((K * G,), jnp.float32) if slopes is None else slopes.reshape(-1).astype(jnp.float32)
    rows = (mask.q_slots[:, 0].astype(jnp.int32), mask.key_valid, slopes)
    result = jax.ShapeDtypeStruct((B * K, G, D), jnp.float32)
    if kt.dtype == jnp.int8:  # Int8Slots: scales [N, 1, S] and [N, S, 1] are [N, S] in memory
        N, S = kt.shape[0], kt.shape[2]
        out = jax.ffi.ffi_call(_target("decode_attention_int8", isa), result)(
            q.reshape(B * K, G, D), kt.q, v.q, kt.scale.reshape(N, S), v.scale.reshape(N, S), *rows,
            scale=np.float32(scale))
    else:
        out = jax.ffi.ffi_call(_target("decode_attention", isa), result)(
            q.reshape(B * K, G, D), kt, v.astype(kt.dtype), *rows, scale=np.float32(scale))
    return out.reshape(B, 1, K, G, D)
