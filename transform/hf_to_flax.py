"""Hugging Face MPT checkpoint -> easympt params, one tensor at a time.

Every file is opened lazily (safetensors headers, torch's mmap), the whole
key set and every shape are checked before a byte of weight is read, and each
tensor is converted and placed on its final device(s) at once, so host memory
holds about one tensor beyond what the devices hold. With a mesh each process
reads only the slices its own devices own (`make_array_from_callback`), which
is what a multi-host pod needs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
import ml_dtypes
import numpy as np

from easympt.config import MptConfig
from easympt.dtypes import default_compute_dtype, resolve_dtype
from easympt.heads import model_class_for
from easympt.kernels import quant
from easympt.transform import quantized
from easympt.sharding import named_sharding, spec_for
from easympt.transform.names import TIED_ALIASES, hf_to_flax_name

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken")
HUB_BIN_PATTERNS = ("*.json", "*.bin", "*.model", "*.txt", "*.tiktoken")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: names every bad tensor or file."""


def load_tokenizer(ckpt_dir: str):
    """AutoTokenizer.from_pretrained(ckpt_dir), also for a config transformers' MptConfig refuses:
    AutoTokenizer reads config.json, and transformers' strict MptConfig rejects what it does not
    implement (grouped-query attention: replit-code-v1_5-3b), though easympt runs it and the tokenizer
    does not depend on it. The tokenizer's own files decide its class then."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        return AutoTokenizer.from_pretrained(ckpt_dir)
    except StrictDataclassError:  # the config's validation, not the tokenizer's files
        return AutoTokenizer.from_pretrained(ckpt_dir, config=PretrainedConfig())


# ------------------------------------------------------------------ resolving
def resolve_checkpoint_dir(source: str, revision: str | None = None, local_files_only: bool = False) -> str:
    """A local directory holding config.json and weights.

    `source` is a directory (a Hugging Face cache snapshot is one), or a hub
    id that huggingface_hub resolves from its cache first and only then from
    the hub (never when HF_HUB_OFFLINE or `local_files_only` is set).
    """
    if os.path.isdir(source):
        return source
    if os.path.exists(source):
        raise FileNotFoundError(f"{source}: is a file; give the checkpoint directory (with config.json)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(source)
    except HFValidationError:
        raise FileNotFoundError(f"{source}: not a local directory and not a valid hub id (org/name)") from None
    for patterns in (HUB_PATTERNS, HUB_BIN_PATTERNS):
        try:
            path = snapshot_download(source, revision=revision, local_files_only=True,
                                     allow_patterns=list(patterns))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
            continue
        if _weight_files_or_none(path):
            return path
    if local_files_only or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(
            f"{source}: not a local directory and not in the Hugging Face cache "
            "(offline: local_files_only or HF_HUB_OFFLINE is set)")
    try:
        path = snapshot_download(source, revision=revision, allow_patterns=list(HUB_PATTERNS))
        if not _weight_files_or_none(path):
            path = snapshot_download(source, revision=revision, allow_patterns=list(HUB_BIN_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: say which source failed and why
        raise FileNotFoundError(f"{source}: not a local directory, and the hub could not provide it ({e})") from e
    return path


def _weight_files_or_none(path: str) -> list[str] | None:
    try:
        return weight_files(path)
    except FileNotFoundError:
        return None


def weight_files(ckpt_dir: str) -> list[str]:
    """Weight files of a checkpoint, safetensors preferred, sharded index files followed."""
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        ipath = os.path.join(ckpt_dir, index)
        if os.path.isfile(ipath):
            try:
                with open(ipath, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{ipath}: not a valid index file ({e})") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(ckpt_dir, f))]
            if missing:
                raise CheckpointError(f"{ipath}: shard file(s) missing: {', '.join(missing)}")
            return [os.path.join(ckpt_dir, f) for f in files]
        spath = os.path.join(ckpt_dir, single)
        if os.path.isfile(spath):
            return [spath]
    raise FileNotFoundError(f"{ckpt_dir}: no {SAFE_SINGLE}, {BIN_SINGLE} or their .index.json")


# ------------------------------------------------------------- lazy tensors
@dataclass
class LazyTensor:
    """A tensor in a file: shape known, data read on indexing (numpy out)."""

    path: str
    name: str
    shape: tuple
    reader: Any

    def __getitem__(self, index) -> np.ndarray:
        try:
            return self.reader(index)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {self.name!r} (corrupt or truncated?): {e}") from e


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16,
                       "BOOL": np.bool_}


def _safetensors_header(path: str) -> tuple[dict, int]:
    """(header, offset of the data section); raises naming the file on anything malformed."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of a "
                                  f"{data_size}-byte data section")
    return header, 8 + n


