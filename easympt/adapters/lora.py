"""LoRA: a low-rank update x -> x @ A @ B * (alpha / r) added to a frozen dense layer's output.

Why easympt's own module and not qwix's `LoraProvider`: qwix adds adapters by intercepting the
`dot_general` whose right operand is a module's kernel parameter. easympt's quantized layers
dequantize before the dot (the operand is no longer the parameter) and the packed CPU layers call
an FFI kernel (no dot at all), so qwix would find none of the layers a QLoRA or a CPU server runs;
and it has no per-row adapter choice for serving several adapters in one batch. `LoraDense` wraps
whatever `easympt.kernels.linear.dense_layer` returns (float, int8 / int4, plain or packed) in the
same parameter scope (`nn.share_scope`): `Wqkv/kernel` stays where it was, `Wqkv/lora_a` and
`Wqkv/lora_b` join it. One seam, every weight format.

Two shapes of adapter parameters:
- training (`LoraSpec.slots == 0`): one adapter, A [K, r] and B [r, N], scaled by alpha / r, with
  dropout on the adapter's input, as PEFT's `lora.Linear`;
- serving (`slots == L`): L adapters stacked, A [L, K, r] and B [L, r, N] with alpha / r folded into
  B, rank padded with zeros to `rank` (PEFT's adapters of any smaller rank fit). Which adapter each
  batch row uses comes in the "lora_rows" collection ([B] int32, -1: none), so rows of one batch
  may use different adapters (Punica / S-LoRA's batched LoRA). A batch where no row uses one skips
  the adapter products.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from easympt.kernels.linear import flat_tokens

TARGETS = ("Wqkv", "out_proj", "up_proj", "gate_proj", "down_proj")  # MPT's dense layers
ROWS = "lora_rows"  # the variable collection that says which served adapter each row uses


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What adapters a model carries. `targets`: the dense layers adapted (PEFT's `target_modules`;
    its default for MPT is Wqkv alone). `slots` 0: one trainable adapter; L > 0: L served ones."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("Wqkv",)
    dropout: float = 0.0
    slots: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target layer")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"LoRA target(s) {', '.join(unknown)} are not MPT dense layers ({', '.join(TARGETS)})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # one order: PEFT's is a set

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def a_init(rng, shape, dtype=jnp.float32):
    """PEFT's default A: kaiming-uniform with a = sqrt(5) over the input dimension (bound 1 / sqrt(K))."""
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2, out_axis=-1)(rng, shape, dtype)


class LoraDense(nn.Module):
    """`base` (a dense layer, in its own parameter scope) plus the low-rank update; see the module doc."""

    base: nn.Module
    spec: LoraSpec
    deterministic: bool = True

    def setup(self):
        nn.share_scope(self, self.base)

    @nn.compact
    def __call__(self, x):
        y = self.base(x)
        K, N, r, L = x.shape[-1], y.shape[-1], self.spec.rank, self.spec.slots
        if not L:
            a = self.param("lora_a", a_init, (K, r), jnp.float32)
            b = self.param("lora_b", nn.initializers.zeros_init(), (r, N), jnp.float32)
            h = nn.Dropout(self.spec.dropout)(x, deterministic=self.deterministic or not self.spec.dropout)
            dtype, scale = y.dtype, jnp.asarray(self.spec.scale, y.dtype)
            # scaled on the rank-r side: [tokens, r] values, where scaling the [tokens, N] update
            # (and its gradient) was one more pass over the layer's whole output each way
            delta = flat_tokens(lambda t: ((t.astype(dtype) @ a.astype(dtype)) * scale) @ b.astype(dtype), h)
            return y + delta
        a = self.param("lora_a", nn.initializers.zeros_init(), (L, K, r), jnp.float32)
        b = self.param("lora_b", nn.initializers.zeros_init(), (L, r, N), jnp.float32)
        rows = self.get_variable(ROWS, "rows")
        if rows is None:  # no rows named: every row runs the base model
            return y
        assert rows.shape == x.shape[:1], (rows.shape, x.shape)
        return jax.lax.cond(jnp.any(rows >= 0), lambda: y + batched_update(x, a, b, rows).astype(y.dtype), lambda: y)


