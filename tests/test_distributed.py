"""easympt.distributed: two local processes joined by jax.distributed (4 CPU devices each) see one
8-device world; the CLI's flags and optional-package checks."""

import sys

import pytest
from conftest import finish_processes, launch_processes, report_of

WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
import easympt.distributed
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert easympt.distributed.initialize()  # from EASYMPT_* variables
mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("fsdp",))
local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("fsdp")), local)
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("REPORT " + json.dumps({"devices": jax.device_count(), "local": jax.local_device_count(), "index": jax.process_index(),
                  "leader": easympt.distributed.is_leader(), "sum": float(total)}))
"""


def test_two_processes_see_one_world():
    outs = [report_of(out) for out in finish_processes(launch_processes([sys.executable, "-c", WORKER]), timeout_s=240)]
    assert [o["index"] for o in outs] == [0, 1] and [o["leader"] for o in outs] == [True, False]
    for o in outs:
        assert o["devices"] == 8 and o["local"] == 4 and o["sum"] == sum(range(8))


def test_one_process_is_a_no_op(monkeypatch):
    import easympt.distributed

    for name in ("EASYMPT_COORDINATOR_ADDRESS", "EASYMPT_NUM_PROCESSES", "EASYMPT_PROCESS_ID", "SLURM_NTASKS",
                 "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert easympt.distributed.initialize() is False
    assert easympt.distributed.initialize(num_processes=1, process_id=0) is False


@pytest.mark.parametrize("kwargs,needle", [
    ({"num_processes": 2}, "missing: coordinator address, process id"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "process id 2 is not in [0, 2)"),
    ({"coordinator_address": "nohost", "num_processes": 2, "process_id": 0}, "must be HOST:PORT"),
])
def test_bad_settings_are_named(kwargs, needle):
    import easympt.distributed

    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        easympt.distributed.initialize(**kwargs)


def test_every_command_takes_the_process_flags(capsys):
    from easympt.cli import build_parser

    for command in ("serve", "generate", "train", "convert", "eval", "plan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        assert "--coordinator-address" in capsys.readouterr().out


@pytest.mark.parametrize("argv,missing,extra", [
    (["serve", "--no-gradio"], "uvicorn", "serve"),
    (["serve"], "gradio", "serve"),
    (["train", "--data", "x.txt"], "matplotlib", "train"),
])
def test_commands_name_the_extra_they_need_before_any_work(monkeypatch, capsys, argv, missing, extra):
    import importlib.util

    from easympt.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert missing in err and f"pip install 'easympt[{extra}]'" in err
