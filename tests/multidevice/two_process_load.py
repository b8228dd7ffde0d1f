"""One of two processes (4 CPU devices each, joined by EASYMPT_* variables): see tests/test_multiprocess.py.

argv: HF checkpoint, output directory, a one-layer checkpoint of the same kind. Loads the checkpoint sharded over all 8 devices (each process
reading only its slices, peak RSS recorded), computes logits of a fixed batch, exports it as an HF
checkpoint and round-trips it through an easympt (orbax) checkpoint, every process taking part.
"""

import json
import os
import sys

import numpy as np

import easympt.distributed

assert easympt.distributed.initialize()
import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from easympt import FlaxMptForCausalLM  # noqa: E402
from easympt.checkpoint import load_params, save_params  # noqa: E402
from easympt.sharding import create_mesh  # noqa: E402
from easympt.transform import mpt_from_pretrained, mpt_to_pretrained  # noqa: E402

src, out, warm = sys.argv[1], sys.argv[2], sys.argv[3]
me = jax.process_index()
assert jax.device_count() == 8 and jax.local_device_count() == 4


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))


mesh = create_mesh((1, -1, 1, 1))
mpt_from_pretrained(warm, mesh=mesh, progress=False)  # one-time costs (imports, tracing) are not the weights'
with open("/proc/self/clear_refs", "w") as fh:  # restart the peak (VmHWM) from the current RSS
    fh.write("5")
before = status_bytes("VmRSS")
params, config = mpt_from_pretrained(src, mesh=mesh, progress=False)
peak_growth = status_bytes("VmHWM") - before
local_bytes = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)

rng = np.random.default_rng(0)  # the same batch in every process
ids = rng.integers(0, config.vocab_size, (8, 16))
mask = np.ones_like(ids)
mask[1, :5] = 0
logits = FlaxMptForCausalLM(config, _do_init=False, mesh=mesh)(ids, mask, params=params).logits
logits = np.asarray(multihost_utils.process_allgather(logits, tiled=True))

mpt_to_pretrained(params, config, os.path.join(out, "export"))
save_params(params, config, os.path.join(out, "ckpt"))
restored, _ = load_params(os.path.join(out, "ckpt"), mesh=mesh)
restored_equal = all(bool(np.array_equal(np.asarray(a.addressable_data(0)), np.asarray(b.addressable_data(0))))
                     for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)))
if me == 0:
    np.save(os.path.join(out, "logits.npy"), logits)
print("REPORT " + json.dumps({"process": me, "peak_growth": peak_growth, "local_param_bytes": local_bytes,
                              "restored_equal": restored_equal,
                              "export_exists": os.path.isfile(os.path.join(out, "export", "config.json"))}))
