"""Training steps, a stop and a resume, on all devices: run as two processes (tests/test_multiprocess.py)
or as one process on one device for the reference. argv: output directory. Prints REPORT json."""

import json
import sys

import numpy as np

import easympt.distributed

easympt.distributed.initialize()
import jax  # noqa: E402

from easympt import FlaxMptForCausalLM, MptConfig  # noqa: E402
from easympt.sharding import create_mesh  # noqa: E402
from easympt.training import TrainConfig, Trainer  # noqa: E402

out = sys.argv[1]
mesh = create_mesh((1, -1, 1, 1)) if jax.device_count() > 1 else None
cfg = MptConfig.preset("tiny", vocab_size=256, max_seq_len=32, attn_config={"attn_uses_sequence_id": True})
model = FlaxMptForCausalLM(cfg, _do_init=False, mesh=mesh)
params = jax.tree_util.tree_map(np.asarray, FlaxMptForCausalLM(cfg, seed=0).params)  # the same host values everywhere
rng = np.random.default_rng(0)
rows = {"input_ids": rng.integers(0, 256, (24, 32)).astype(np.int32),
        "sequence_id": np.repeat(np.arange(2), 16)[None].repeat(24, 0).astype(np.int32),
        "loss_mask": np.ones((24, 32), np.float32), "attention_mask": np.ones((24, 32), np.int32)}
eval_rows = {k: v[:5] for k, v in rows.items()}


def trainer(name):
    tc = TrainConfig(output_dir=f"{out}/{name}", seq_len=32, batch_size=8, max_steps=6, save_every=2,
                     learning_rate=1e-2, warmup_steps=1)
    return Trainer(model, params, rows, tc, eval_rows, mesh=mesh)


full = trainer("full")
whole = full.train()
first = trainer("run").train(stop_at=3)  # "killed" after step 3; the last checkpoint is step 2
again = trainer("run")
restored = again.restore_latest()
rest = again.train()
print("REPORT " + json.dumps({"whole": whole, "first": first, "rest": rest, "restored": restored,
                              "resumed_at": 6 - len(rest), "eval": again.evaluate()["eval_loss"],
                              "sharded": mesh is not None}))
