"""A training memory plan: what one optimizer step needs, from the compiled step itself.

The step `Trainer` runs (easympt.training.trainer.make_train_step) is lowered and compiled on
abstract shapes (`jax.ShapeDtypeStruct`: no weights, no data) and XLA's own memory analysis gives
its arguments (weights, optimizer state, batch), temporaries (activations, gradients, scratch) and
outputs; donated arguments (params and optimizer state are updated in place) are counted once.
Full fine-tuning trains every float32 weight with two AdamW moments; LoRA freezes the base (bf16,
or int8 / int4: QLoRA) and trains the adapter alone.

The analysis is the backend's that compiles it (XLA:CPU here): a GPU compiler schedules and fuses
differently, so a GPU step can differ by some percent; the weights and optimizer state are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from easympt.config import MptConfig
from easympt.plan import device_memory_line, gigabytes


@dataclass(frozen=True)
class TrainingPlan:
    method: str  # "full", "lora" or "qlora (int4)"
    seq_len: int
    batch_size: int
    trained_params: int
    frozen_bytes: int  # the base weights a LoRA step reads and does not train (0 for full)
    trained_bytes: int  # the trained params
    optimizer_bytes: int
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    device_memory: int | None = None

    @property
    def peak_bytes(self) -> int:
        """Arguments + temporaries + outputs that are not donated arguments written in place."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.peak_bytes <= self.device_memory

    def to_dict(self) -> dict:
        return {"method": self.method, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "trained_params": self.trained_params, "frozen_bytes": self.frozen_bytes,
                "trained_bytes": self.trained_bytes, "optimizer_bytes": self.optimizer_bytes,
                "argument_bytes": self.argument_bytes, "temp_bytes": self.temp_bytes,
                "output_bytes": self.output_bytes, "alias_bytes": self.alias_bytes, "peak_bytes": self.peak_bytes,
                "device_memory": self.device_memory, "fits": self.fits}

    def summary(self) -> str:
        g = gigabytes
        lines = [
            f"training          {self.method}, batch {self.batch_size} x {self.seq_len} tokens",
            f"trained           {self.trained_params / 1e6:,.2f} M params = {g(self.trained_bytes)}, "
            f"AdamW state {g(self.optimizer_bytes)}" + (f"; frozen base {g(self.frozen_bytes)}"
                                                         if self.frozen_bytes else ""),
            f"compiled step     arguments {g(self.argument_bytes)} + temporaries {g(self.temp_bytes)} + outputs "
            f"{g(self.output_bytes)} - donated {g(self.alias_bytes)} = peak {g(self.peak_bytes)}",
        ]
        return "\n".join(lines + device_memory_line(self.peak_bytes, self.device_memory))


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def training_plan(config: MptConfig, seq_len: int = 2048, batch_size: int = 1, lora_rank: int = 0,
                  lora_targets=("Wqkv", "out_proj", "up_proj", "down_proj"), quantize: str | None = None,
                  dtype="bf16", remat: bool = True, device_memory: int | float | None = None) -> TrainingPlan:
    """The memory of one training step of `config` at batch_size x seq_len. `lora_rank` 0: full
    fine-tuning (float32 weights, gradients and AdamW moments; compute in `dtype`); > 0: LoRA adapters
    on `lora_targets` over a base frozen in `dtype` or `quantize` (QLoRA). `remat`: recompute each
    block's activations in the backward pass (what fits long sequences)."""
    from easympt.adapters import lora
    from easympt.dtypes import resolve_dtype
    from easympt.model import FlaxMptForCausalLM
    from easympt.training.trainer import TrainConfig, make_optimizer, make_train_step

    tc = TrainConfig(output_dir="", seq_len=seq_len, batch_size=batch_size, lora_rank=lora_rank,
                     lora_targets=tuple(lora_targets), quantize=quantize, remat=remat)
    spec = tc.lora_spec()
    compute = resolve_dtype(dtype)
    param_dtype = jnp.float32 if spec is None else compute  # full fine-tuning keeps float32 master weights
    model = FlaxMptForCausalLM(config, dtype=compute, param_dtype=param_dtype, _do_init=False, remat=remat,
                               quantize=quantize, lora=spec)
    shapes = model.params_shape()
    frozen = None
    if spec is not None:
        frozen, shapes = lora.split(shapes)
        shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), shapes)
    optimizer = make_optimizer(tc)
    opt_state = jax.eval_shape(optimizer.init, shapes)
    ids = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": ids, "sequence_id": ids,
             "loss_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)}
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, optimizer), donate_argnums=(0, 1))
    analysis = step.lower(shapes, opt_state, batch, rng, frozen).compile().memory_analysis()
    method = "full" if spec is None else (f"qlora ({quantize})" if quantize else f"lora ({jnp.dtype(compute).name})")
    return TrainingPlan(
        method=method, seq_len=seq_len, batch_size=batch_size,
        trained_params=sum(x.size for x in jax.tree_util.tree_leaves(shapes)),
        frozen_bytes=_bytes(frozen) if frozen is not None else 0, trained_bytes=_bytes(shapes),
        optimizer_bytes=_bytes(opt_state), argument_bytes=int(analysis.argument_size_in_bytes),
        temp_bytes=int(analysis.temp_size_in_bytes), output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes),
        device_memory=None if device_memory is None else int(device_memory))
