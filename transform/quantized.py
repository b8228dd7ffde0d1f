"""8- and 4-bit weights on the way in and out: quantizing a checkpoint while it streams in, the
quantized easympt checkpoint (`easympt convert SRC DST --quantize int4`), and the float tree a
quantized one stands for (exporting to Hugging Face, whose MptForCausalLM has no such weights).

A quantized checkpoint directory holds the model's config.json, `easympt_quantized.json` ({"quantize":
"int8" | "int4"}) and `easympt_weights.safetensors`: every parameter under its '/'-joined flax name,
as the quantized model holds it (bfloat16 scales as their uint16 bits). It loads as is with
`mpt_from_pretrained(DIR)` and everything built on it (no requantization, no float copy).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from easympt.config import MptConfig
from easympt.kernels import quant

MARKER = "easympt_quantized.json"
WEIGHTS = "easympt_weights.safetensors"


def quantized_format(ckpt_dir: str) -> str | None:
    """The weight format of a quantized easympt checkpoint directory; None for any other checkpoint."""
    path = os.path.join(ckpt_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return quant.check_format(json.load(fh).get("quantize"))


def is_quantized_leaf(x) -> bool:
    return jnp.dtype(x.dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.uint8))


def params_format(params) -> str | None:
    """"int8" / "int4" for a tree holding 8- or 4-bit matrices (int4: uint8 pairs), None for float."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(params)}
    if jnp.dtype(jnp.uint8) in dtypes:
        return "int4"
    return "int8" if jnp.dtype(jnp.int8) in dtypes else None


def dequantize_params(params, dtype=jnp.float32):
    """The float tree a quantized one stands for (kernels [K, N], embedding [V, E]; no "scale" entries)."""

    def walk(node):
        if not isinstance(node, dict):
            return node
        w = node.get("kernel", node.get("embedding"))
        if w is not None and "scale" in node and is_quantized_leaf(w):
            rest = {k: v for k, v in node.items() if k not in ("kernel", "embedding", "scale")}
            if "embedding" in node:  # per-row int8 [V, E] with scale [V, 1]
                return {**rest, "embedding": quant.dequantize(w, node["scale"], dtype)}
            return {**rest, "kernel": quant.dequantize(w, node["scale"], dtype)}
        return {k: walk(v) for k, v in node.items()}

    return walk(params)


CHUNK_FLOATS = 1 << 24  # float32 values quantized at once (64 MB): the transient memory of quantizing


def quantize_tensor(name: str, read, shape: tuple, expected: dict) -> dict[str, np.ndarray]:
    """A float matrix `name` of a checkpoint as the quantized model holds it: {name: q, <module>/scale: s},
    in the format `expected` (the quantized model's flat ShapeDtypeStructs) gives it. `read(index)` gives
    the float32 values of `shape`[index]; the matrix is read and quantized in slices along the axis its
    scales do not span (a kernel's columns, an embedding's rows), so the transient memory is one slice
    of CHUNK_FLOATS values, not a float32 copy of the matrix (mpt-7b's embedding: 826 MB). Computed on
    this process's first CPU device (in a multi-process run jax.devices("cpu")[0] may be another
    host's)."""
    q_want = expected[name]
    scale_name = name.rsplit("/", 1)[0] + "/scale"
    s_want = expected[scale_name]
    fmt = "int4" if q_want.dtype == jnp.uint8 else "int8"
    embedding = name.endswith("embedding")  # [V, E], a scale per row; kernels [K, N], scales per column
    rows, cols = shape
    if fmt == "int4":
        quant.check_int4_shape(shape, name)
    q = np.empty(q_want.shape, q_want.dtype)
    scale = np.empty(s_want.shape, s_want.dtype)
    along = rows if embedding else cols
    step = max(1, CHUNK_FLOATS // (cols if embedding else rows))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        for a in range(0, along, step):
            part = slice(a, min(a + step, along))
            index = (part,) if embedding else (slice(None), part)
            arrays = quant.quantize(jnp.asarray(read(index)), fmt, axis=1 if embedding else 0)
            q[index], scale[index] = np.asarray(arrays["q"]), np.asarray(arrays["scale"])
    return {name: q, scale_name: scale}


def quantize_params(params, config: MptConfig, quantize: str) -> dict:
    """Float params (a loaded model's) in weight format `quantize`, one matrix at a time: the tree
    `FlaxMptForCausalLM(config, quantize=quantize)` (or the config's head class) takes."""
    from easympt.heads import model_class_for
    from easympt.sharding import path_str
    from easympt.transform.hf_to_flax import _flat_structs, _nest

    expected = _flat_structs(model_class_for(config)(config, _do_init=False, quantize=quant.check_format(quantize))
                             .params_shape())
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        if name in expected and is_quantized_leaf(expected[name]):
            out.update(quantize_tensor(name, lambda index, x=x: np.asarray(x[index], np.float32), x.shape, expected))
        else:
            out[name] = x
    return _nest(out)


def save_quantized(params, config: MptConfig, out_dir: str, tokenizer=None) -> str:
    """Write a quantized easympt checkpoint (the module docstring); atomically, as every export."""
    from safetensors.numpy import save_file

    from easympt.checkpoint import atomic_directory
    from easympt.distributed import to_host
    from easympt.sharding import path_str

    fmt = params_format(params)
    if fmt is None:
        raise ValueError("save_quantized takes 8- or 4-bit params (mpt_from_pretrained(..., quantize=...))")
    tensors = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = to_host(leaf)
        if arr.dtype == ml_dtypes.bfloat16:
            arr = arr.view(np.uint16)  # safetensors' numpy writer knows no bfloat16: its bits
        tensors[path_str(path)] = np.ascontiguousarray(arr)
    out_dir = os.path.abspath(out_dir)
    if jax.process_index() == 0:
        with atomic_directory(out_dir) as tmp:
            save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "easympt", "quantize": fmt})
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as fh:  # last: marks it complete
                json.dump({"quantize": fmt}, fh)
    return out_dir


def read_quantized(ckpt_dir: str, expected: dict) -> dict:
    """{flat name: LazyTensor-like reader} of a quantized checkpoint, checked against the quantized
    model's flat ShapeDtypeStructs `expected`: one error names every missing, extra or misshaped tensor
    (a missing scale included)."""
    from easympt.transform.hf_to_flax import CheckpointError, open_safetensors

    path = os.path.join(ckpt_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: {MARKER} is there but {WEIGHTS} is missing")
    tensors = {t.name: t for t in open_safetensors(path)}
    problems = []
    missing = sorted(set(expected) - set(tensors))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    extra = sorted(set(tensors) - set(expected))
    if extra:
        problems.append("unexpected: " + ", ".join(extra))
    for name in sorted(set(tensors) & set(expected)):
        t, want = tensors[name], expected[name]
        if tuple(t.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(t.shape)}, expected {tuple(want.shape)}")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: quantized checkpoint does not match its config.json — "
                              + " | ".join(problems))
    return tensors


def as_stored(t, want) -> np.ndarray:
    """A quantized checkpoint's tensor as the model holds it (bfloat16 scales from their uint16 bits)."""
    arr = t[()]
    if jnp.dtype(want.dtype) == jnp.bfloat16 and arr.dtype == np.uint16:
        return arr.view(ml_dtypes.bfloat16)
    if arr.dtype != jnp.dtype(want.dtype):
        from easympt.transform.hf_to_flax import CheckpointError

        raise CheckpointError(f"{t.path}: tensor {t.name!r} is {arr.dtype}, the quantized model holds "
                              f"{jnp.dtype(want.dtype)}")
    return arr
