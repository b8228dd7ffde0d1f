"""Attention kernels: dense for short inputs, blockwise (flash-attention style) for long ones.

Shapes: B batch, K kv heads, G query heads per kv head, T queries, S key slots, D head dim,
N = B * K. q [B, K, G, T, D]; keys kt [N, D, S] and values v [N, S, D], as the KV cache stores
them (easympt.cache: the layouts XLA's batched products read without a copy); out [B, T, K, G, D].

Masks and the ALiBi bias are never materialised as [T, S]: `AttentionMask` keeps what decides
them per token (slot positions, validity, prefix and sequence ids, O(T + S)), and each kernel
builds the [tq, tk] piece it needs. The blockwise kernel runs an online softmax over key blocks
for one query block at a time, so its temporaries are O(tq * tk) whatever T and S are; with a
causal mask it visits only the key blocks at or before a query block's last slot (in decode: only
the cache blocks a row has filled). Its backward pass is the flash-attention one (custom VJP):
probabilities are recomputed block by block from the saved log-sum-exp, never stored.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NEG = float(jnp.finfo(jnp.float32).min)  # the score of a masked slot (as transformers and the dense path use)

# When the blockwise kernel is used (measured on 2 CPU cores, mpt-125m heads; README "Long context"):
# prefill / training from T * S = 1024 * 1024 (at 512 * 512 dense is faster, at 1024 * 1024 blockwise
# 2.5x faster). Decode (a few queries) stays dense: its scores are only [B, H, T, S], and inside the
# model the dense step measured faster at every context tried (2k: 22.0 vs 16.1 tok/s; 16k: the
# blockwise loop over 32 key blocks ran at 2.4 tok/s), though it reads every slot of its window.
BLOCKWISE_MIN_SCORES = 1 << 20
DECODE_QUERIES = 16
LONG_DECODE_SLOTS = 16384  # from here a decode step's values are read by a multiply-and-sum on CPU
ATTENTION_KERNELS = ("auto", "dense", "blockwise", "pallas")
Q_BLOCK, K_BLOCK = 512, 512


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


def _merged(x):
    """[B, K, ...] -> [B*K, ...]: the cache's merged batch-and-heads dimension."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _scores(q, kt, mask: AttentionMask, slopes, scale, qw, kw, precision):
    """Masked, biased scores of one block: q [B, K, G, tq, D], kt [N, D, tk] -> [B, K, G, tq, tk] f32."""
    B, K = q.shape[:2]
    s = jnp.einsum("ngqd,nds->ngqs", _merged(q), kt.astype(q.dtype), precision=precision,
                   preferred_element_type=jnp.float32) * scale
    s = s.reshape(B, K, *s.shape[1:])
    if slopes is not None:  # slopes [K, G]
        s = s - slopes[None, :, :, None, None] * mask.distance(qw, kw)[:, None, None]
    return jnp.where(mask.allowed(qw, kw)[:, :, None], s, NEG)


def dense_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                    dropout=None):
    """The whole [T, S] score matrix at once: fastest for short inputs. `dropout(probs)` is applied
    to the probabilities when given (training with attn_pdrop)."""
    B, K = q.shape[:2]
    s = _scores(q, kt, mask, slopes, scale, (None, None), (None, None), precision)
    probs = jax.nn.softmax(s, axis=-1).astype(dtype)
    if dropout is not None:
        probs = dropout(probs)
    T, S = probs.shape[-2:]
    if probs.shape[2] * T == 1 and S >= LONG_DECODE_SLOTS and jax.default_backend() == "cpu":
        # one query over a long cache: XLA:CPU's batched [1, S] x [S, D] product reads the values at
        # half the bandwidth of a fused multiply-and-sum (65,536 slots: 14 vs 27 GB/s; measured)
        p = _merged(probs).reshape(-1, S, 1)  # [N, S, 1]: one query per row-and-head (G is 1)
        out = jnp.sum(p * v.astype(dtype), axis=1).reshape(B * K, 1, 1, -1)
    else:
        out = jnp.einsum("ngts,nsd->ngtd", _merged(probs), v.astype(dtype), precision=precision)
    return jnp.moveaxis(out.reshape(B, K, *out.shape[1:]), 3, 1)


