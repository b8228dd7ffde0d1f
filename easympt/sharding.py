"""Meshes, partition rules and activation constraints, in one place.

Parameters are matched to PartitionSpecs by regex over their '/'-joined path
(EasyLM's habit); a parameter that no rule matches is an error, never a silent
replicate. Activations name logical axes ("batch", "heads", ...) that
LOGICAL_AXIS_RULES maps onto the mesh axes ("dp", "fsdp", "tp", "sp").
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("dp", "fsdp", "tp", "sp")

LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("dp", "fsdp"),
    "length": "sp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "vocab": "tp",
    "kv_length": None,
}


class PartitionRuleError(ValueError):
    """Raised when a parameter matches no partition rule."""


class MeshFitError(ValueError):
    """A mesh axis that does not divide the tensor dimension a rule shards over it."""


def create_mesh(shape: Sequence[int] = (1, -1, 1, 1), axis_names: Sequence[str] = MESH_AXES,
                devices=None) -> Mesh:
    """A mesh over all (global) devices; one -1 in `shape` takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"mesh shape {tuple(shape)} has {len(shape)} axes but names {tuple(axis_names)}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(shape)} has more than one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not fill mesh shape {tuple(shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, have {len(devices)}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, tuple(axis_names))


def mpt_partition_rules(fsdp: bool = True) -> tuple[tuple[str, P], ...]:
    """FSDP shards the large dimension of every matrix over 'fsdp'; tensor parallel
    splits heads, FFN and vocab over 'tp'. Kernels are [in, out]."""
    f = "fsdp" if fsdp else None
    return (
        (r"transformer/wte/embedding$", P("tp", f)),
        (r"transformer/wpe/embedding$", P(None, f)),
        (r"attn/Wqkv/kernel$", P(f, "tp")),
        (r"attn/Wqkv/bias$", P("tp")),
        (r"attn/out_proj/kernel$", P("tp", f)),
        (r"attn/out_proj/bias$", P(None)),
        (r"attn/(q_ln|k_ln)/(scale|bias)$", P(None)),
        (r"ffn/(up_proj|gate_proj)/kernel$", P(f, "tp")),
        (r"ffn/(up_proj|gate_proj)/bias$", P("tp")),
        (r"ffn/down_proj/kernel$", P("tp", f)),
        (r"ffn/down_proj/bias$", P(None)),
        (r"(norm_1|norm_2|norm_f)/(scale|bias)$", P(None)),
        (r"lm_head/kernel$", P(f, "tp")),
        # 8- and 4-bit matrices (easympt.kernels.quant): the scale has its matrix's rank and shards with it
        (r"transformer/wte/scale$", P("tp", f)),
        (r"attn/Wqkv/scale$", P(f, "tp")),
        (r"attn/out_proj/scale$", P("tp", f)),
        (r"ffn/(up_proj|gate_proj)/scale$", P(f, "tp")),
        (r"ffn/down_proj/scale$", P("tp", f)),
        (r"lm_head/scale$", P(f, "tp")),
        (r"lm_head/bias$", P("tp")),
        # LoRA adapters (easympt.adapters.lora): A [in, r] shards its input like the kernel, B [r, out] its output
        (r"(Wqkv|up_proj|gate_proj)/lora_a$", P(f, None)),
        (r"(Wqkv|up_proj|gate_proj)/lora_b$", P(None, "tp")),
        (r"(out_proj|down_proj)/lora_a$", P("tp", None)),
        (r"(out_proj|down_proj)/lora_b$", P(None, f)),
        # task heads: a handful of outputs, so only the input dimension is sharded
        (r"^(score|classifier|qa_outputs)/kernel$", P(f, None)),
        (r"^(classifier|qa_outputs)/bias$", P(None)),
    )


def path_str(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def spec_for(name: str, rules) -> P:
    for pattern, spec in rules:
        if re.search(pattern, name):
            return spec
    raise PartitionRuleError(f"no partition rule matches parameter {name!r}")


def match_partition_rules(rules, params):
    """PartitionSpec tree for `params` (arrays or ShapeDtypeStructs); lists every unmatched path."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs, missing = [], []
    for path, leaf in flat:
        name = path_str(path)
        try:
            spec = spec_for(name, rules)
        except PartitionRuleError:
            missing.append(name)
            continue
        if len(spec) > len(np.shape(leaf)):
            raise PartitionRuleError(f"rule for {name!r} gives {spec} but the parameter has shape {np.shape(leaf)}")
        specs.append(spec)
    if missing:
        raise PartitionRuleError("no partition rule matches these parameters: " + ", ".join(missing))
    return jax.tree_util.tree_unflatten(treedef, specs)


MISFIT = ("replicate", "warn", "raise")


def fit_spec(spec: P, shape: Sequence[int], mesh, misfit: str = "warn", name: str = "tensor") -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. a 256-token vocab over 3 devices).

    misfit: "warn" (parameters: logged, replicated), "replicate" (activations such as a batch of
    one: silently), "raise" (MeshFitError: memory plans and real-size checks). A dimension of size 1
    (an int8 scale's) is replicated silently; a quantized matrix's scale [groups, N] that does not
    divide always raises: its groups must split as its kernel's rows do."""
    quant_scale = name.endswith("/scale") and len(shape) == 2
    out = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if size > 1 and dim % size and dim > 1:
            msg = (f"{name} {tuple(shape)}: dimension {i} of size {dim} does not divide over mesh axis "
                   f"{'x'.join(names)} of size {size} (mesh {dict(mesh.shape)})")
            if quant_scale:
                msg += "; a quantized matrix's scales (int4: one per 32 input rows) shard as its kernel does"
            if misfit == "raise" or quant_scale:
                raise MeshFitError(msg)
            if misfit == "warn":
                log.warning("%s; that dimension is replicated instead", msg)
            axes = None
        if dim == 1:
            axes = None
        out.append(axes)
    return P(*out)


def named_sharding(mesh: Mesh, spec: P, shape: Sequence[int], misfit: str = "warn",
                   name: str = "tensor") -> NamedSharding:
    return NamedSharding(mesh, fit_spec(spec, shape, mesh, misfit=misfit, name=name))


def shardings_for(mesh, params, rules, misfit: str = "warn"):
    """NamedSharding tree for `params` (arrays or ShapeDtypeStructs; an AbstractMesh works too)."""
    specs = jax.tree_util.tree_leaves(match_partition_rules(rules, params), is_leaf=lambda x: isinstance(x, P))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(treedef, [
        named_sharding(mesh, spec, np.shape(x), misfit=misfit, name=path_str(path))
        for (path, x), spec in zip(flat, specs)])


def logical_spec(names: Sequence[str | None]) -> P:
    return P(*(LOGICAL_AXIS_RULES.get(n) if n else None for n in names))


def constrain(x, mesh: Mesh | None, names: Sequence[str | None]):
    """with_sharding_constraint by logical axis names; a no-op without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_spec(names), x.shape, misfit="replicate"))
