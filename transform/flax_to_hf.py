"""easympt params -> Hugging Face MPT checkpoint (safetensors shards + index)."""

from __future__ import annotations

import contextlib
import json
import os

import jax
import numpy as np

from easympt.distributed import to_host
from easympt.checkpoint import atomic_directory
from easympt.config import MptConfig
from easympt.dtypes import resolve_dtype
from easympt.model import unwrap_params
from easympt.sharding import path_str
from easympt.transform.names import flax_to_hf_name

_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}


def parse_size(size) -> int:
    """'5GB', '500MiB' or an int of bytes."""
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * _UNITS[unit])
    return int(s)


def plan_shards(sizes: list[tuple[int, int]], limit: int) -> list[list[int]]:
    """Group (nbytes, id) in order into shards of at most `limit` bytes (a
    larger tensor gets a shard of its own), as transformers does."""
    shards, current, size = [], [], 0
    for nbytes, i in sizes:
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    shards.append(current)
    return shards


def mpt_to_pretrained(params, config: MptConfig, out_dir: str, max_shard_size="5GB", tokenizer=None,
                      dtype=None, dequantize: bool = False) -> str:
    """Write a checkpoint that transformers' MptForCausalLM loads unchanged.

    Everything is written into a temporary sibling directory that is renamed
    onto `out_dir` at the end, so an interrupted export never looks complete.

    8- or 4-bit params (easympt.kernels.quant) are refused: transformers' MptForCausalLM has no such
    weights. `dequantize=True` writes the float weights they stand for instead (the quantization
    error stays in them; in `dtype`, default float32).
    """
    from safetensors.numpy import save_file

    from easympt.transform.quantized import dequantize_params, params_format

    params = unwrap_params(params)
    fmt = params_format(params)
    if fmt is not None:
        if not dequantize:
            raise ValueError(f"these params hold {fmt} weights, which transformers' MptForCausalLM cannot load: pass "
                             "dequantize=True (easympt convert --dequantize) to write the float weights they stand "
                             "for, or keep them as a quantized easympt checkpoint (easympt convert --quantize)")
        params = dequantize_params(params)
    dtype = resolve_dtype(dtype)
    limit = parse_size(max_shard_size)
    out_dir = os.path.abspath(out_dir)
    writer = jax.process_index() == 0  # every process joins the gathers; one writes
    with atomic_directory(out_dir) if writer else contextlib.nullcontext() as tmp:
        leaves = [(flax_to_hf_name(path_str(path)), leaf)
                  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
        shards = plan_shards([(np.dtype(dtype or leaf.dtype).itemsize * leaf.size, i)
                              for i, (_, leaf) in enumerate(leaves)], limit)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):  # one shard in host memory at a time
            tensors = {}
            for i in shard:
                (hf_name, transpose), leaf = leaves[i]
                arr = to_host(leaf)
                if dtype is not None:
                    arr = arr.astype(dtype)
                tensors[hf_name] = np.ascontiguousarray(arr.T if transpose else arr)
            if writer:
                save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in tensors})
            total += sum(a.nbytes for a in tensors.values())
            del tensors
        if writer:
            if len(shards) > 1:
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
            config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    if jax.process_count() > 1:  # no process returns before the writer has put the directory in place
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"easympt export {out_dir}")
    return out_dir
