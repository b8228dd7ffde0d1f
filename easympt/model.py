"""The MPT trunk, the causal-LM module and the FlaxMptForCausalLM wrapper.

Parameter names follow the Hugging Face checkpoint (`transformer/blocks_3/
attn/Wqkv/kernel` <-> `transformer.blocks.3.attn.Wqkv.weight`), so the
converter's name map is one short table.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from easympt.cache import KVCache, write_rows
from easympt.config import MptConfig
from easympt.dtypes import default_compute_dtype, resolve_dtype
from easympt.kernels.attention import ATTENTION_KERNELS, AttentionMask
from easympt.kernels.linear import embedding_layer, flat_tokens
from easympt.kernels.quant import check_format, embedding_format
from easympt.layers import MptAttention, MptFFN, MptModule, initializers, make_norm, ordered_after
from easympt.sharding import constrain


class MptBlock(MptModule):

    @nn.compact
    def __call__(self, x, mask: AttentionMask, layer_cache=None, write_index=None, deterministic=True):
        c = self.config
        sub = self.submodule_fields()
        h, layer_cache = MptAttention(**sub, name="attn")(
            make_norm(c, "norm_1", self.dtype, self.param_dtype)(x), mask, layer_cache, write_index,
            deterministic)
        x = x + nn.Dropout(c.resid_pdrop)(h, deterministic=deterministic or not c.resid_pdrop)
        h = MptFFN(**sub, name="ffn")(make_norm(c, "norm_2", self.dtype, self.param_dtype)(x), deterministic)
        x = x + nn.Dropout(c.resid_pdrop)(h, deterministic=deterministic or not c.resid_pdrop)
        return constrain(x, self.mesh, ("batch", "length", "embed")), layer_cache


class MptTransformer(MptModule):
    """Embeddings, blocks and final norm: hidden states [B, T, E].

    `remat` recomputes each block's activations in the backward pass
    (jax.checkpoint) instead of storing them: long sequences train in less
    memory for about one more forward pass of compute."""

    remat: bool = False

    def setup(self):
        c = self.config
        _, _, emb_init = initializers(c)
        self.wte = embedding_layer(c.vocab_size, c.d_model, embedding_init=emb_init, packed=self.cpu_kernels,
                                   dtype=self.dtype, param_dtype=self.param_dtype, quantize=self.quantize)
        if c.uses_learned_pos_emb:
            self.wpe = nn.Embed(c.max_seq_len, c.d_model, embedding_init=emb_init, dtype=self.dtype,
                                param_dtype=self.param_dtype)
        self.blocks = [MptBlock(**self.submodule_fields()) for _ in range(c.n_layers)]
        self.norm_f = make_norm(c, None, self.dtype, self.param_dtype)
        self.emb_drop = nn.Dropout(c.emb_pdrop)

    def __call__(self, input_ids, attention_mask=None, cache: KVCache | None = None, prefix_mask=None,
                 sequence_id=None, deterministic=True, cache_window: int | None = None):
        c = self.config
        B, T = input_ids.shape
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        if sequence_id is not None and not c.attn_config.attn_uses_sequence_id:
            raise ValueError("sequence_id was passed but config.attn_config.attn_uses_sequence_id is False")
        if prefix_mask is not None and not c.attn_config.prefix_lm:
            raise ValueError("prefix_mask was passed but config.attn_config.prefix_lm is False")
        if c.attn_config.prefix_lm and prefix_mask is None:
            raise ValueError("a prefix_lm model needs prefix_mask [B, T] (1 on the bidirectional prefix)")

        x = self.wte(input_ids)
        if c.uses_learned_pos_emb:
            before = cache.n_tokens[:, None] if cache is not None else 0
            m = mask.astype(jnp.int32)
            pos = before + jnp.cumsum(m, axis=1) - m  # real tokens before each token: left padding skipped
            x = x + self.wpe(jnp.clip(pos, 0, c.max_seq_len - 1))
        if c.embedding_fraction < 1.0:  # CogView's trick: same forward, scaled embedding gradient
            x = x * c.embedding_fraction + jax.lax.stop_gradient(x) * (1 - c.embedding_fraction)
        x = self.emb_drop(x, deterministic=deterministic or not c.emb_pdrop)
        x = constrain(x, self.mesh, ("batch", "length", "embed"))

        prefix = None if prefix_mask is None else prefix_mask.astype(bool)
        if cache is None:
            index = jnp.zeros((B,), jnp.int32)
            k_slots = jnp.arange(T, dtype=jnp.int32)
            key_valid, key_prefix = mask, prefix
        else:
            if sequence_id is not None:
                raise ValueError("sequence_id (packed training documents) cannot be used with a KV cache")
            index = cache.index
            key_valid = write_rows(cache.key_valid, mask, index)
            key_prefix = None if prefix is None else write_rows(jnp.zeros_like(key_valid), prefix, index)
            # attend over the first `cache_window` slots only (the caller promises every row's keys lie
            # there): decode then reads what rows hold, not the whole cache bucket
            W = cache.max_length if cache_window is None else min(cache_window, cache.max_length)
            k_slots = jnp.arange(W, dtype=jnp.int32)
            cache_valid, key_valid = key_valid, key_valid[:, :W]
            key_prefix = None if key_prefix is None else key_prefix[:, :W]
        q_slots = index[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        attn_mask = AttentionMask(q_slots, k_slots, key_valid, key_prefix, sequence_id, sequence_id, causal=c.causal)

        keys, values = [], []
        for i, block in enumerate(self.blocks):
            if self.remat and cache is None:
                x = recompute_in_backward(block, x, attn_mask, index, deterministic)
                continue
            layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
            x, layer_cache = block(x, attn_mask, layer_cache, index, deterministic)
            if layer_cache is not None:
                keys.append(layer_cache[0])
                values.append(layer_cache[1])
        x = self.norm_f(x)
        if cache is not None:
            cache = cache.replace(keys=tuple(keys), values=tuple(values), key_valid=cache_valid,
                                  index=index + T, n_tokens=cache.n_tokens + mask.sum(1).astype(jnp.int32))
        return x, cache

    def attend_embedding(self, x):
        return flat_tokens(self.wte.attend, x)


def recompute_in_backward(block: MptBlock, x, attn_mask, index, deterministic):
    """`block(x)` whose activations are recomputed in the backward pass (remat), and only once the
    gradient of its output exists.

    `nn.remat` alone orders nothing: its optimization barrier covers the recomputation's inputs,
    not the incoming gradient, and XLA:CPU drops barriers before scheduling. It scheduled every
    block's recomputation early, so a 32-layer step at 8k tokens held all layers' activations at
    once (168 GB of temporaries, more than without remat). Here the saved input is made to depend
    on the gradient (`ordered_after`), so a block is recomputed only when its backward runs and one
    block's activations are alive at a time (23 GB).

    The same holds for what a block makes from its weights alone: the float32 copy XLA:CPU makes of
    bfloat16 weights for its products, or an 8- / 4-bit matrix dequantized. Depending on nothing but
    the parameters, XLA scheduled every block's copies at the start of the step and kept them (and
    shared them with the recomputation) to the end: 0.85 GB a layer of mpt-7b, 38.95 GB for a QLoRA
    step at 2,048 tokens. So the forward reads its weights ordered after the block's input, and the
    recomputation after the block's incoming gradient (every saved residual, weights included): a
    block's copies exist while that block runs (QLoRA step: 11.43 GB)."""

    def run(mdl, x):
        return mdl(x, attn_mask, None, index, deterministic)[0]

    def forward(mdl, x):
        if mdl.is_initializing():
            return nn.vjp(nn.remat(run), mdl, x)
        ordered = nn.map_variables(run, "params", trans_in_fn=lambda p: ordered_after(p, x), mutable=False)
        return nn.vjp(nn.remat(ordered), mdl, x)

    def backward(vjp_fn, g):
        saved, treedef = jax.tree_util.tree_flatten(vjp_fn)
        saved = [ordered_after(s, g) if hasattr(s, "shape") and s.ndim >= 1 else s for s in saved]
        return jax.tree_util.tree_unflatten(treedef, saved)(g)

    return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(block, x)


