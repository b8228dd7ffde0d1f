"""MPT building blocks: ALiBi, masks, norms, attention (with KV cache), FFN.

Shapes: B batch, T new tokens, S key slots, H query heads, K kv heads,
G = H // K query heads per kv head, D head dim, E d_model, F ffn width.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easympt.adapters.lora import LoraSpec, wrap as with_adapter
from easympt.cache import readable, slots, write_layer
from easympt.config import MptConfig
from easympt.kernels import cpu
from easympt.kernels.attention import AttentionMask, attend
from easympt.kernels.linear import dense_layer
from easympt.sharding import constrain


# ----------------------------------------------------------------------- ALiBi
def alibi_slopes(n_heads: int, alibi_bias_max: float = 8) -> np.ndarray:
    """Per-head ALiBi slopes [H], llm-foundry's rule (`gen_slopes`).

    For a head count that is not a power of two, slopes are taken from the
    next power of two, odd positions first, then even ones.
    """
    n = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, n + 1, dtype=np.float32) * (alibi_bias_max / n)
    slopes = 1.0 / np.power(2.0, m)
    if n != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.astype(np.float32)


# ----------------------------------------------------------------------- init
def _variance_scaling(ic: dict, dist: str, mode_key: str, scale: float, in_axis=-2, out_axis=-1):
    mode = ic.get(mode_key, "fan_in")
    return nn.initializers.variance_scaling(scale, mode, dist, in_axis=in_axis, out_axis=out_axis)


def _torch_gain(nonlinearity: str, a: float) -> float:
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1 + a * a))
    return 1.0


def initializers(config: MptConfig):
    """(kernel_init, residual_kernel_init, embedding_init) from llm-foundry's init_config.

    Residual projections (out_proj, down_proj) are scaled down by
    sqrt(2 * n_layers) when `init_div_is_residual`, as in llm-foundry.
    Without an init_config, transformers' normal(initializer_range).
    """
    ic = config.init_config
    if not ic:
        n = nn.initializers.normal(config.initializer_range)
        return n, n, n
    name = ic.get("name", "kaiming_normal_")
    div = ic.get("init_div_is_residual", True)
    if div is True:
        div = math.sqrt(2 * config.n_layers)
    div = float(div) if div else 1.0

    def make(scale_mult: float, emb: bool = False):
        axes = dict(in_axis=-1, out_axis=-2) if emb else {}
        if name == "baseline_":
            return nn.initializers.normal(ic.get("init_std", 0.02) / math.sqrt(scale_mult))
        if name in ("kaiming_normal_", "kaiming_uniform_"):
            gain = _torch_gain(ic.get("init_nonlinearity", "leaky_relu"), ic.get("init_gain", 0.0))
            dist = "normal" if name.endswith("normal_") else "uniform"
            return _variance_scaling(ic, dist, "fan_mode", gain * gain / scale_mult, **axes)
        if name in ("xavier_normal_", "xavier_uniform_"):
            gain = ic.get("init_gain", 0.0) or 1.0
            dist = "normal" if name.endswith("normal_") else "uniform"
            return nn.initializers.variance_scaling(gain * gain / scale_mult, "fan_avg", dist, **axes)
        if name == "small_init_":
            return nn.initializers.normal(math.sqrt(2 / (5 * config.d_model)) / math.sqrt(scale_mult))
        if name == "neox_init_":
            if scale_mult == 1.0:
                return nn.initializers.normal(math.sqrt(2 / (5 * config.d_model)))
            return nn.initializers.normal(2 / config.n_layers / math.sqrt(config.d_model))
        raise AssertionError(name)  # MptConfig validated the name

    kernel, residual = make(1.0), make(div * div)
    if ic.get("emb_init_std") is not None:
        emb = nn.initializers.normal(ic["emb_init_std"])
    elif ic.get("emb_init_uniform_lim") is not None:
        lim = ic["emb_init_uniform_lim"]
        lo, hi = (-lim, lim) if isinstance(lim, (int, float)) else lim

        def emb(key, shape, dtype=jnp.float32):
            return jax.random.uniform(key, shape, dtype, lo, hi)
    else:
        emb = make(1.0, emb=True)
    return kernel, residual, emb


# ----------------------------------------------------------------------- norms
def make_norm(config: MptConfig, name: str, dtype, param_dtype) -> nn.Module:
    """LayerNorm or RMSNorm, statistics always in float32 (the low_precision_
    variants differ from the plain ones only in autocast dtype)."""
    if config.norm_type.endswith("rmsnorm"):
        return nn.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    return LayerNorm(epsilon=config.layer_norm_epsilon, use_bias=not config.no_bias, dtype=dtype,
                     param_dtype=param_dtype, name=name)


class LayerNorm(nn.Module):
    """flax's `nn.LayerNorm(use_fast_variance=False)` — the same parameters, the same float32
    statistics and the same output bits — with its backward written out (`layer_norm`)."""
    epsilon: float
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype) if self.use_bias else None
        y = layer_norm(x, scale, jnp.zeros_like(scale) if bias is None else bias, self.epsilon)
        return y.astype(self.dtype or jnp.result_type(x, scale))  # bias, if any, is of scale's dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32. The backward is
    the textbook one (two row means of the incoming gradient); XLA:CPU's autodiff of the same
    forward took ~1.3x as long for fwd + bwd of a [4, 256, 768] activation (16.0 vs 12.0 ms). In
    mpt-125m's LoRA step (25 norms, batch 4 x 256, both compiled in one process, in turns) the
    median step went 2.408 -> 2.381 s and 2.559 -> 2.486 s in two runs."""
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    xf = x.astype(jnp.float32)
    centred = xf - jnp.mean(xf, -1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(centred), -1, keepdims=True) + epsilon)
    y = centred * (rstd * scale.astype(jnp.float32)) + bias.astype(jnp.float32)  # flax's order of operations
    return y, (centred, rstd, scale, bias, jnp.zeros((), x.dtype))