def batched_update(x, a, b, rows):
    """x [B, T, K] through each row's adapter: A [L, K, r], B [L, r, N], rows [B] (-1: none). Every
    row's input goes through all L adapters' A (one product over [K, L*r]), a one-hot of its slot keeps
    its own, and one product over [L*r, N] applies its B: the adapters are read once per step whatever
    the batch, where gathering A and B per row (BGMV) reads them once per row."""
    L, K, r = a.shape
    pick = (rows[:, None] == jnp.arange(L)[None]).astype(jnp.float32)  # [B, L]
    xf = x.astype(jnp.float32)
    h = (xf @ a.transpose(1, 0, 2).reshape(K, L * r)).reshape(*x.shape[:-1], L, r)
    h = h * pick[:, None, :, None]
    return h.reshape(*x.shape[:-1], L * r) @ b.reshape(L * r, -1)


def wrap(layer: nn.Module, spec: LoraSpec | None, name: str | None, deterministic: bool = True) -> nn.Module:
    """`layer` with an adapter when `spec` targets its `name`, else `layer` itself."""
    if spec is None or name not in spec.targets:
        return layer
    return LoraDense(layer, spec, deterministic)


# ----------------------------------------------------------------------- trees
def init_adapter(model, rng) -> dict:
    """A fresh adapter tree for `model` (built with a LoraSpec), without making its base weights: A as
    PEFT's default, B zero, so training starts from the base model's outputs."""
    _, shapes = split(model.params_shape())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    made = [a_init(jax.random.fold_in(rng, i), s.shape, jnp.float32) if is_a(path) else jnp.zeros(s.shape, jnp.float32)
            for i, (path, s) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, made)


def is_a(path) -> bool:
    return str(getattr(path[-1], "key", path[-1])) == "lora_a"


def split(params: dict) -> tuple[dict, dict]:
    """(base, adapter): the tree without its lora_a / lora_b leaves, and those leaves alone."""

    def walk(node):
        if not isinstance(node, dict):
            return node, None
        base, adapter = {}, {}
        for k, v in node.items():
            if k in ("lora_a", "lora_b"):
                adapter[k] = v
                continue
            b, a = walk(v)
            base[k] = b
            if a:
                adapter[k] = a
        return base, adapter

    return walk(params)


def merge(base: dict, adapter: dict) -> dict:
    """The inverse of `split`: base and adapter leaves in one tree."""
    out = dict(base)
    for k, v in adapter.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) else v
    return out


def rows_collection(adapter_like: dict, rows) -> dict:
    """The "lora_rows" variables for a model whose served adapters look like `adapter_like`: `rows`
    ([B] int32) at every adapted layer (one array, shared; nothing is copied)."""

    def walk(node):
        if "lora_a" in node:
            return {"rows": rows}
        return {k: walk(v) for k, v in node.items() if isinstance(v, dict)}

    return walk(adapter_like)


def merged_kernels(params: dict, spec: LoraSpec) -> dict:
    """A float model's params with each trained adapter folded into its kernel (W + A @ B * alpha / r)
    and the adapter leaves dropped: the tree of the plain model, as PEFT's `merge_and_unload` gives."""
    base, adapter = split(params)

    def walk(b, a):
        if "lora_a" in a:
            if b["kernel"].dtype in (jnp.int8, jnp.uint8):
                raise ValueError("merging an adapter into 8- or 4-bit weights is not supported: merge into the "
                                 "float checkpoint")
            w = b["kernel"]
            delta = (a["lora_a"].astype(jnp.float32) @ a["lora_b"].astype(jnp.float32)) * spec.scale
            return {**b, "kernel": (w.astype(jnp.float32) + delta).astype(w.dtype)}
        return {k: walk(b[k], a[k]) if k in a else b[k] for k in b}

    return walk(base, adapter)
