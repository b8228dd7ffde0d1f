"""The weight products, one seam for every weight layout: `dense_layer` and `embedding_layer` give
the model's layers what runs here, and `pack_params` / `unpack_params` convert a parameter tree
between the layouts. Layers ask for "a dense layer" and never see how weights are laid out.

Layouts: plain ([K, N] kernels, XLA's dot; training, accelerators, meshes) and packed (48-column
panels [ceil(N/48), K, 48] read by easympt's CPU kernels, easympt.kernels.cpu: float32 compute over
float32 or bfloat16 weights, inference).

Formats (easympt.kernels.quant): float (the param dtype), or `int8` / `int4` weight-only
quantization, where a matrix is stored as "kernel" (int8, or uint8 nibble pairs) and "scale". The
plain layout dequantizes inside the product (XLA fuses the widening into the dot's operand); the
packed one hands the 8- or 4-bit panels to the CPU kernel, which widens them in registers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from easympt.kernels import cpu, quant
from easympt.sharding import path_str


def flat_tokens(fn, x):
    """fn applied to x [..., E] as a 2-D [tokens, E] matrix, reshaped back. XLA's CPU backward of a
    dot_general that contracts two leading dims (the kernel gradient over batch and length) runs
    ~1.3x slower than the same product on a 2-D matrix; the reshape itself is free."""
    y = fn(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class FlatDense(nn.Dense):
    """nn.Dense over the flattened tokens (same parameters, same result); see `flat_tokens`."""

    def __call__(self, inputs):
        return flat_tokens(super().__call__, inputs)


class PackedDense(nn.Module):
    """FlatDense for inference with easympt's CPU kernel: the kernel is stored in 48-column panels
    [ceil(N/48), K, 48] (easympt.kernels.cpu), float32 or bfloat16; float32 out."""

    features: int
    use_bias: bool = True
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs):
        K, N = inputs.shape[-1], self.features
        kernel = self.param("kernel", lambda rng: cpu.pack(self.kernel_init(rng, (K, N), jnp.float32)))
        y = flat_tokens(lambda x: cpu.packed_matmul(x.astype(jnp.float32), kernel, N), inputs)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (N,), jnp.float32)
        return y


class PackedEmbed(nn.Module):
    """nn.Embed whose table [V, E] is stored packed as the tied LM head reads it ([V, E]^T in panels):
    the head is one kernel product and a lookup gathers E values per token from the panels."""

    num_embeddings: int
    features: int
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

    def setup(self):
        V, E = self.num_embeddings, self.features
        self.embedding = self.param("embedding", lambda rng: cpu.pack(self.embedding_init(rng, (V, E)).T))

    def __call__(self, ids):
        return cpu.packed_rows(self.embedding, ids).astype(jnp.float32)

    def attend(self, query):
        return cpu.packed_matmul(query.astype(jnp.float32), self.embedding, self.num_embeddings)


def _quantized_param(module: nn.Module, init, shape, quantize: str, packed: bool, axis: int = 0):
    """(q, scale) params of a quantized matrix of float `shape`, initialised by quantizing `init`'s
    float matrix (a random quantized model; loaded weights replace it), packed into panels when
    `packed` (the embedding is packed as the tied head reads it, transposed)."""

    def make(rng):
        w = init(rng, shape, jnp.float32)
        if axis:  # the embedding [V, E]: int8, a scale per token row; packed as the head reads it
            arrays = quant.quantize(w, "int8", axis=1)
            return pack_quantized({"q": arrays["q"].T, "scale": arrays["scale"].T}) if packed else arrays
        arrays = quant.quantize(w, quantize)
        return pack_quantized(arrays) if packed else arrays

    made = None

    def once(rng):  # one float matrix for both params
        nonlocal made
        if made is None:
            made = make(rng)
        return made

    name = "embedding" if axis else "kernel"
    return (module.param(name, lambda rng: once(rng)["q"]), module.param("scale", lambda rng: once(rng)["scale"]))


def pack_quantized(arrays: dict) -> dict:
    """A quantized dense kernel's {"q": [K or K/2, N], "scale": [1 or K/32, N]} (easympt.kernels.quant) in
    the CPU kernel's panels: q [ceil(N/48), K or K/2, 48]; an int8 scale [1, N] padded to [1, 48 * panels],
    an int4 one packed like its kernel, [ceil(N/48), K/32, 48]."""
    q, scale = arrays["q"], arrays["scale"]
    if q.dtype == jnp.int8:
        width = cpu.packed_shape(q.shape[0], q.shape[1])[0] * cpu.PANEL
        return {"q": _pack_jit(q), "scale": jnp.pad(scale, ((0, 0), (0, width - scale.shape[1])))}
    return {"q": _pack_jit(q), "scale": _pack_jit(scale)}


class QuantDense(nn.Module):
    """FlatDense over 8- or 4-bit weights (easympt.kernels.quant): params "kernel" and "scale" (and the
    float "bias"). Plain layout: XLA's dot over the dequantized kernel in the compute dtype; packed:
    easympt's CPU kernel over the panels, float32 out."""

    features: int
    quantize: str
    packed: bool = False
    use_bias: bool = True
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.Precision | None = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, inputs):
        K, N = inputs.shape[-1], self.features
        kernel, scale = _quantized_param(self, self.kernel_init, (K, N), self.quantize, self.packed)
        if self.packed:
            y = flat_tokens(lambda x: cpu.packed_matmul_quant(x.astype(jnp.float32), kernel, scale, N), inputs)
        else:
            dtype = self.dtype or jnp.float32
            if kernel.dtype == jnp.int8:  # the per-column scale goes on the product, not on K x N weights
                product = lambda x: jnp.dot(x.astype(dtype), kernel.astype(dtype), precision=self.precision) \
                    * scale.astype(dtype)
            else:
                product = lambda x: jnp.dot(x.astype(dtype), quant.dequantize(kernel, scale, dtype),
                                            precision=self.precision)
            y = flat_tokens(product, inputs)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (N,), self.param_dtype).astype(y.dtype)
        return y