def _layer_norm_bwd(epsilon, residuals, dy):
    centred, rstd, scale, bias, x_type = residuals
    dy = dy.astype(jnp.float32)
    xhat = centred * rstd
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - jnp.mean(g, -1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True))
    rows = tuple(range(dy.ndim - 1))
    return (dx.astype(x_type.dtype), jnp.sum(dy * xhat, rows).astype(scale.dtype),
            jnp.sum(dy, rows).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ---------------------------------------------------------------- base module
class MptModule(nn.Module):
    """Fields every MPT module carries: the config, dtypes, matmul precision and
    the mesh its activations are constrained to (None: no constraints). `cpu_kernels`: easympt's CPU
    kernels for inference (easympt.kernels.cpu): weights in packed panels, decode attention over the
    slots rows hold; float32, set by the GenerationEngine. `quantize`: the dense layers' weight format
    (None: float in param_dtype; "int8", "int4": easympt.kernels.quant). `lora`: LoRA adapters on the
    dense layers it targets (easympt.adapters.lora), None: none."""

    config: MptConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None
    mesh: jax.sharding.Mesh | None = None
    attention: str = "auto"  # "auto" (by shape), "dense", "blockwise", "pallas" (easympt.kernels.attention)
    cpu_kernels: bool = False
    quantize: str | None = None
    lora: LoraSpec | None = None

    def dense(self, features: int, kernel_init, use_bias: bool, name: str | None = None,
              quantize: str | None = "model", deterministic: bool = True) -> nn.Module:
        """The model's dense layer for its weight layout and format (easympt.kernels.linear), with a LoRA
        adapter where the model's `lora` targets `name`; `quantize` overrides the model's format for one
        layer (a head)."""
        layer = dense_layer(features, kernel_init=kernel_init, use_bias=use_bias, packed=self.cpu_kernels,
                            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                            quantize=self.quantize if quantize == "model" else quantize, name=name)
        return with_adapter(layer, self.lora, name, deterministic)

    def submodule_fields(self) -> dict:
        """The fields a block or layer inherits from the module that makes it."""
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                    mesh=self.mesh, attention=self.attention, cpu_kernels=self.cpu_kernels,
                    quantize=self.quantize, lora=self.lora)


