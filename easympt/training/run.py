"""`easympt train`: load a checkpoint, pack the data, train (resuming if the
output directory has checkpoints), log metrics, plot the loss, export."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from easympt.training.data import pack, read_examples, tokenize
from easympt.training.trainer import TrainConfig, Trainer


def split_rows(rows: dict, eval_fraction: float, seed: int):
    """Hold out a seeded fraction of the packed rows (at least one) for evaluation."""
    n = len(rows["input_ids"])
    n_eval = max(1, int(round(n * eval_fraction))) if eval_fraction > 0 and n > 1 else 0
    order = np.random.default_rng(seed).permutation(n)
    ev, tr = order[:n_eval], order[n_eval:]
    return {k: v[tr] for k, v in rows.items()}, ({k: v[ev] for k, v in rows.items()} if n_eval else None)


def plot_losses(log_path: str, out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log_path, encoding="utf-8")]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("micro-step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def run_training(model_source: str, data: str, tc: TrainConfig, eval_data: str | None = None,
                 eval_fraction: float = 0.1, export_dir: str | None = None, progress: bool = True,
                 mesh_shape: tuple[int, ...] | None = None) -> dict:
    """mesh_shape: dp,fsdp,tp,sp sizes to shard over (default: one device; with several JAX processes,
    FSDP over every device of every process). Every process runs this with the same arguments; the
    output directory must be storage they all see. Process 0 writes the metrics, plot and export."""
    import jax
    from tqdm.auto import tqdm
    from easympt.checkpoint import is_easympt_checkpoint
    from easympt.model import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained, mpt_to_pretrained
    from easympt.transform.hf_to_flax import load_tokenizer, resolve_checkpoint_dir

    if is_easympt_checkpoint(model_source):
        raise ValueError(f"{model_source}: train from a Hugging Face checkpoint (it holds the tokenizer); "
                         "convert an easympt checkpoint with `easympt convert` first")
    src = resolve_checkpoint_dir(model_source)
    mesh = None
    if mesh_shape is not None or jax.process_count() > 1:
        from easympt.sharding import create_mesh

        mesh = create_mesh(mesh_shape or (1, -1, 1, 1))
    spec = tc.lora_spec()
    params, config = mpt_from_pretrained(src, dtype="fp32", mesh=mesh, progress=False, quantize=tc.quantize)
    if tc.seq_len > config.max_seq_len and not config.attn_config.alibi:
        raise ValueError(f"seq_len {tc.seq_len} exceeds max_seq_len {config.max_seq_len} of a model "
                         "with learned position embeddings")
    tokenizer = load_tokenizer(src)
    eos = tokenizer.eos_token_id
    rows = pack(tokenize(read_examples(data), tokenizer, tc.seq_len, eos), tc.seq_len)
    if eval_data:
        eval_rows = pack(tokenize(read_examples(eval_data), tokenizer, tc.seq_len, eos), tc.seq_len)
    else:
        rows, eval_rows = split_rows(rows, eval_fraction, tc.seed)
    model = FlaxMptForCausalLM(config, _do_init=False, remat=tc.remat, mesh=mesh, quantize=tc.quantize, lora=spec)
    if spec is not None:  # a fresh adapter (restore_latest replaces it with a saved one)
        from easympt.adapters import lora

        params = lora.merge(params, lora.init_adapter(model, jax.random.PRNGKey(tc.seed)))
    trainer = Trainer(model, params, rows, tc, eval_rows, mesh=mesh)
    resumed = trainer.restore_latest()
    log_path = os.path.join(tc.output_dir, "metrics.jsonl")
    total = tc.max_steps * tc.grad_accum
    leader = jax.process_index() == 0
    with (open(log_path, "a", encoding="utf-8") if leader else contextlib.nullcontext()) as log_fh, \
            tqdm(total=total, initial=trainer.step, desc="training", unit="step",
                 disable=not (progress and leader)) as bar:
        def log(record):
            ev = trainer.evaluate() if trainer.is_save_step(record["step"]) else {}  # every process joins
            if not leader:
                return
            log_fh.write(json.dumps(record) + "\n")
            if ev:
                log_fh.write(json.dumps({"step": record["step"], **ev}) + "\n")
            log_fh.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        trainer.train(log=log)
    final = trainer.evaluate()
    if leader:
        plot_losses(log_path, os.path.join(tc.output_dir, "loss.png"))
    if export_dir:  # a LoRA run exports the base with its adapter merged in
        from easympt.adapters import lora

        exported = trainer.params if spec is None else lora.merged_kernels(trainer.full_params, spec)
        mpt_to_pretrained(exported, config, export_dir, tokenizer=tokenizer)
    out = {"step": trainer.step, "resumed": resumed, "train_rows": len(rows["input_ids"]), **final}
    if spec is not None:
        out["adapter"] = trainer.adapter_dir
    return out
