"""Run with 8 simulated CPU devices: load a checkpoint quantized onto a mesh and compare its logits with
the same quantized model on one device. argv: checkpoint, format, mesh 'dp,fsdp,tp,sp'. Prints
REPORT {json}."""

import json
import sys

import jax
import numpy as np

from easympt import FlaxMptForCausalLM
from easympt.sharding import create_mesh
from easympt.transform import mpt_from_pretrained

path, fmt, shape = sys.argv[1], sys.argv[2], tuple(int(s) for s in sys.argv[3].split(","))
mesh = create_mesh(shape)
sharded, config = mpt_from_pretrained(path, mesh=mesh, quantize=fmt, progress=False)
single, _ = mpt_from_pretrained(path, device=jax.devices()[0], quantize=fmt, progress=False)
ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 12))
got = FlaxMptForCausalLM(config, mesh=mesh, quantize=fmt, _do_init=False)(ids, params=sharded).logits
want = FlaxMptForCausalLM(config, quantize=fmt, _do_init=False)(ids, params=single).logits
attn = sharded["transformer"]["blocks_0"]["attn"]["Wqkv"]
print("REPORT " + json.dumps({
    "kernel_shard": list(attn["kernel"].sharding.shard_shape(attn["kernel"].shape)),
    "scale_shard": list(attn["scale"].sharding.shard_shape(attn["scale"].shape)),
    "max_abs_diff": float(np.abs(np.asarray(got) - np.asarray(want)).max()),
    "logit_scale": float(np.abs(np.asarray(want)).max())}))
