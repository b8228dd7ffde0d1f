"""Fine-tuning MPT with optax: one jitted step, orbax checkpoints, exact resume.

Everything a step depends on is a function of the step number: the batch
(a seeded permutation per epoch over the packed rows) and the dropout key
(`fold_in(seed, step)`). A checkpoint therefore only needs params,
optimizer state and the step, and a resumed run continues the same loss
curve as an uninterrupted one.

With a LoRA model (`model.lora`, easympt.adapters.lora) only the adapter is trained: the base
weights (float, or 8- / 4-bit for QLoRA) are a frozen input of the step, gradients and AdamW
moments exist for the adapter alone, checkpoints hold the adapter and its optimizer state, and
every save also writes the adapter in PEFT's format to `<output_dir>/adapter`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from easympt.adapters import lora
from easympt.model import FlaxMptPreTrainedModel


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    max_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 50
    keep_last: int = 3
    seed: int = 0
    remat: bool = False  # recompute block activations in the backward pass (long sequences)
    # LoRA (easympt.adapters): rank 0 trains every weight; > 0 trains adapters on `lora_targets` only
    lora_rank: int = 0
    lora_alpha: float | None = None  # default: 2 x rank
    lora_targets: tuple[str, ...] = ("Wqkv",)  # PEFT's default for MPT
    lora_dropout: float = 0.0
    quantize: str | None = None  # the frozen base's format under LoRA (QLoRA): "int8" / "int4"

    def lora_spec(self) -> lora.LoraSpec | None:
        if not self.lora_rank:
            if self.quantize:
                raise ValueError(f"quantize={self.quantize!r} freezes the base in 8 or 4 bits: it trains LoRA "
                                 "adapters only (give lora_rank, --lora-rank)")
            return None
        targets = self.lora_targets.split(",") if isinstance(self.lora_targets, str) else self.lora_targets
        return lora.LoraSpec(rank=self.lora_rank, alpha=self.lora_alpha or 2.0 * self.lora_rank,
                             targets=tuple(t.strip() for t in targets if t.strip()), dropout=self.lora_dropout)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1),
                                                  max(tc.max_steps, tc.warmup_steps + 1))
    opt = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                      optax.adamw(schedule, weight_decay=tc.weight_decay))
    return optax.MultiSteps(opt, tc.grad_accum) if tc.grad_accum > 1 else opt


def _whole(params, frozen):
    """The model's params from the trained ones and (a LoRA model's) frozen base."""
    return params if frozen is None else lora.merge(frozen, params)


def make_train_step(model: FlaxMptPreTrainedModel, optimizer: optax.GradientTransformation):
    """step(params, opt_state, batch, rng, frozen) -> (params, opt_state, loss): one optimizer step on
    the trained params (all of them, or a LoRA model's adapter with `frozen` its base)."""
    c = model.config
    deterministic = not (c.attn_config.attn_pdrop or c.resid_pdrop or c.emb_pdrop
                         or (model.lora is not None and model.lora.dropout))

    def train_step(params, opt_state, batch, rng, frozen):
        loss, grads = jax.value_and_grad(lambda p: model.loss(_whole(p, frozen), batch, rng, deterministic))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


class Trainer:
    """Trains `params` on packed rows; checkpoints under `<output_dir>/checkpoints/<step>`."""

    def __init__(self, model: FlaxMptPreTrainedModel, params, train_rows: dict, tc: TrainConfig,
                 eval_rows: dict | None = None, mesh=None, partition_rules=None):
        """With `mesh`, params are sharded by `partition_rules` (default: the
        config's FSDP rules) and batches over ("dp", "fsdp"); the same step
        then runs on one CPU or a pod. With several JAX processes every process
        builds a Trainer over the same rows and calls the same methods; each
        copies only the rows of each batch that its own devices hold."""
        import orbax.checkpoint as ocp

        n = len(train_rows["input_ids"])
        self.frozen = None  # a LoRA model's base weights, not trained
        if model.lora is not None:
            self.frozen, params = lora.split(params)
            if not jax.tree_util.tree_leaves(params):
                raise ValueError("a LoRA model's params hold no adapter (lora_a / lora_b): initialise it with "
                                 "easympt.adapters.lora.init_adapter")
        if n < tc.batch_size:
            raise ValueError(f"{n} packed rows of training data is fewer than batch_size {tc.batch_size}")
        self.model, self.tc, self.rows, self.eval_rows = model, tc, train_rows, eval_rows
        self.optimizer = make_optimizer(tc)
        self.mesh = mesh
        if mesh is not None:
            from easympt.sharding import shardings_for

            rules = partition_rules if partition_rules is not None else model.config.get_partition_rules(fsdp=True)
            params = jax.device_put(params, shardings_for(mesh, params, rules))
            if self.frozen is not None:
                self.frozen = jax.device_put(self.frozen, shardings_for(mesh, self.frozen, rules))
            shards = mesh.shape["dp"] * mesh.shape["fsdp"]
            if tc.batch_size % shards:
                raise ValueError(f"batch_size {tc.batch_size} does not divide over the mesh's dp x fsdp = {shards} "
                                 "batch shards")
            self.batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "fsdp")))
        # the step donates its inputs; the caller's arrays stay valid
        self.params = jax.tree_util.tree_map(jnp.copy, params)
        self.opt_state = self._init_optimizer_state()
        self.step = 0
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)
        os.makedirs(tc.output_dir, exist_ok=True)
        if jax.process_index() == 0:  # the output directory is shared by every process
            model.config.save_pretrained(tc.output_dir)
            with open(os.path.join(tc.output_dir, "train_config.json"), "w", encoding="utf-8") as fh:
                json.dump(asdict(tc), fh, indent=2)
        self.manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(tc.output_dir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_last, create=True))
        train_step = make_train_step(model, self.optimizer)
        self._train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self._eval_loss = jax.jit(lambda p, b, frozen: model.loss(_whole(p, frozen), b, jax.random.PRNGKey(0), True))

    def _init_optimizer_state(self):
        """Moments sharded as their parameters, step counts replicated over the mesh. (A plain jitted init
        leaves them on one device: its outputs do not depend on the parameters' values.)"""
        if self.mesh is None:
            return jax.jit(self.optimizer.init)(self.params)
        from jax.sharding import NamedSharding, PartitionSpec

        abstract = jax.eval_shape(self.optimizer.init, self.params)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        shardings = optax.tree_utils.tree_map_params(self.optimizer, lambda _, p: p.sharding, abstract, self.params,
                                                     transform_non_params=lambda _: replicated)
        return jax.jit(self.optimizer.init, out_shardings=shardings)(self.params)

    # ------------------------------------------------------------------ data
    def batch_at(self, step: int) -> dict:
        """The rows of micro-step `step`: a seeded permutation per epoch, a pure function of the step."""
        n, b = len(self.rows["input_ids"]), self.tc.batch_size
        per_epoch = n // b
        epoch, k = divmod(step, per_epoch)
        if self._epoch_order[0] != epoch:  # one permutation per epoch, not per step
            self._epoch_order = (epoch, np.random.default_rng([self.tc.seed, epoch]).permutation(n))
        return self._put_rows(self.rows, self._epoch_order[1][k * b:(k + 1) * b])

    def _put_rows(self, source: dict, idx: np.ndarray) -> dict:
        """Rows `idx` of `source` as one global batch. With a mesh each process copies only the rows its
        own devices hold (`make_array_from_callback` asks for exactly those)."""
        if self.mesh is None:
            return {k: jnp.asarray(v[idx]) for k, v in source.items()}
        return {k: jax.make_array_from_callback((len(idx),) + v.shape[1:], self.batch_sharding,
                                                lambda index, v=v: v[idx[index[0]]][(slice(None),) + index[1:]])
                for k, v in source.items()}

    # ----------------------------------------------------------- checkpoints
    def save(self) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(self.step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state)))
        self.manager.wait_until_finished()
        if self.model.lora is not None:
            from easympt.adapters import save_adapter

            adapter = self.params
            if jax.process_count() > 1:  # every process joins the gather; process 0 writes
                from jax.experimental import multihost_utils

                adapter = multihost_utils.process_allgather(adapter, tiled=True)
            if jax.process_index() == 0:
                save_adapter(adapter, self.model.lora, self.adapter_dir)

    @property
    def adapter_dir(self) -> str:
        """Where a LoRA run's adapter is written in PEFT's format at every save."""
        return os.path.join(self.tc.output_dir, "adapter")

    @property
    def full_params(self) -> dict:
        """The whole model's params: the trained ones, with a LoRA model's frozen base."""
        return self.params if self.frozen is None else lora.merge(self.frozen, self.params)

    def restore_latest(self) -> bool:
        """Continue from the newest complete checkpoint, if there is one."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        if step is None:
            return False
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, (self.params, self.opt_state))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract[0]), opt_state=ocp.args.StandardRestore(abstract[1])))
        self.params, self.opt_state, self.step = restored["params"], restored["opt_state"], step
        return True

    def is_save_step(self, step: int) -> bool:
        """Checkpoints (and evaluations) fall every save_every optimizer steps and at the end."""
        total = self.tc.max_steps * self.tc.grad_accum
        return step % (self.tc.save_every * self.tc.grad_accum) == 0 or step == total

    # --------------------------------------------------------------- loops
    def evaluate(self) -> dict:
        if self.eval_rows is None:
            return {}
        b, n = self.tc.batch_size, len(self.eval_rows["input_ids"])
        pad = -n % b  # the last batch is padded with zero-weight rows
        rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in self.eval_rows.items()}
        losses = []
        for i in range(0, n, b):
            losses.append(float(self._eval_loss(self.params, self._put_rows(rows, np.arange(i, i + b)), self.frozen)))
        loss = float(np.mean(losses))
        return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}

    def train(self, stop_at: int | None = None, log=None) -> list[float]:
        """Micro-steps up to max_steps x grad_accum (or `stop_at`); the loss of each."""
        total = self.tc.max_steps * self.tc.grad_accum
        end = min(total, stop_at) if stop_at is not None else total
        key = jax.random.PRNGKey(self.tc.seed)
        losses = []
        while self.step < end:
            self.params, self.opt_state, loss = self._train_step(
                self.params, self.opt_state, self.batch_at(self.step), jax.random.fold_in(key, self.step), self.frozen)
            self.step += 1
            losses.append(float(loss))
            if log is not None:
                log({"step": self.step, "loss": losses[-1]})
            if self.is_save_step(self.step):
                self.save()
        return losses

