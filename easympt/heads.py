"""Task heads on the MPT trunk, as transformers defines them for MPT:
sequence classification (`score`, pooled at the last non-padding token),
token classification (`classifier` after dropout) and extractive question
answering (`qa_outputs`: start/end logits).

Parameter names equal the Hugging Face tensor names (`score/kernel` <->
`score.weight`), so the same converter loads and writes them. The losses
follow transformers' too, including its `problem_type` rule and the -100
label that is ignored; a row whose attention_mask is all zero (the trainer's
padding) weighs nothing.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from easympt.config import MptConfig
from easympt.model import FlaxMptForCausalLM, FlaxMptPreTrainedModel, MptTaskModule, unwrap_params

IGNORE_INDEX = -100  # torch CrossEntropyLoss's default ignore_index


def last_non_pad_index(input_ids, pad_token_id: int | None):
    """The rightmost position whose token is not padding (left or right padding alike), as transformers pools."""
    T = input_ids.shape[1]
    if pad_token_id is None:
        return jnp.full((input_ids.shape[0],), T - 1, jnp.int32)
    return jnp.argmax(jnp.arange(T, dtype=jnp.int32) * (input_ids != pad_token_id), axis=-1)


class MptForSequenceClassificationModule(MptTaskModule):

    def setup(self):
        self.transformer = self.make_trunk()
        self.score = self.head(self.config.num_labels, use_bias=False)

    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        h, _ = self.transformer(input_ids, attention_mask, None, None, None, deterministic)
        logits = self.score(h).astype(jnp.float32)
        last = last_non_pad_index(input_ids, self.config.pad_token_id)
        return logits[jnp.arange(logits.shape[0]), last]


class MptForTokenClassificationModule(MptTaskModule):

    def setup(self):
        self.transformer = self.make_trunk()
        self.dropout = nn.Dropout(self.config.classifier_dropout)
        self.classifier = self.head(self.config.num_labels, use_bias=True)

    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        h, _ = self.transformer(input_ids, attention_mask, None, None, None, deterministic)
        return self.classifier(self.dropout(h, deterministic=deterministic)).astype(jnp.float32)


class MptForQuestionAnsweringModule(MptTaskModule):

    def setup(self):
        self.transformer = self.make_trunk()
        self.qa_outputs = self.head(2, use_bias=True)

    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        h, _ = self.transformer(input_ids, attention_mask, None, None, None, deterministic)
        logits = self.qa_outputs(h).astype(jnp.float32)
        return logits[..., 0], logits[..., 1]


@flax.struct.dataclass
class FlaxMptClassifierOutput:
    logits: jax.Array
    loss: jax.Array | None = None


@flax.struct.dataclass
class FlaxMptQuestionAnsweringOutput:
    start_logits: jax.Array
    end_logits: jax.Array
    loss: jax.Array | None = None


# ---------------------------------------------------------------------- losses
def _masked_mean(values, weights):
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _cross_entropy(logits, labels, weights):
    """Mean CE over entries whose label is not IGNORE_INDEX (and whose weight is 1)."""
    keep = (labels != IGNORE_INDEX) & (weights > 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(keep, labels, 0))
    return _masked_mean(ce, keep.astype(jnp.float32))


def resolve_problem_type(config: MptConfig, labels) -> str:
    """config.problem_type, else transformers' guess from num_labels and the labels' dtype."""
    if config.problem_type:
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    return "single_label_classification" if jnp.issubdtype(labels.dtype, jnp.integer) else \
        "multi_label_classification"


def sequence_classification_loss(config: MptConfig, logits, labels, row_weight):
    problem = resolve_problem_type(config, labels)
    if problem == "regression":
        labels = labels.astype(jnp.float32).reshape(logits.shape[0], -1)
        return _masked_mean(((logits - labels) ** 2).mean(-1), row_weight)
    if problem == "single_label_classification":
        return _cross_entropy(logits, labels.astype(jnp.int32), row_weight)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    return _masked_mean(bce, row_weight)


def token_classification_loss(logits, labels, row_weight):
    return _cross_entropy(logits, labels.astype(jnp.int32), jnp.broadcast_to(row_weight[:, None], labels.shape))


def question_answering_loss(start_logits, end_logits, start_positions, end_positions, row_weight):
    """transformers' rule: positions are clamped to [0, T] and T (outside the text) is ignored."""
    T = start_logits.shape[1]

    def one(logits, pos):
        pos = jnp.clip(pos.reshape(-1).astype(jnp.int32), 0, T)
        keep = ((pos != T) & (row_weight > 0)).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(pos == T, 0, pos))
        return _masked_mean(ce, keep)

    return (one(start_logits, start_positions) + one(end_logits, end_positions)) / 2


def _row_weight(attention_mask, n_rows: int):
    """1 for a row with at least one real token, 0 for an all-padding row."""
    if attention_mask is None:
        return jnp.ones((n_rows,), jnp.float32)
    return (jnp.asarray(attention_mask).sum(-1) > 0).astype(jnp.float32)


