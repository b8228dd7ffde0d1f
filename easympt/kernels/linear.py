"""The weight products, one seam for every weight layout: `dense_layer` and `embedding_layer` give
the model's layers what runs here, and `pack_params` / `unpack_params` convert a parameter tree
between the layouts. Layers ask for "a dense layer" and never see how weights are laid out.

Layouts: plain ([K, N] kernels, XLA's dot; training, accelerators, meshes) and packed (48-column
panels [ceil(N/48), K, 48] read by easympt's CPU kernels, easympt.kernels.cpu: float32 compute over
float32 or bfloat16 weights, inference).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from easympt.kernels import cpu
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


def dense_layer(features: int, *, kernel_init, use_bias: bool, packed: bool, dtype, param_dtype, precision,
                name: str | None = None) -> nn.Module:
    """The model's dense layer [..., K] -> [..., features]: FlatDense, or PackedDense with packed weights."""
    if packed:
        return PackedDense(features, use_bias=use_bias, kernel_init=kernel_init, name=name)
    return FlatDense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
                     kernel_init=kernel_init, name=name)


def embedding_layer(num_embeddings: int, features: int, *, embedding_init, packed: bool, dtype, param_dtype,
                    name: str | None = None) -> nn.Module:
    """The token embedding (and tied LM head, `attend`): nn.Embed, or PackedEmbed with packed weights."""
    if packed:
        return PackedEmbed(num_embeddings, features, embedding_init=embedding_init, name=name)
    return nn.Embed(num_embeddings, features, embedding_init=embedding_init, dtype=dtype, param_dtype=param_dtype,
                    name=name)


_pack_jit = jax.jit(cpu.pack)


def _is_embedding(path) -> bool:
    return path_str(path).split("/")[-2:] == ["wte", "embedding"]


def pack_params(params: dict, weight_dtype=None) -> dict:
    """A causal LM's parameters with every dense kernel [K, N] packed, and the token embedding [V, E]
    packed as the tied head reads it (its transpose): the tree a `cpu_kernels=True` module expects.
    `weight_dtype` (float32 or bfloat16): the packed matrices' dtype (None: each keeps its own);
    norms and biases are left as they are."""

    def leaf(path, x):
        if path_str(path).split("/")[-1] == "kernel" and x.ndim == 2:
            return _pack_jit(x.astype(weight_dtype or x.dtype))
        if _is_embedding(path):
            return _pack_jit(x.astype(weight_dtype or x.dtype).T)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def unpack_params(packed: dict, like: dict) -> dict:
    """The inverse of `pack_params`; `like` gives the plain shapes (e.g. the plain module's eval_shape)."""

    def leaf(path, x, want):
        if x.shape == want.shape:
            return x
        if _is_embedding(path):
            return cpu.unpack(x, want.shape[0]).T
        return cpu.unpack(x, want.shape[1])

    return jax.tree_util.tree_map_with_path(leaf, packed, like)


def check_packed(params: dict, expected: dict) -> None:
    """Packed params against the packed module's own tree: same keys, same shapes."""
    got = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {path_str(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(expected)}
    wrong = {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}
    if wrong:
        raise ValueError(f"packed parameters do not match the packed model (got, want): {wrong}")