def open_safetensors(path: str) -> Iterator[LazyTensor]:
    """Tensors read straight from the file into their own buffers.

    The safetensors library maps the whole file, and every mapped page a
    conversion touches stays in the process's resident set until the file
    is closed: a single-file checkpoint would then cost two copies of the
    weights. Reading each tensor (or the rows a shard needs) with
    `np.fromfile` keeps host memory at one tensor beyond the result.
    """
    header, data_start = _safetensors_header(path)
    for name, info in header.items():
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        begin = data_start + info["data_offsets"][0]

        def read(index, shape=shape, dtype=dtype, begin=begin):
            index = index if isinstance(index, tuple) else (index,)
            rows = index[0] if index and isinstance(index[0], slice) else slice(None)
            start, stop, step = rows.indices(shape[0]) if shape else (0, 1, 1)
            if step != 1 or not shape:
                start, stop, rest = 0, (shape[0] if shape else 1), index
            else:
                rest = (slice(None),) + tuple(index[1:])
            row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
            count = (stop - start) * row
            block = np.fromfile(path, dtype=dtype, count=count, offset=begin + start * row * dtype.itemsize)
            if block.size != count:
                raise ValueError(f"file ended after {block.size} of {count} elements")
            block = block.reshape((stop - start,) + shape[1:]) if shape else block.reshape(())
            return block[rest] if rest else block

        yield LazyTensor(path, name, shape, read)


def _release_pages(t) -> None:
    """Drop the mapped file pages behind a torch tensor (Linux): they are
    re-read from disk if touched again, so this only frees resident memory."""
    import ctypes
    import mmap

    try:
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        page = mmap.PAGESIZE
        start = ptr - ptr % page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(ptr + n - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass  # not Linux, or no libc symbol: memory is only held longer


def open_torch_bin(path: str) -> Iterator[LazyTensor]:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading .bin checkpoints needs torch: pip install 'easympt[torch]'") from None
    mapped = True
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state, mapped = torch.load(path, map_location="cpu", weights_only=True), False  # legacy format
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e

    def read(index, t):
        out = _torch_to_numpy(t[index]).copy()
        if mapped and sys.platform.startswith("linux"):
            _release_pages(t)
        return out

    for name, t in state.items():
        yield LazyTensor(path, name, tuple(t.shape), lambda index, t=t: read(index, t))


def open_checkpoint(files: list[str]) -> dict[str, LazyTensor]:
    tensors: dict[str, LazyTensor] = {}
    for path in files:
        opener = open_safetensors if path.endswith(".safetensors") else open_torch_bin
        for t in opener(path):
            tensors[t.name] = t
    return tensors


# -------------------------------------------------------------------- loading
def _flat_structs(tree) -> dict[str, jax.ShapeDtypeStruct]:
    from easympt.sharding import path_str

    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_tensors(tensors: dict[str, LazyTensor], expected: dict[str, tuple], config: MptConfig,
                  where: str) -> dict[str, tuple[LazyTensor, bool]]:
    """Map HF tensors onto expected params; one error lists every mismatch."""
    plan, unexpected, misshaped = {}, [], []
    for name, t in tensors.items():
        mapped = hf_to_flax_name(name)
        if mapped is None or mapped[0] not in expected:
            if config.tie_word_embeddings and name in TIED_ALIASES:
                continue
            hint = ""
            if name == "transformer.wpe.weight" and config.attn_config.alibi:
                hint = " (learned position embedding next to ALiBi is not supported)"
            unexpected.append(name + hint)
            continue
        flax_name, transpose = mapped
        shape = t.shape[::-1] if transpose else t.shape
        if shape != expected[flax_name]:
            misshaped.append(f"{name}: {t.shape}, expected {expected[flax_name][::-1] if transpose else expected[flax_name]}")
        plan[flax_name] = (t, transpose)
    missing = sorted(set(expected) - set(plan))
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(sorted(unexpected)))
    if misshaped:
        problems.append("wrong shape: " + "; ".join(misshaped))
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match its config.json — " + " | ".join(problems))
    return plan


CHUNK_BYTES = 8 << 20  # a converted tensor is read in row blocks of about this size


def _aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised 64-byte-aligned array: jax's CPU client adopts such
    a buffer without copying it, so a tensor is never held twice."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + 64, np.uint8)
    offset = (-buf.ctypes.data) % 64
    return buf[offset:offset + n].view(dtype).reshape(shape)


