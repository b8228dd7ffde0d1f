"""easympt's own checkpoint format: orbax params plus the Hugging Face config.json.

A directory is an easympt checkpoint when it holds `config.json` and an
orbax `params/` item. Training checkpoints (`<run>/checkpoints/<step>/`)
have the same `params/` item next to the optimizer state, so both load
here. orbax writes `params/` under a temporary name and renames it when
complete, and `config.json` is written first: a directory without
`params/` is an interrupted save, never mistaken for a finished one.
Each process restores only the shards its devices own (multi-host).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import jax
import numpy as np

from easympt.config import MptConfig
from easympt.dtypes import default_compute_dtype, resolve_dtype
from easympt.heads import model_class_for
from easympt.model import unwrap_params
from easympt.sharding import shardings_for

PARAMS_ITEM = "params"
CONFIG_FILE = "config.json"


@contextlib.contextmanager
def atomic_directory(out_dir: str):
    """Yield a temporary sibling of `out_dir` that replaces it only if the block finishes."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def config_dir_of(path: str) -> str | None:
    """Where the config.json of an easympt checkpoint lives: the directory
    itself, or for a training step `<run>/checkpoints/<step>` the run."""
    for d in (path, os.path.dirname(os.path.dirname(os.path.abspath(path)))):
        if os.path.isfile(os.path.join(d, CONFIG_FILE)):
            return d
    return None


def is_easympt_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_ITEM)) and config_dir_of(path) is not None


def save_params(params, config: MptConfig, directory: str) -> str:
    """Write params (any sharding; every process calls this) and config.json."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    target = os.path.join(directory, PARAMS_ITEM)
    if jax.process_index() == 0:  # one process clears and describes the (shared) directory
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(directory, exist_ok=True)
        config.save_pretrained(directory)
    if jax.process_count() > 1:  # and nobody writes before it has
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"easympt save {directory}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, unwrap_params(params))
    return directory


def load_params(path: str, dtype=None, device=None, mesh=None, partition_rules=None):
    """(params, config) from an easympt checkpoint, cast to `dtype`, placed on
    `device` or sharded over `mesh` by `partition_rules` (default: FSDP rules)."""
    import orbax.checkpoint as ocp

    if not is_easympt_checkpoint(path):
        raise FileNotFoundError(f"{path}: not an easympt checkpoint (needs {PARAMS_ITEM}/ and {CONFIG_FILE})")
    config = MptConfig.from_pretrained(config_dir_of(path))
    dtype = np.dtype(resolve_dtype(dtype) or default_compute_dtype())
    shapes = model_class_for(config)(config, _do_init=False).params_shape()
    if mesh is not None:
        rules = partition_rules if partition_rules is not None else config.get_partition_rules(fsdp=True)
        shardings = shardings_for(mesh, shapes, rules)
    else:
        one = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, shapes)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                                      shapes, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(os.path.join(os.path.abspath(path), PARAMS_ITEM), abstract)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}: params do not match {CONFIG_FILE}: {e}") from e
    return params, config
