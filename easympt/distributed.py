"""More than one JAX process (TPU pod slices, GPU nodes): jax.distributed set-up.

Every process calls `initialize` with the same coordinator and process count and its own id; JAX's
multi-controller runtime then shows every process all devices (`jax.devices()`), of which it owns
`jax.local_devices()`. On CPU the processes talk through JAX's gloo collectives, so two local
processes behave as two hosts.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

log = logging.getLogger("easympt.distributed")

ENV_ADDRESS, ENV_NUM, ENV_ID = "EASYMPT_COORDINATOR_ADDRESS", "EASYMPT_NUM_PROCESSES", "EASYMPT_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _cluster_detected() -> bool:
    """Environments where JAX's own auto-detection finds the other processes."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the other processes; True when this is a multi-process run.

    Arguments win, then EASYMPT_COORDINATOR_ADDRESS / EASYMPT_NUM_PROCESSES / EASYMPT_PROCESS_ID,
    then JAX's auto-detection on TPU pods, SLURM and Open MPI. One process (nothing given, or
    num_processes 1) is a no-op. Must run before anything touches a device.
    """
    address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
    n = num_processes if num_processes is not None else _env_int(ENV_NUM)
    pid = process_id if process_id is not None else _env_int(ENV_ID)
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if address is None and n is None and pid is None:
        if not _cluster_detected():
            return False
        jax.distributed.initialize()  # JAX finds coordinator, count and id in the cluster's environment
        log.warning("joined %d processes (auto-detected); this is process %d", jax.process_count(),
                    jax.process_index())
        return jax.process_count() > 1
    if n == 1 and pid in (None, 0):
        return False
    missing = [name for name, v in (("coordinator address", address), ("number of processes", n),
                                    ("process id", pid)) if v is None]
    if missing:
        raise ValueError(f"a multi-process run needs the coordinator address, the number of processes and this "
                         f"process's id; missing: {', '.join(missing)} (flags --coordinator-address "
                         f"--num-processes --process-id, or {ENV_ADDRESS} / {ENV_NUM} / {ENV_ID})")
    if n < 1 or not 0 <= pid < n:
        raise ValueError(f"process id {pid} is not in [0, {n}) for {n} processes")
    if ":" not in address:
        raise ValueError(f"coordinator address {address!r} must be HOST:PORT")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or _cpu_only():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
    log.warning("process %d of %d joined %s: %d devices, %d local", pid, n, address, jax.device_count(),
                jax.local_device_count())
    return n > 1


def _cpu_only() -> bool:
    """True when no accelerator plugin is installed (checked without starting a backend)."""
    import importlib.util

    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu",
                                                          "jax_rocm60_plugin"))


def to_host(tree):
    """numpy copies of device values. An array sharded over several processes is gathered first, so
    every process must make the same call: the gather is a collective they all join."""
    def one(x):
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def is_leader() -> bool:
    """Process 0: the one that writes files and serves HTTP."""
    return jax.process_index() == 0
