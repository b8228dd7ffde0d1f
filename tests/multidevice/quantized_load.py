"""Load a checkpoint quantized onto a mesh of 8 CPU devices, in one process with 8 simulated devices or
in two processes of 4 (joined by EASYMPT_* variables, as two hosts of a pod: each reads only its
slices). argv: checkpoint, format, mesh 'dp,fsdp,tp,sp'. One process compares its logits with the same
quantized model on one device; two processes gather theirs and process 0 prints them for the test to
compare. Prints REPORT {json}."""

import json
import sys

import numpy as np

import easympt.distributed

multi = easympt.distributed.initialize()
import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from easympt import FlaxMptForCausalLM  # noqa: E402
from easympt.sharding import create_mesh  # noqa: E402
from easympt.transform import mpt_from_pretrained  # noqa: E402

path, fmt, shape = sys.argv[1], sys.argv[2], tuple(int(s) for s in sys.argv[3].split(","))
mesh = create_mesh(shape)
sharded, config = mpt_from_pretrained(path, mesh=mesh, quantize=fmt, progress=False)
ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 12))
got = FlaxMptForCausalLM(config, mesh=mesh, quantize=fmt, _do_init=False)(ids, params=sharded).logits
attn = sharded["transformer"]["blocks_0"]["attn"]["Wqkv"]
report = {"process": jax.process_index(), "processes": jax.process_count(),
          "kernel_shard": list(attn["kernel"].sharding.shard_shape(attn["kernel"].shape)),
          "scale_shard": list(attn["scale"].sharding.shard_shape(attn["scale"].shape))}
if multi:  # every process gathers; process 0 alone prints them (a full pipe would stall its exit)
    logits = np.asarray(multihost_utils.process_allgather(got, tiled=True))
    if jax.process_index() == 0:
        report["logits"] = logits.tolist()
else:
    single, _ = mpt_from_pretrained(path, device=jax.devices()[0], quantize=fmt, progress=False)
    want = np.asarray(FlaxMptForCausalLM(config, quantize=fmt, _do_init=False)(ids, params=single).logits)
    report.update(max_abs_diff=float(np.abs(np.asarray(got) - want).max()), logit_scale=float(np.abs(want).max()))
print("REPORT " + json.dumps(report))
