"""A memory plan from a config alone: what a model needs before anyone buys hardware for it.

Parameters are built abstractly (`jax.eval_shape`: nothing allocated) and placed on an
abstract mesh by the same partition rules loading uses, so the per-device figure is what
`mpt_from_pretrained(..., mesh=...)` would really hold. A rule whose mesh axis does not
divide its tensor is an error here (loading would replicate that tensor instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AbstractMesh

from easympt.cache import CACHE_AXES, resolve_kv_dtype
from easympt.config import MptConfig
from easympt.dtypes import resolve_dtype
from easympt.sharding import MESH_AXES, logical_spec, named_sharding, shardings_for

GB = 10**9


def gigabytes(n: int) -> str:
    return f"{n / GB:,.2f} GB"


def device_memory_line(used: int, device_memory: int | None, what: str = "") -> list[str]:
    """The summary line that says whether `used` bytes fit `device_memory` (none without a memory)."""
    if device_memory is None:
        return []
    verdict = "fits" if used <= device_memory else "does NOT fit"
    share = f"{used / device_memory:.0%}" + (f" used by {what}" if what else "")
    return [f"device memory     {gigabytes(device_memory)}: {verdict} ({share})"]


def parse_mesh(mesh: str | tuple | dict | None) -> dict[str, int]:
    """'1,8,2,1' (dp,fsdp,tp,sp), a tuple, or {'fsdp': 8, 'tp': 2} -> {axis: size} over MESH_AXES."""
    if mesh is None:
        return dict.fromkeys(MESH_AXES, 1)
    if isinstance(mesh, dict):
        unknown = set(mesh) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} are not among {', '.join(MESH_AXES)}")
        return {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    sizes = [int(x) for x in mesh.split(",")] if isinstance(mesh, str) else [int(x) for x in mesh]
    if len(sizes) != len(MESH_AXES) or any(s < 1 for s in sizes):
        raise ValueError(f"mesh {mesh!r}: give {len(MESH_AXES)} positive sizes for {','.join(MESH_AXES)}")
    return dict(zip(MESH_AXES, sizes))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs, whole and per device (the busiest device of the mesh)."""

    dtype: str
    n_params: int
    param_bytes: int
    kv_bytes_per_token: int  # K and V of every layer for one token
    max_length: int
    batch_size: int
    mesh: dict[str, int]
    device_param_bytes: int
    device_kv_bytes: int
    device_memory: int | None = None
    kv_dtype: str = ""  # the cache's dtype name (int8: scales counted)
    notes: list[str] = field(default_factory=list)
    prefix_cache_bytes: int = 0  # the server's prefix-cache pool (one device holds it)
    prefix_blocks: int = 0
    block_tokens: int = 0

    @property
    def kv_bytes_per_request(self) -> int:
        return self.kv_bytes_per_token * self.max_length

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_bytes_per_request * self.batch_size

    @property
    def n_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def device_bytes(self) -> int:
        """Weights + KV cache (+ the prefix cache's pool) on one device (activations and compiler scratch
        come on top)."""
        return self.device_param_bytes + self.device_kv_bytes + self.prefix_cache_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.device_bytes <= self.device_memory

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "n_params": self.n_params, "param_bytes": self.param_bytes,
                "kv_dtype": self.kv_dtype, "kv_bytes_per_token": self.kv_bytes_per_token,
                "kv_bytes_per_request": self.kv_bytes_per_request,
                "kv_cache_bytes": self.kv_cache_bytes, "max_length": self.max_length,
                "batch_size": self.batch_size, "mesh": self.mesh, "n_devices": self.n_devices,
                "device_param_bytes": self.device_param_bytes, "device_kv_bytes": self.device_kv_bytes,
                "prefix_cache_bytes": self.prefix_cache_bytes, "prefix_blocks": self.prefix_blocks,
                "block_tokens": self.block_tokens,
                "device_bytes": self.device_bytes, "device_memory": self.device_memory, "fits": self.fits,
                "notes": self.notes}

    def summary(self) -> str:
        g = gigabytes
        lines = [
            f"parameters        {self.n_params / 1e9:,.3f} B = {g(self.param_bytes)} in {self.dtype}",
            f"KV cache          {self.kv_bytes_per_token / 2**20:,.3f} MiB per token ({self.kv_dtype}), "
            f"{g(self.kv_bytes_per_request)} per request of {self.max_length} tokens, "
            f"{g(self.kv_cache_bytes)} for batch {self.batch_size}",
            f"mesh              {'x'.join(f'{a}={n}' for a, n in self.mesh.items())} ({self.n_devices} devices)",
        ]
        pool = ""
        if self.prefix_cache_bytes:
            lines.append(f"prefix cache      {g(self.prefix_cache_bytes)}: {self.prefix_blocks} blocks of "
                         f"{self.block_tokens} tokens, on one device")
            pool = f" + {g(self.prefix_cache_bytes)} prefix cache"
        lines.append(f"per device        {g(self.device_param_bytes)} weights + {g(self.device_kv_bytes)} KV cache"
                     f"{pool} = {g(self.device_bytes)} (activations and compiler scratch come on top)")
        lines += device_memory_line(self.device_bytes, self.device_memory, "weights + cache")
        lines += [f"note              {n}" for n in self.notes]
        return "\n".join(lines)


