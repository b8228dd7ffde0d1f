"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/test_sharding.py).

argv: checkpoint dir, mesh shape as 'dp,fsdp,tp,sp'. Loads sharded, checks
that arrays really are sharded, and that logits equal the single-device model.
"""

import json
import sys

import jax
import numpy as np

from easympt import FlaxMptForCausalLM
from easympt.sharding import create_mesh
from easympt.transform import mpt_from_pretrained

path, shape = sys.argv[1], tuple(int(s) for s in sys.argv[2].split(","))
assert len(jax.devices()) == 8, jax.devices()
mesh = create_mesh(shape)
params, config = mpt_from_pretrained(path, mesh=mesh, progress=False)
report = {}
for name, x in [("wte", params["transformer"]["wte"]["embedding"]),
                ("wqkv", params["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"]),
                ("down", params["transformer"]["blocks_1"]["ffn"]["down_proj"]["kernel"])]:
    report[name] = {"spec": str(x.sharding.spec), "global": list(x.shape),
                    "shard": list(x.addressable_shards[0].data.shape), "n_devices": len(x.sharding.device_set)}
rng = np.random.default_rng(0)
ids = rng.integers(0, config.vocab_size, (8, 16))
mask = np.ones_like(ids)
mask[1, :5] = 0
sharded_model = FlaxMptForCausalLM(config, _do_init=False, mesh=mesh)
got = np.asarray(sharded_model(ids, mask, params=params).logits)
local, _ = mpt_from_pretrained(path, device=jax.devices()[0], progress=False)
ref = np.asarray(FlaxMptForCausalLM(config, _do_init=False)(ids, mask, params=local).logits)
report["max_abs_diff"] = float(np.abs(got - ref)[mask.astype(bool)].max())
report["logit_scale"] = float(np.abs(ref).max())

# sharded params -> easympt (orbax) checkpoint -> restored straight into shards
import tempfile  # noqa: E402

from easympt.checkpoint import load_params, save_params  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    save_params(params, config, tmp + "/ckpt")
    restored, _ = load_params(tmp + "/ckpt", mesh=mesh)
    wqkv = restored["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"]
    report["restored_wqkv_shard"] = list(wqkv.addressable_shards[0].data.shape)
    report["restored_equal"] = all(
        bool(np.array_equal(np.asarray(a), np.asarray(b)))
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(restored)))
print("REPORT " + json.dumps(report))