# --------------------------------------------------------------------- wrappers
class _FlaxMptHeadModel(FlaxMptPreTrainedModel):
    """Forward, loss and head initialisation shared by the three task heads."""

    def _apply(self, params, input_ids, attention_mask, dropout_rng, deterministic):
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, input_ids, attention_mask, deterministic, rngs=rngs)

    def _run(self, params, input_ids, attention_mask, train, dropout_rng):
        """The jitted forward and the per-row loss weight of a user call."""
        params, input_ids, attention_mask = self._checked(params, input_ids, attention_mask)
        if train and dropout_rng is None:
            dropout_rng = jax.random.PRNGKey(0)
        out = self._forward(params, input_ids, attention_mask, dropout_rng if train else None,
                            deterministic=not train)
        return out, _row_weight(attention_mask, input_ids.shape[0])

    def params_from_causal_lm(self, lm_params, seed: int = 0):
        """Start a fine-tune from a causal LM: its trunk, a freshly initialised head (the LM head is dropped)."""
        lm_params = unwrap_params(lm_params)
        params = self.init_weights(jax.random.PRNGKey(seed))
        expected = jax.tree_util.tree_map(jnp.shape, params["transformer"])
        got = jax.tree_util.tree_map(jnp.shape, lm_params["transformer"])
        if expected != got:
            raise ValueError("the causal LM's trunk does not match this config's geometry")
        return {**params, "transformer": lm_params["transformer"]}

    def _logits(self, params, batch, rng, deterministic):
        """The forward of a training batch (traced inside the trainer's step) and its per-row loss weight."""
        mask = batch.get("attention_mask")
        return (self._apply(params, batch["input_ids"], mask, rng, deterministic),
                _row_weight(mask, batch["input_ids"].shape[0]))


class FlaxMptForSequenceClassification(_FlaxMptHeadModel):
    """Logits [B, num_labels] of the last non-padding token (config.pad_token_id; without one,
    the last position, and only batch size 1 is allowed, as in transformers)."""

    module_class = MptForSequenceClassificationModule
    architecture = "MptForSequenceClassification"

    def __call__(self, input_ids, attention_mask=None, params=None, labels=None, train: bool = False,
                 dropout_rng=None) -> FlaxMptClassifierOutput:
        if self.config.pad_token_id is None and jnp.shape(input_ids)[0] != 1:
            raise ValueError("cannot pool batches of more than one row: config.pad_token_id is not set")
        logits, weight = self._run(params, input_ids, attention_mask, train, dropout_rng)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(self.config, logits, jnp.asarray(labels), weight)
        return FlaxMptClassifierOutput(logits=logits, loss=loss)

    def loss(self, params, batch, rng, deterministic):
        """rows: input_ids, attention_mask, labels ([B], or [B, num_labels] for multi-label / regression)."""
        logits, weight = self._logits(params, batch, rng, deterministic)
        return sequence_classification_loss(self.config, logits, batch["labels"], weight)


class FlaxMptForTokenClassification(_FlaxMptHeadModel):
    """Logits [B, T, num_labels]; labels of -100 are ignored by the loss."""

    module_class = MptForTokenClassificationModule
    architecture = "MptForTokenClassification"

    def __call__(self, input_ids, attention_mask=None, params=None, labels=None, train: bool = False,
                 dropout_rng=None) -> FlaxMptClassifierOutput:
        logits, weight = self._run(params, input_ids, attention_mask, train, dropout_rng)
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, jnp.asarray(labels), weight)
        return FlaxMptClassifierOutput(logits=logits, loss=loss)

    def loss(self, params, batch, rng, deterministic):
        """rows: input_ids, attention_mask, labels [B, T]."""
        logits, weight = self._logits(params, batch, rng, deterministic)
        return token_classification_loss(logits, batch["labels"], weight)


class FlaxMptForQuestionAnswering(_FlaxMptHeadModel):
    """Start and end logits [B, T] of an answer span."""

    module_class = MptForQuestionAnsweringModule
    architecture = "MptForQuestionAnswering"

    def __call__(self, input_ids, attention_mask=None, params=None, start_positions=None, end_positions=None,
                 train: bool = False, dropout_rng=None) -> FlaxMptQuestionAnsweringOutput:
        (start, end), weight = self._run(params, input_ids, attention_mask, train, dropout_rng)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(start, end, jnp.asarray(start_positions), jnp.asarray(end_positions),
                                           weight)
        return FlaxMptQuestionAnsweringOutput(start_logits=start, end_logits=end, loss=loss)

    def loss(self, params, batch, rng, deterministic):
        """rows: input_ids, attention_mask, start_positions [B], end_positions [B]."""
        (start, end), weight = self._logits(params, batch, rng, deterministic)
        return question_answering_loss(start, end, batch["start_positions"], batch["end_positions"], weight)


MODEL_CLASSES = {cls.architecture: cls for cls in (FlaxMptForCausalLM, FlaxMptForSequenceClassification,
                                                   FlaxMptForTokenClassification, FlaxMptForQuestionAnswering)}


def model_class_for(config: MptConfig) -> type[FlaxMptPreTrainedModel]:
    """The wrapper for the architecture a config.json names (MptConfig has refused any other)."""
    return MODEL_CLASSES[config.architecture]