# ------------------------------------------------------------------ blockwise
def _pad_to(x, n, axis, value=0):
    extra = n - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _blocks_to_visit(mask: AttentionMask, q_start, tq, tk, n_kb):
    """Key blocks a query block needs: with a causal mask (no prefix), only those starting at or
    before the block's last query slot, over the batch; otherwise all of them."""
    if not mask.causal or mask.key_prefix is not None:
        return n_kb
    last = jnp.max(jax.lax.dynamic_slice_in_dim(mask.q_slots, q_start, tq, axis=1))
    first_slot = mask.k_slots[0]
    return jnp.clip((last - first_slot) // tk + 1, 1, n_kb)


def _block(q_block, kt, v, j, tk, mask, slopes, scale, q_window, precision):
    """Key block j: (kt block [N, D, tk], v block [N, tk, D], its masked, biased scores against q_block)."""
    ks = j * tk
    kb = jax.lax.dynamic_slice_in_dim(kt, ks, tk, axis=2)
    vb = jax.lax.dynamic_slice_in_dim(v, ks, tk, axis=1)
    return kb, vb, _scores(q_block, kb, mask, slopes, scale, q_window, (ks, tk), precision)


def _forward(q, kt, v, mask, slopes, scale, tq, tk, precision):
    """out [B, K, G, T, D] (float32) and log-sum-exp [B, K, G, T]; T, S multiples of tq, tk."""
    B, K, G, T, D = q.shape
    n_kb = kt.shape[2] // tk

    def q_block(qi):
        qs = qi * tq
        qb = jax.lax.dynamic_slice_in_dim(q, qs, tq, axis=3)

        def step(j, carry):
            m, l, acc = carry
            _, vb, s = _block(qb, kt, v, j, tk, mask, slopes, scale, (qs, tq), precision)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + p.sum(-1)
            # probabilities in the value dtype for the product, accumulated in float32 (as flash
            # attention does); converting v instead would let XLA hoist a float32 copy of the cache
            pv = jnp.einsum("ngqs,nsd->ngqd", _merged(p.astype(vb.dtype)), vb, precision=precision,
                            preferred_element_type=jnp.float32)
            acc = acc * corr[..., None] + pv.reshape(acc.shape)
            return m_new, l, acc

        init = (jnp.full((B, K, G, tq), NEG, jnp.float32), jnp.zeros((B, K, G, tq), jnp.float32),
                jnp.zeros((B, K, G, tq, D), jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, _blocks_to_visit(mask, qs, tq, tk, n_kb), step, init)
        return acc / l[..., None], m + jnp.log(l)

    out, lse = jax.lax.map(q_block, jnp.arange(T // tq))  # [nq, B, K, G, tq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, T, D)
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, T)
    return out, lse


def _backward(q, kt, v, mask, slopes, scale, tq, tk, precision, out, lse, dout):
    """Flash-attention's backward: dq, dkt, dv with probabilities recomputed per block."""
    B, K, G, T, D = q.shape
    n_kb = kt.shape[2] // tk
    delta = jnp.sum(dout * out, axis=-1)  # [B, K, G, T]

    def q_block(qi, carry):
        dk, dv, dq = carry
        qs = qi * tq
        qb = jax.lax.dynamic_slice_in_dim(q, qs, tq, axis=3)
        dob = jax.lax.dynamic_slice_in_dim(dout, qs, tq, axis=3)
        lse_b = jax.lax.dynamic_slice_in_dim(lse, qs, tq, axis=3)
        delta_b = jax.lax.dynamic_slice_in_dim(delta, qs, tq, axis=3)

        def step(j, inner):
            dk, dv, dqb = inner
            ks = j * tk
            kb, vb, s = _block(qb, kt, v, j, tk, mask, slopes, scale, (qs, tq), precision)
            p = jnp.exp(s - lse_b[..., None])
            dv_b = jnp.einsum("ngqs,ngqd->nsd", _merged(p), _merged(dob), precision=precision)
            dp = jnp.einsum("ngqd,nsd->ngqs", _merged(dob), vb.astype(jnp.float32), precision=precision)
            ds = p * (dp.reshape(p.shape) - delta_b[..., None]) * scale
            dq_b = jnp.einsum("ngqs,nds->ngqd", _merged(ds), kb.astype(jnp.float32), precision=precision)
            dqb = dqb + dq_b.reshape(dqb.shape)
            dk_b = jnp.einsum("ngqs,ngqd->nds", _merged(ds), _merged(qb.astype(jnp.float32)), precision=precision)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, jax.lax.dynamic_slice_in_dim(dk, ks, tk, 2) + dk_b, ks, 2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, jax.lax.dynamic_slice_in_dim(dv, ks, tk, 1) + dv_b, ks, 1)
            return dk, dv, dqb

        dqb = jnp.zeros((B, K, G, tq, D), jnp.float32)
        dk, dv, dqb = jax.lax.fori_loop(0, _blocks_to_visit(mask, qs, tq, tk, n_kb), step, (dk, dv, dqb))
        return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, dqb, qs, axis=3)

    init = (jnp.zeros(kt.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32), jnp.zeros(q.shape, jnp.float32))
    dk, dv, dq = jax.lax.fori_loop(0, T // tq, q_block, init)
    return dq, dk, dv


def _flash_backward(scale, tq, tk, precision, res, dout):
    """Gradients of q, kt, v (and zeros for the mask and slopes) from a flash forward's residuals
    (q, kt, v, mask, slopes, out, lse)."""
    q, kt, v, mask, slopes, out, lse = res
    dq, dk, dv = _backward(q, kt, v, mask, slopes, scale, tq, tk, precision, out, lse, dout.astype(jnp.float32))
    zero_mask = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, jax.dtypes.float0), mask)  # ints and bools
    return (dq.astype(q.dtype), dk.astype(kt.dtype), dv.astype(v.dtype), zero_mask,
            None if slopes is None else jnp.zeros_like(slopes))