class QuantEmbed(nn.Module):
    """nn.Embed (and the tied head, `attend`) over an int8 table [V, E] with a scale per token row
    [V, 1]; packed: the table packed as the head reads it ([V, E]^T in panels) with its scale [1, 48 * panels]."""

    num_embeddings: int
    features: int
    packed: bool = False
    dtype: jnp.dtype | None = None
    embedding_init: nn.initializers.Initializer = nn.initializers.normal(1.0)

    def setup(self):
        self.embedding, self.scale = _quantized_param(self, self.embedding_init, (self.num_embeddings, self.features),
                                                      "int8", self.packed, axis=1)

    def __call__(self, ids):
        if self.packed:
            return cpu.packed_rows(self.embedding, ids).astype(jnp.float32) * self.scale[0, ids][..., None]
        dtype = self.dtype or jnp.float32
        return (self.embedding[ids].astype(jnp.float32) * self.scale[ids]).astype(dtype)

    def attend(self, query):
        if self.packed:
            return cpu.packed_matmul_quant(query.astype(jnp.float32), self.embedding, self.scale, self.num_embeddings)
        dtype = self.dtype or jnp.float32
        return jnp.dot(query.astype(dtype), self.embedding.T.astype(dtype)) * self.scale[:, 0].astype(dtype)


def dense_layer(features: int, *, kernel_init, use_bias: bool, packed: bool, dtype, param_dtype, precision,
                quantize: str | None = None, name: str | None = None) -> nn.Module:
    """The model's dense layer [..., K] -> [..., features] for its layout and weight format: FlatDense,
    PackedDense with packed float weights, QuantDense with 8- or 4-bit weights (either layout)."""
    if quantize is not None:
        return QuantDense(features, quant.check_format(quantize), packed=packed, use_bias=use_bias, dtype=dtype,
                          param_dtype=param_dtype, precision=precision, kernel_init=kernel_init, name=name)
    if packed:
        return PackedDense(features, use_bias=use_bias, kernel_init=kernel_init, name=name)
    return FlatDense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                     kernel_init=kernel_init, name=name)


