"""The attention dispatcher: which kernel runs an attention call, by shape and by request.

Kernels (each in its own module here): dense (easympt.kernels.dense_attention) for short inputs
and decode, blockwise (easympt.kernels.blockwise: flash-attention style, O(tq * tk) temporaries)
for long ones, Pallas (easympt.kernels.pallas_attention) on accelerators when asked for, and on CPU
the decode kernel over the slots rows hold (easympt.kernels.cpu, chosen in easympt.layers).

Shapes: B batch, K kv heads, G query heads per kv head, T queries, S key slots, D head dim,
N = B * K. q [B, K, G, T, D]; keys kt [N, D, S] and values v [N, S, D], as the KV cache stores
them (easympt.cache: the layouts XLA's batched products read without a copy); out [B, T, K, G, D].
Masks and the ALiBi bias are never materialised as [T, S] (easympt.kernels.mask).
"""

from __future__ import annotations

import jax.numpy as jnp

from easympt.kernels.blockwise import blockwise_attention
from easympt.kernels.dense_attention import dense_attention
from easympt.kernels.mask import AttentionMask

# When the blockwise kernel is used (measured on 2 CPU cores, mpt-125m heads; README "Long context"):
# prefill / training from T * S = 1024 * 1024 (at 512 * 512 dense is faster, at 1024 * 1024 blockwise
# 2.5x faster). Decode (a few queries) stays dense: its scores are only [B, H, T, S], and inside the
# model the dense step measured faster at every context tried (2k: 22.0 vs 16.1 tok/s; 16k: the
# blockwise loop over 32 key blocks ran at 2.4 tok/s), though it reads every slot of its window.
BLOCKWISE_MIN_SCORES = 1 << 20
DECODE_QUERIES = 16
ATTENTION_KERNELS = ("auto", "dense", "blockwise", "pallas")


def use_blockwise(T: int, S: int, dropout: bool) -> bool:
    """The blockwise kernel for long inputs (where [T, S] scores would dominate memory); dense below
    the measured crossover, and whenever attention dropout is on (the blockwise kernel has none)."""
    if dropout:
        return False
    return T >= DECODE_QUERIES and T * S >= BLOCKWISE_MIN_SCORES


def attend(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32, dropout=None,
           impl: str = "auto"):
    """Dispatch by shape: impl "auto", "dense", "blockwise" or "pallas" (decode, a few queries, stays
    dense under "pallas": the kernel's query blocks are for prompts)."""
    if impl == "auto":
        impl = "blockwise" if use_blockwise(q.shape[3], kt.shape[2], dropout is not None) else "dense"
    if impl in ("blockwise", "pallas") and dropout is not None:
        raise ValueError(f"the {impl} attention kernel has no attention dropout; use attention='dense'")
    if impl == "pallas" and q.shape[3] >= DECODE_QUERIES:
        from easympt.kernels.pallas_attention import pallas_attention  # jax.experimental.pallas only when asked for

        return pallas_attention(q, kt, v, mask, slopes, scale, precision, dtype)
    if impl == "blockwise":
        return blockwise_attention(q, kt, v, mask, slopes, scale, precision, dtype)
    return dense_attention(q, kt, v, mask, slopes, scale, precision, dtype, dropout)