def read_converted(t: LazyTensor, transpose: bool, dtype, index=()) -> np.ndarray:
    """t[index] in flax layout and `dtype`, filled in row blocks of the file
    tensor, so the only transient memory is one block."""
    shape = t.shape[::-1] if transpose else t.shape
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    file_index = index[::-1] if transpose else index
    if not shape:
        return np.asarray(t[()], dtype=dtype)
    out = _aligned_empty(tuple(len(range(*i.indices(n))) for i, n in zip(index, shape)), dtype)
    lead = range(*file_index[0].indices(t.shape[0]))
    rows = max(1, CHUNK_BYTES // (4 * int(np.prod(t.shape[1:], dtype=np.int64))))
    for k in range(0, len(lead), rows):
        sub = lead[k:k + rows]
        block = t[(slice(sub.start, sub.stop, sub.step),) + file_index[1:]]
        if transpose:
            out[:, k:k + len(sub)] = block.T
        else:
            out[k:k + len(sub)] = block
    return out


def place_tensor(t: LazyTensor, transpose: bool, dtype, device=None, sharding=None) -> jax.Array:
    shape = t.shape[::-1] if transpose else t.shape
    if sharding is not None:
        out = jax.make_array_from_callback(shape, sharding, lambda index: read_converted(t, transpose, dtype, index))
    else:
        out = jax.device_put(read_converted(t, transpose, dtype), device)
    # transfers are asynchronous: waiting keeps host buffers from piling up behind them
    return out.block_until_ready()


def _nest(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def mpt_from_pretrained(source: str, device=None, dtype=None, mesh=None, partition_rules=None,
                        revision: str | None = None, local_files_only: bool = False,
                        progress: bool = True, quantize: str | None = None):
    """(params, config) from a Hugging Face MPT checkpoint (or a quantized easympt one).

    The params fit the class config.json's `architectures` names: the causal
    LM, or a task head (easympt.heads.model_class_for picks the wrapper).

    dtype: parameter dtype (default: float32 on CPU, bfloat16 on GPU/TPU); with `quantize`, the
    dtype of what stays float (norms, biases).
    device: put every array there (default: jax's default device).
    mesh: shard every array by `partition_rules` (default: the config's FSDP
    rules) straight into its NamedSharding.
    quantize: "int8" or "int4" (easympt.kernels.quant): every matrix is quantized as it streams in,
    one tensor at a time (host memory: the quantized bytes plus about one float tensor); the
    params then fit `FlaxMptForCausalLM(config, quantize=...)`. A quantized easympt checkpoint
    (easympt.transform.quantized) loads in its own format, and `quantize` may only repeat it.
    """
    ckpt_dir = resolve_checkpoint_dir(source, revision=revision, local_files_only=local_files_only)
    config = MptConfig.from_pretrained(ckpt_dir)
    dtype = np.dtype(resolve_dtype(dtype) or default_compute_dtype())
    quant.check_format(quantize)
    stored = quantized.quantized_format(ckpt_dir)
    if stored is not None and quantize not in (None, stored):
        raise ValueError(f"{ckpt_dir} holds {stored} weights; it cannot be loaded as {quantize} (convert the float "
                         "checkpoint instead)")
    quantize = quantize or stored
    model_class = model_class_for(config)
    expected = _flat_structs(model_class(config, _do_init=False, quantize=quantize, param_dtype=dtype).params_shape())
    if stored is not None:
        plan = quantized.read_quantized(ckpt_dir, expected)
    else:
        float_shapes = {k: v.shape for k, v in _flat_structs(model_class(config, _do_init=False).params_shape()).items()}
        plan = check_tensors(open_checkpoint(weight_files(ckpt_dir)), float_shapes, config, where=ckpt_dir)
    rules = None
    if mesh is not None:
        rules = partition_rules if partition_rules is not None else config.get_partition_rules(fsdp=True)
    if device is None and mesh is None:
        device = jax.local_devices()[0]  # jax.devices()[0] belongs to process 0 when there are several

    def place(name: str, host_or_tensor, transpose: bool = False):
        sharding = None
        if mesh is not None:
            sharding = named_sharding(mesh, spec_for(name, rules), expected[name].shape, name=name)
        if isinstance(host_or_tensor, np.ndarray):
            return place_array(host_or_tensor, device=device, sharding=sharding)
        return place_tensor(host_or_tensor, transpose, dtype, device=device, sharding=sharding)

    from tqdm.auto import tqdm

    flat = {}
    for name in tqdm(sorted(plan), desc=f"loading {os.path.basename(os.path.normpath(source))}",
                     unit="tensor", disable=not progress):
        if stored is not None:
            flat[name] = place(name, quantized.as_stored(plan[name], expected[name]))
            continue
        t, transpose = plan[name]
        if quantized.is_quantized_leaf(expected[name]):  # a matrix to quantize: read in float32 slices
            shape = t.shape[::-1] if transpose else t.shape
            read = functools.partial(read_converted, t, transpose, np.float32)
            for key, arr in quantized.quantize_tensor(name, read, shape, expected).items():
                flat[key] = place(key, arr)
        else:
            flat[name] = place(name, t, transpose)
    return _nest(flat), config


def place_array(arr: np.ndarray, device=None, sharding=None) -> jax.Array:
    """A host array on `device`, or sharded (each process places the slices its devices own)."""
    if sharding is not None:
        out = jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
    else:
        out = jax.device_put(arr, device)
    return out.block_until_ready()