# ------------------------------------------------------------------- attention
class MptAttention(MptModule):

    @nn.compact
    def __call__(self, x, mask: AttentionMask, layer_cache=None, write_index=None, deterministic=True):
        """x [B, T, E]; mask: which key slots each query sees, and their positions (for ALiBi).

        layer_cache: (keys [B*K, D, S], values [B*K, S, D]) buffers (easympt.cache: arrays, or Int8Slots
        for an 8-bit cache) to write the new keys into at `write_index` [B]; returns (out [B, T, E],
        new layer_cache).
        """
        c = self.config
        B, T, _ = x.shape
        H, K, D = c.n_heads, c.kv_heads, c.head_dim
        kernel_init, residual_init, _ = initializers(c)
        dense = lambda n, name, init: self.dense(n, init, not c.no_bias, name,  # noqa: E731
                                                 deterministic=deterministic)

        qkv = dense((H + 2 * K) * D, "Wqkv", kernel_init)(x)
        if c.attn_config.clip_qkv is not None:
            qkv = jnp.clip(qkv, -c.attn_config.clip_qkv, c.attn_config.clip_qkv)
        q, k, v = jnp.split(qkv, [H * D, (H + K) * D], axis=-1)
        if c.attn_config.qk_ln:
            q = make_norm(c, "q_ln", self.dtype, self.param_dtype)(q).astype(qkv.dtype)
            k = make_norm(c, "k_ln", self.dtype, self.param_dtype)(k).astype(qkv.dtype)
        # heads-major [B, K, T, D]; the cache's layouts (keys [B*K, D, S], values [B*K, S, D]) from there
        q = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
        k = constrain(k.reshape(B, T, K, D).transpose(0, 2, 1, 3), self.mesh,
                      ("batch", "kv_heads", "length", "head_dim"))
        v = constrain(v.reshape(B, T, K, D).transpose(0, 2, 1, 3), self.mesh,
                      ("batch", "kv_heads", "length", "head_dim"))

        W = mask.k_slots.shape[0]  # with a cache: attend over its first W slots (a window, or all)
        windowed = layer_cache is not None and W < layer_cache[0].shape[-1]
        if layer_cache is None:
            keys, values = k.transpose(0, 1, 3, 2).reshape(B * K, D, T), v.reshape(B * K, T, D)
        elif windowed:
            # Attend over a copy of the window and update the cache only after attention. Read from
            # the updated cache, XLA:CPU fused slice(update(cache)) into one read of the old buffer
            # and then copied the whole cache, twice per layer and step, to update it in place: a
            # 2,048-slot window of an 8,192-slot cache decoded 3x slower than no window at all.
            keys, values = write_layer(slots(layer_cache[0], np.s_[:, :, :W]), slots(layer_cache[1], np.s_[:, :W]),
                                       k, v, write_index)
        else:
            keys, values = layer_cache = write_layer(*layer_cache, k, v, write_index)

        scale = c.attn_config.softmax_scale or 1.0 / math.sqrt(D)
        slopes = None
        if c.attn_config.alibi:
            slopes = jnp.asarray(alibi_slopes(H, c.attn_config.alibi_bias_max)).reshape(K, H // K)
        dropout = None
        if c.attn_config.attn_pdrop and not deterministic:
            dropout = lambda p: nn.Dropout(c.attn_config.attn_pdrop)(p, deterministic=False)  # noqa: E731
        kernel = self.cpu_kernels and layer_cache is not None and not windowed
        if kernel and cpu.decodes(q, keys, mask, dropout):
            out = cpu.decode_attention(q, keys, values, mask, slopes, scale)  # reads the slots rows hold
        else:
            out = attend(q, readable(keys), readable(values), mask, slopes, scale, self.precision, self.dtype, dropout,
                         impl=self.attention)
        if windowed:
            layer_cache = write_layer(*layer_cache, *ordered_after((k, v), out), write_index)
        out = constrain(out.reshape(B, T, H * D), self.mesh, ("batch", "length", "heads"))
        return dense(c.d_model, "out_proj", residual_init)(out), layer_cache


def ordered_after(xs, dep):
    """`xs` (a pytree of arrays), made to depend on `dep`: whatever consumes them runs after `dep`
    is computed. XLA:CPU drops optimization barriers before scheduling, so ordering needs a data
    dependency; `+ 0 * dep[0]` is one XLA does not fold away for floats (0 * inf is NaN)."""
    zero = dep.reshape(-1)[0] * 0
    return jax.tree_util.tree_map(lambda x: x + zero.astype(x.dtype), xs)


# ------------------------------------------------------------------------- FFN
def activation(config: MptConfig):
    f = config.ffn_config
    if f.act_name == "gelu":
        if f.act_approximate == "tanh":
            return lambda x: jax.nn.gelu(x, approximate=True)
        return exact_gelu
    return {"silu": jax.nn.silu, "relu": jax.nn.relu}[f.act_name]


def exact_gelu(x):
    """x * Phi(x) as torch computes it, 0.5 x (1 + erf(x / sqrt 2)): within 1.2e-6 of float64 and
    half the time of jax.nn.gelu's erfc form on XLA:CPU (forward and backward of [1024, 3072]:
    2.8 vs 5.1 ms), whose erfc takes an exponential per value."""
    return 0.5 * x * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


class MptFFN(MptModule):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    @nn.compact
    def __call__(self, x, deterministic=True):
        c = self.config
        kernel_init, residual_init, _ = initializers(c)
        dense = lambda n, name, init: self.dense(n, init, c.ffn_uses_bias, name,  # noqa: E731
                                                 deterministic=deterministic)
        act = activation(c)
        h = dense(c.ffn_hidden_size, "up_proj", kernel_init)(x)
        if c.ffn_config.ffn_type == "mptglu":
            h = act(dense(c.ffn_hidden_size, "gate_proj", kernel_init)(x)) * h
        else:
            h = act(h)
        h = constrain(h, self.mesh, ("batch", "length", "mlp"))
        return dense(c.d_model, "down_proj", residual_init)(h)