class MptTaskModule(MptModule):
    """A module on the MPT trunk (`transformer`): the causal LM and the task heads."""

    remat: bool = False

    def make_trunk(self) -> MptTransformer:
        return MptTransformer(**self.submodule_fields(), remat=self.remat)

    def head(self, features: int, use_bias: bool, quantize: str | None = None) -> nn.Module:
        """An output layer; float unless `quantize` (task heads have a handful of outputs: nothing to gain)."""
        return self.dense(features, initializers(self.config)[0], use_bias, quantize=quantize)


class MptForCausalLMModule(MptTaskModule):

    def setup(self):
        self.transformer = self.make_trunk()
        if not self.config.tie_word_embeddings:
            self.lm_head = self.head(self.config.vocab_size, use_bias=False,
                                     quantize=embedding_format(self.quantize))  # at most int8, as the tied head

    def __call__(self, input_ids, attention_mask=None, cache=None, prefix_mask=None, sequence_id=None,
                 deterministic=True, logits_slice=None, cache_window: int | None = None):
        """logits [B, T, V] (float32) and the updated cache.

        `logits_slice` (start, size) projects only those positions onto the
        vocabulary: prefill needs one position, not T.
        """
        h, cache = self.transformer(input_ids, attention_mask, cache, prefix_mask, sequence_id, deterministic,
                                    cache_window)
        if logits_slice is not None:
            h = jax.lax.dynamic_slice_in_dim(h, logits_slice[0], logits_slice[1], axis=1)
        if self.config.tie_word_embeddings:
            logits = self.transformer.attend_embedding(h)
        else:
            logits = self.lm_head(h)
        logits = logits.astype(jnp.float32)
        if self.config.logit_multiplier is not None:
            logits = logits * self.config.logit_multiplier
        return constrain(logits, self.mesh, ("batch", "length", "vocab")), cache