def flash_attention_vjp(forward, precision_of=lambda option: option):
    """An attention function with flash attention's backward from a kernel's forward pass
    `forward(q, kt, v, mask, slopes, scale, tq, tk, option) -> (out, lse)`: the backward needs only the
    inputs, the output and the log-sum-exp. `option` is the forward's static setting (matmul
    precision here, interpret mode for the Pallas kernel); `precision_of(option)` is the backward's."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
    def attention(q, kt, v, mask, slopes, scale, tq, tk, option):
        return forward(q, kt, v, mask, slopes, scale, tq, tk, option)[0]

    def fwd(q, kt, v, mask, slopes, scale, tq, tk, option):
        out, lse = forward(q, kt, v, mask, slopes, scale, tq, tk, option)
        return out, (q, kt, v, mask, slopes, out, lse)

    def bwd(scale, tq, tk, option, res, dout):
        return _flash_backward(scale, tq, tk, precision_of(option), res, dout)

    attention.defvjp(fwd, bwd)
    return attention


_flash = flash_attention_vjp(_forward)


def blockwise_attention(q, kt, v, mask: AttentionMask, slopes, scale, precision=None, dtype=jnp.float32,
                        q_block: int = Q_BLOCK, k_block: int = K_BLOCK):
    """Same result as dense_attention, in O(q_block * k_block) temporaries (no dropout)."""
    T, S = q.shape[3], kt.shape[2]
    tq, tk = min(q_block, T), min(k_block, S)
    qpad, kpad, vpad, padded = pad_to_blocks(q, kt, v, mask, tq, tk)
    out = _flash(qpad, kpad, vpad, padded, slopes, float(scale), tq, tk, precision)
    return jnp.moveaxis(out[:, :, :, :T], 3, 1).astype(dtype)  # [B, T, K, G, D]


def pad_to_blocks(q, kt, v, mask: AttentionMask, tq: int, tk: int):
    """Queries and keys padded to whole blocks, with the mask to match: padded queries are discarded
    by the caller; padded keys are invalid and placed past every real slot."""
    B, T, S = q.shape[0], q.shape[3], kt.shape[2]
    Tp, Sp = _round_up(T, tq), _round_up(S, tk)
    qpad = _pad_to(q, Tp, axis=3)
    kpad, vpad = _pad_to(kt, Sp, axis=2), _pad_to(v, Sp, axis=1)
    last_q = mask.q_slots[:, -1:]
    padded = mask.replace(
        q_slots=jnp.concatenate([mask.q_slots, jnp.broadcast_to(last_q, (B, Tp - T))], axis=1),
        k_slots=jnp.concatenate([mask.k_slots, mask.k_slots[-1] + 1 + jnp.arange(Sp - S, dtype=mask.k_slots.dtype)]),
        key_valid=_pad_to(mask.key_valid, Sp, axis=1, value=False),
        key_prefix=None if mask.key_prefix is None else _pad_to(mask.key_prefix, Sp, axis=1, value=False),
        q_segment=None if mask.q_segment is None else _pad_to(mask.q_segment, Tp, axis=1, value=-1),
        k_segment=None if mask.k_segment is None else _pad_to(mask.k_segment, Sp, axis=1, value=-2))
    return qpad, kpad, vpad, padded


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


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
        from easympt.pallas_attention import pallas_attention  # jax.experimental.pallas only when asked for

        return pallas_attention(q, kt, v, mask, slopes, scale, precision, dtype)
    if impl == "blockwise":
        return blockwise_attention(q, kt, v, mask, slopes, scale, precision, dtype)
    return dense_attention(q, kt, v, mask, slopes, scale, precision, dtype, dropout)