def embedding_layer(num_embeddings: int, features: int, *, embedding_init, packed: bool, dtype, param_dtype,
                    quantize: str | None = None, name: str | None = None) -> nn.Module:
    """The token embedding (and tied LM head, `attend`): nn.Embed, PackedEmbed with packed weights, or
    QuantEmbed (int8, either layout) in a quantized model."""
    if quant.embedding_format(quantize) is not None:
        return QuantEmbed(num_embeddings, features, packed=packed, dtype=dtype, embedding_init=embedding_init,
                          name=name)
    if packed:
        return PackedEmbed(num_embeddings, features, embedding_init=embedding_init, name=name)
    return nn.Embed(num_embeddings, features, embedding_init=embedding_init, dtype=dtype, param_dtype=param_dtype,
                    name=name)


_pack_jit = jax.jit(cpu.pack)


def _quantized(node: dict) -> bool:
    """Whether a module's params are an 8- or 4-bit matrix (easympt.kernels.quant) with its scale."""
    w = node.get("kernel", node.get("embedding"))
    return w is not None and "scale" in node and jnp.dtype(w.dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))


def pack_params(params: dict, weight_dtype=None, consume: bool = False) -> dict:
    """A causal LM's parameters with every dense kernel [K, N] packed, and the token embedding [V, E]
    packed as the tied head reads it (its transpose): the tree a `cpu_kernels=True` module expects.
    `weight_dtype` (float32 or bfloat16): the packed float matrices' dtype (None: each keeps its own);
    8- and 4-bit matrices are packed with their scales (pack_quantized); norms and biases are left as
    they are. `consume`: delete each source matrix once its packed copy exists, so packing needs one
    matrix more than the weights rather than a second copy of them (mpt-7b in int8: 6.7 GB, not
    13.3); only for params nothing else will read (the caller loaded them for this engine)."""

    def done(*sources):
        if consume:
            for x in sources:
                if isinstance(x, jax.Array) and not x.is_deleted():
                    x.delete()

    def walk(node, name):
        if not isinstance(node, dict):
            return node
        if _quantized(node):
            if "embedding" in node:
                packed = pack_quantized({"q": node["embedding"].T, "scale": node["scale"].T})
                out = {**node, "embedding": packed["q"], "scale": packed["scale"]}
            else:
                packed = pack_quantized({"q": node["kernel"], "scale": node["scale"]})
                out = {**node, "kernel": packed["q"], "scale": packed["scale"]}
            jax.block_until_ready(packed)
            done(node.get("embedding", node.get("kernel")), node["scale"])
            return out
        out = {}
        for key, x in node.items():
            if key == "kernel" and x.ndim == 2:
                out[key] = jax.block_until_ready(_pack_jit(x.astype(weight_dtype or x.dtype)))
                done(x)
            elif key == "embedding" and name == "wte":
                out[key] = jax.block_until_ready(_pack_jit(x.astype(weight_dtype or x.dtype).T))
                done(x)
            else:
                out[key] = walk(x, key)
        return out

    return walk(params, None)


def unpack_params(packed: dict, like: dict) -> dict:
    """The inverse of `pack_params`; `like` gives the plain shapes (e.g. the plain module's eval_shape)."""

    def leaf(path, x, want):
        if x.shape == want.shape:
            return x
        embedding = path_str(path).split("/")[-2] == "wte"  # packed transposed: the head's columns are its rows
        n = want.shape[0] if embedding else want.shape[1]
        plain = x[:, :n] if x.ndim == 2 else cpu.unpack(x, n)  # a padded int8 scale row, or panels
        return plain.T if embedding else plain

    return jax.tree_util.tree_map_with_path(leaf, packed, like)


def check_packed(params: dict, expected: dict) -> None:
    """Packed params against the packed module's own tree: same keys, same shapes."""
    got = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    wrong = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    if wrong:
        raise ValueError(f"packed parameters do not match the packed model (got, want): {wrong}")