@flax.struct.dataclass
class FlaxMptOutput:
    logits: jax.Array
    cache: KVCache | None = None


def unwrap_params(params):
    """Accept both the bare tree and the {"params": tree} that flax's apply wants."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


class FlaxMptPreTrainedModel:
    """transformers-Flax-style wrapper: holds the module, (optionally) params
    and a jitted forward. `params` are the bare tree ({"transformer": ...}).
    Subclasses name their module, the HF architecture they load and save, and
    their training loss."""

    module_class: type = MptTaskModule
    architecture: str = ""

    def __init__(self, config: MptConfig, dtype=None, param_dtype=jnp.float32, precision=None,
                 _do_init: bool = True, input_shape=(1, 1), seed: int = 0, mesh=None, remat: bool = False,
                 attention: str = "auto", quantize: str | None = None, lora=None):
        """attention: "auto" (dense for short inputs, blockwise for long), "dense", "blockwise" or
        "pallas" (easympt.kernels.pallas_attention: a Pallas kernel for accelerators, interpreted on CPU).
        quantize: the weight format of the matrices, None (float, `param_dtype`), "int8" or "int4"
        (easympt.kernels.quant; weight-only: compute stays in `dtype`, norms and biases in `param_dtype`).
        lora: an easympt.adapters.LoraSpec: LoRA adapters on the dense layers it targets (their
        `lora_a` / `lora_b` params join the tree; easympt.adapters.lora)."""
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KERNELS)}")
        self.config = config
        self.dtype = resolve_dtype(dtype) or default_compute_dtype()
        self.param_dtype = resolve_dtype(param_dtype)
        self.input_shape = tuple(input_shape)
        self.quantize = check_format(quantize)
        self.module = self.module_class(config, self.dtype, self.param_dtype, precision, mesh, attention,
                                        quantize=self.quantize, lora=lora, remat=remat)
        self._forward = jax.jit(self._apply, static_argnames=("deterministic",))
        self.params = self.init_weights(jax.random.PRNGKey(seed), self.input_shape) if _do_init else None

    @property
    def weights_format(self) -> str:
        """The matrices' format: "int8" / "int4" (weight-only, easympt.kernels.quant) or the float dtype's name."""
        return self.quantize or jnp.dtype(self.param_dtype).name

    @property
    def lora(self):
        return self.module.lora

    @property
    def mesh(self):
        return self.module.mesh

    def init_weights(self, rng, input_shape=None):
        ids = jnp.zeros(input_shape or self.input_shape, jnp.int32)
        return self._init(rng, ids)

    def _init(self, rng, ids):
        return self.module.init({"params": rng}, ids)["params"]

    def params_shape(self):
        """ShapeDtypeStruct tree of the parameters, without allocating them."""
        ids = jnp.zeros((1, 1), jnp.int32)
        return jax.eval_shape(self._init, jax.random.PRNGKey(0), ids)

    def _checked(self, params, input_ids, attention_mask):
        params = unwrap_params(self.params if params is None else params)
        if params is None:
            raise ValueError("no params: pass params=... (the model was built with _do_init=False)")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        return params, input_ids, attention_mask

    def loss(self, params, batch: dict, rng, deterministic: bool):
        """Mean training loss of a batch of rows (the trainer differentiates this)."""
        raise NotImplementedError


class FlaxMptForCausalLM(FlaxMptPreTrainedModel):
    module_class = MptForCausalLMModule
    architecture = "MptForCausalLM"

    def _init(self, rng, ids):
        extra = {"prefix_mask": jnp.ones_like(ids)} if self.config.attn_config.prefix_lm else {}
        return self.module.init({"params": rng}, ids, **extra)["params"]

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        return KVCache.zeros(self.config, batch_size, max_length, dtype or self.dtype)

    def _apply(self, params, input_ids, attention_mask, cache, prefix_mask, sequence_id, dropout_rng,
               deterministic):
        rngs = None if dropout_rng is None else {"dropout": dropout_rng}
        logits, cache = self.module.apply({"params": params}, input_ids, attention_mask, cache, prefix_mask,
                                          sequence_id, deterministic, rngs=rngs)
        return FlaxMptOutput(logits=logits, cache=cache)

    def __call__(self, input_ids, attention_mask=None, params=None, cache: KVCache | None = None,
                 prefix_mask=None, sequence_id=None, train: bool = False, dropout_rng=None) -> FlaxMptOutput:
        params, input_ids, attention_mask = self._checked(params, input_ids, attention_mask)
        if train and dropout_rng is None:
            dropout_rng = jax.random.PRNGKey(0)
        return self._forward(params, input_ids, attention_mask, cache, prefix_mask, sequence_id,
                             dropout_rng if train else None, deterministic=not train)

    def loss(self, params, batch: dict, rng, deterministic: bool):
        """Mean next-token cross-entropy over positions whose target has loss_mask 1
        (rows: input_ids, attention_mask, loss_mask, sequence_id)."""
        seq = batch["sequence_id"] if self.config.attn_config.attn_uses_sequence_id else None
        logits, _ = self.module.apply({"params": params}, batch["input_ids"], batch["attention_mask"], None, None,
                                      seq, deterministic, rngs={"dropout": rng})
        # every position against the next token, the last one weighted 0: slicing logits[:, :-1] would
        # copy the [B, T, V] logits (and pad their gradient back), ~60 ms of a 125m step on CPU
        targets = jnp.roll(batch["input_ids"], -1, axis=1)
        weights = jnp.roll(batch["loss_mask"], -1, axis=1).at[:, -1].set(0)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return (ce * weights).sum() / jnp.maximum(weights.sum(), 1.0)
