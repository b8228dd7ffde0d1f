"""Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (see tests/test_train.py).

Two training steps on an fsdp=8 mesh against the same steps on one device:
losses and updated params must agree, and the params must really be sharded.
"""

import json
import tempfile

import jax
import numpy as np

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.sharding import create_mesh
from easympt.training import TrainConfig, Trainer

assert len(jax.devices()) == 8, jax.devices()
cfg = MptConfig.preset("tiny", vocab_size=256, max_seq_len=32, attn_config={"attn_uses_sequence_id": True})
model = FlaxMptForCausalLM(cfg, seed=0)
rng = np.random.default_rng(0)
rows = {"input_ids": rng.integers(0, 256, (16, 32)).astype(np.int32),
        "sequence_id": np.repeat(np.arange(2), 16)[None].repeat(16, 0).astype(np.int32),
        "loss_mask": np.ones((16, 32), np.float32), "attention_mask": np.ones((16, 32), np.int32)}
report = {}
with tempfile.TemporaryDirectory() as tmp:
    tc = TrainConfig(output_dir=tmp + "/one", seq_len=32, batch_size=8, max_steps=2, save_every=100,
                     learning_rate=1e-2, warmup_steps=1)
    one = Trainer(model, model.params, rows, tc)
    l1 = one.train()
    mesh = create_mesh((1, 8, 1, 1))
    sharded_model = FlaxMptForCausalLM(cfg, _do_init=False, mesh=mesh)
    tc8 = TrainConfig(**{**tc.__dict__, "output_dir": tmp + "/eight"})
    eight = Trainer(sharded_model, model.params, rows, tc8, mesh=mesh)
    l8 = eight.train()
    wqkv = eight.params["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"]
    report["shard"] = list(wqkv.addressable_shards[0].data.shape)
    report["global"] = list(wqkv.shape)
    report["loss_one"], report["loss_eight"] = l1, l8
    report["max_param_diff"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                   for a, b in zip(jax.tree_util.tree_leaves(one.params),
                                                   jax.tree_util.tree_leaves(eight.params)))
print("REPORT " + json.dumps(report))