def _shard_bytes(sharding, shape, itemsize) -> int:
    return int(np.prod(sharding.shard_shape(tuple(shape)), dtype=np.int64)) * itemsize


def memory_plan(config: MptConfig, dtype="bf16", max_length: int | None = None, batch_size: int = 1,
                mesh=None, device_memory: int | float | None = None, kv_dtype=None,
                quantize: str | None = None, prefix_cache_bytes: int = 0, block_tokens: int = 64) -> MemoryPlan:
    """Parameter, KV-cache and per-device bytes of `config` (weights in `dtype`, cache in `kv_dtype`,
    default the same) on a mesh of abstract devices. `quantize` ("int8", "int4"): the matrices in
    that weight-only format (scales counted; norms and biases stay in `dtype`). Raises MeshFitError
    naming the tensor, the axis, the size and the mesh when a partition rule cannot shard a tensor
    evenly (an int4 scale's group count included). `prefix_cache_bytes`: a server's prefix-cache budget
    (blocks of `block_tokens`, its max_compile_tokens), counted as the server sizes its pool: whole
    blocks, at most CONTEXTS_PER_SLOT contexts per decode slot, on one device."""
    from easympt.heads import model_class_for

    dtype = np.dtype(resolve_dtype(dtype))
    kv_dtype = np.dtype(resolve_kv_dtype(kv_dtype) or dtype)
    max_length = max_length or config.max_seq_len
    sizes = parse_mesh(mesh)
    abstract = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    model_class = model_class_for(config)
    n_params = sum(int(np.prod(x.shape, dtype=np.int64))
                   for x in jax.tree_util.tree_leaves(model_class(config, _do_init=False).params_shape()))
    shapes = model_class(config, _do_init=False, param_dtype=dtype, quantize=quantize).params_shape()
    leaves = jax.tree_util.tree_leaves(shapes)
    shardings = jax.tree_util.tree_leaves(shardings_for(abstract, shapes, config.get_partition_rules(),
                                                        misfit="raise"))
    param_bytes = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)
    device_param_bytes = sum(_shard_bytes(s, x.shape, np.dtype(x.dtype).itemsize) for s, x in zip(shardings, leaves))

    per_layer = (batch_size, config.kv_heads, max_length, config.head_dim)
    cache_sharding = named_sharding(abstract, logical_spec(CACHE_AXES), per_layer, misfit="replicate")
    # an int8 cache keeps a float32 scale per token and KV head next to the head's D bytes (Int8Slots)
    slot_bytes = kv_dtype.itemsize + (4 / config.head_dim if kv_dtype == np.int8 else 0)
    device_kv = int(2 * config.n_layers * _shard_bytes(cache_sharding, per_layer, 1) * slot_bytes)
    notes = []
    if max_length > config.max_seq_len:
        notes.append(f"max_length {max_length} is past the trained max_seq_len {config.max_seq_len} "
                     "(ALiBi extrapolates; learned positions cannot)")
    if cache_sharding.spec[0] is None and sizes["dp"] * sizes["fsdp"] > 1:
        notes.append(f"batch {batch_size} does not divide dp x fsdp = {sizes['dp'] * sizes['fsdp']}: "
                     "every device holds the whole batch's cache")
    if cache_sharding.spec[1] is None and sizes["tp"] > 1:
        notes.append(f"{config.kv_heads} KV head(s) do not divide tp = {sizes['tp']}: the cache is "
                     "replicated over tp")
    kv_bytes_per_token = int(2 * config.n_layers * config.kv_heads * config.head_dim * slot_bytes)
    from easympt.generation.prefix_cache import blocks_for_budget

    block = kv_bytes_per_token * int(block_tokens)  # the server's pool: whole blocks, by its own rule
    blocks = blocks_for_budget(int(prefix_cache_bytes), block, int(block_tokens), batch_size, max_length)
    return MemoryPlan(
        dtype=f"{quantize} ({dtype.name} norms and biases)" if quantize else dtype.name, n_params=n_params,
        param_bytes=param_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
        max_length=max_length, batch_size=batch_size, mesh=sizes, device_param_bytes=device_param_bytes,
        device_kv_bytes=device_kv, device_memory=None if device_memory is None else int(device_memory),
        kv_dtype=kv_dtype.name, notes=notes, prefix_cache_bytes=blocks * block, prefix_blocks=blocks,
        block_tokens=int(block_tokens) if blocks else 0)
