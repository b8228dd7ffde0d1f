"""The generation engine: prefill -> insert -> generate over decode slots.

JetStream/MaxText's split. `prefill` runs a left-padded prompt bucket once
and samples the first token; `insert` copies that into free rows of the
running decode state; `generate` runs `n_steps` cached decode steps in one
dispatch (a while_loop that also stops when every row is done). Each has a
handful of compiled shapes: prompt-length buckets (powers of two from
`max_compile_tokens` to `max_length`) and one decode batch. Sampling settings
are traced per-row arrays, so no request recompiles anything.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from easympt.adapters import lora
from easympt.adapters.peft_format import layer_dims
from easympt.cache import KVCache, cache_rows, resolve_kv_dtype
from easympt.generation import speculative
from easympt.generation.sampling import (MAX_LOGPROBS, NO_STOP, SamplingConfig, SamplingRows, TokenLogprobs,
                                        greedy_tokens, sample, token_logprobs)
from easympt.kernels import cpu, linear
from easympt.model import FlaxMptForCausalLM, unwrap_params


@flax.struct.dataclass
class Prefix:
    """A prefilled group of n prompts, ready to insert."""

    cache: KVCache  # [n, P] (or [n, S] when prefilled straight into a decode cache)
    token: jax.Array  # [n] first sampled token
    seen: jax.Array  # [n, V] tokens in the prompt (repetition penalty)
    rows: SamplingRows
    max_new: jax.Array  # [n]
    stop_ids: jax.Array  # [n, NS]
    # with_logprobs only: the first token's, and each prompt token's given the tokens before it
    # ([n, P]; a row's first real token has none: its entry is meaningless)
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None
    history: jax.Array | None = None  # [n, cache length] the token at each cache slot, -1 none (drafts)
    draft_cache: KVCache | None = None  # the draft model's cache of the same prompts (speculative decoding)


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # [B, S]
    token: jax.Array  # [B] last sampled token, fed at the next step
    active: jax.Array  # [B] bool
    n_new: jax.Array  # [B] tokens emitted so far
    max_new: jax.Array  # [B]
    stop_ids: jax.Array  # [B, NS]
    seen: jax.Array  # [B, V] bool
    rows: SamplingRows
    history: jax.Array  # [B, S] int32: the token at each cache slot, -1 none (speculative drafts)
    spec_counts: jax.Array  # [2] int32: draft tokens checked and accepted so far (all rows)
    draft_cache: KVCache | None = None  # [B, S] the draft model's, in step with `cache`


def prefill_buckets(max_compile_tokens: int, max_length: int) -> tuple[int, ...]:
    out, b = [], max(1, max_compile_tokens)
    while b < max_length:
        out.append(b)
        b *= 2
    out.append(max_length)
    return tuple(out)


def bucket_for(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def _following(tokens):
    """Each position's next token [n, P] (the last repeats: it scores nothing anyone reads)."""
    return jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)


def _shift_scores(lp: TokenLogprobs) -> TokenLogprobs:
    """Scores of each position's following token -> scores of each position's own token (position 0
    gets the first entry again: it has no score and callers skip it)."""
    return jax.tree_util.tree_map(lambda x: jnp.concatenate([x[:, :1], x[:, :-1]], axis=1), lp)


def _with_cpu_kernels(model: FlaxMptForCausalLM, params, wanted: bool | None, consume: bool = False):
    """(module, params) the engine runs: with the CPU kernels, a module that uses them and a packed copy
    of the weights (`consume`: made in place of `params`, whose matrices are deleted as they are packed)."""
    usable = (cpu.available() and model.mesh is None and jnp.dtype(model.dtype) == jnp.float32
              and jnp.dtype(model.param_dtype) in cpu.WEIGHT_DTYPES)
    if wanted and not usable:
        raise ValueError("cpu_kernels=True needs JAX on CPU, easympt's CPU kernels built (a C++ compiler at "
                         "install) and not off (EASYMPT_CPU_KERNELS=0), float32 compute over float32 or bfloat16 "
                         "weights, and no mesh")
    if not (usable if wanted is None else wanted) or params is None:  # None: abstract use (memory checks)
        return model.module, params
    module = model.module.clone(cpu_kernels=True)
    packed = linear.pack_params(params, model.param_dtype, consume)  # the model's weight dtype: float32 or bfloat16
    expected = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    linear.check_packed(packed, expected)
    return module, packed


def _is_stop(token, stop_ids):
    return jnp.any(token[:, None] == stop_ids, axis=-1)


class GenerationEngine:
    """Owns the compiled prefill / insert / generate functions for one model.

    `max_length` bounds prompt + generated tokens per row (ALiBi lets it
    exceed the config's `max_seq_len`; learned position embeddings do not).

    `cpu_kernels`: run the weight products on a packed copy of the weights and decode attention over
    the slots rows hold with easympt's CPU kernels (easympt.kernels.cpu; ~2x faster decode at batch 8,
    ~1.2x at batch 1). None: wherever they can run (JAX on CPU, the kernels built for this CPU,
    float32 compute over float32 or bfloat16 weights, no mesh). The engine then holds the packed copy,
    in the model's weight dtype (`param_dtype`); drop other references to `params` to keep one copy
    in memory, or pass `consume_params=True` when nothing else will read them: each matrix is then
    deleted as soon as it is packed, so packing never holds two copies of the weights (what
    Generator.from_pretrained and the server do with the params they load).

    `kv_dtype`: the KV cache's dtype (default: the model's compute dtype). A bfloat16 cache under
    float32 compute halves the bytes a long-context decode step reads (the attention kernel widens
    it exactly on load) at the cost of rounding keys and values to bfloat16, as llama.cpp's default
    16-bit cache does. "int8" quarters it (easympt.cache.Int8Slots: a scale per slot and KV head; the
    CPU decode kernel reads the int8 slots, XLA's path a dequantized copy).

    `max_loras` > 0: that many LoRA adapter slots of rank up to `max_lora_rank` on every dense layer
    (easympt.adapters.lora), filled and emptied with `set_adapter` / `clear_adapter` without compiling
    anything new; each row picks its slot with SamplingConfig.adapter, so one batch mixes adapters.
    """

    def __init__(self, model: FlaxMptForCausalLM, params, max_length: int = 2048, max_compile_tokens: int = 64,
                 stop_slots: int = 8, prefill_chunk: int = 2048, cpu_kernels: bool | None = None,
                 kv_dtype=None, consume_params: bool = False, max_loras: int = 0, max_lora_rank: int = 16,
                 num_speculative_tokens: int = 0, draft_model: FlaxMptForCausalLM | None = None, draft_params=None):
        cfg = model.config
        if cfg.uses_learned_pos_emb and max_length > cfg.max_seq_len:
            raise ValueError(f"max_length {max_length} exceeds max_seq_len {cfg.max_seq_len} of a model with "
                             "learned position embeddings (only ALiBi models extrapolate)")
        if cfg.attn_config.prefix_lm:
            raise ValueError("generation with prefix_lm models is not implemented")
        self.model, self.config = model, cfg
        self.kv_dtype = resolve_kv_dtype(kv_dtype) or model.dtype
        self.module, self.params = _with_cpu_kernels(model, unwrap_params(params), cpu_kernels, consume_params)
        self.lora = None  # the served adapter slots' LoraSpec
        if max_loras:
            if model.lora is not None:
                raise ValueError("serve a trained adapter from its PEFT files (set_adapter), not a LoRA model's params")
            if model.mesh is not None:
                raise ValueError("LoRA adapters are served on one device; no mesh")
            self.lora = lora.LoraSpec(rank=int(max_lora_rank), alpha=float(max_lora_rank),
                                      targets=tuple(layer_dims(cfg)), slots=int(max_loras))
            self.module = self.module.clone(lora=self.lora)
            if self.params is not None:
                shapes = jax.eval_shape(self.module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
                _, slots = lora.split(shapes["params"])
                self.params = lora.merge(self.params, jax.tree_util.tree_map(
                    lambda s: jnp.zeros(s.shape, s.dtype), slots))
            self._put_adapter = jax.jit(_put_adapter, donate_argnums=(0,))
        # the instruction set the CPU kernels run with (easympt.kernels.cpu), None without them
        self.cpu_isa = cpu.active_isa() if self.module.cpu_kernels else None
        self.max_length = int(max_length)
        if not 0 <= num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must lie in [0, 16], got {num_speculative_tokens}")
        self.spec_k = int(num_speculative_tokens)  # drafts checked per step (0: none)
        # a draft model proposes the drafts (else prompt lookup does): a small MPT of the same vocabulary
        self.draft_module = self.draft_params = self.draft_config = None
        if draft_model is not None:
            if draft_model.config.vocab_size != cfg.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from "
                                 f"the model's ({cfg.vocab_size}): a draft model must share its tokenizer")
            if draft_model.config.uses_learned_pos_emb and max_length > draft_model.config.max_seq_len:
                raise ValueError(f"max_length {max_length} exceeds the draft model's max_seq_len "
                                 f"{draft_model.config.max_seq_len} (learned position embeddings)")
            if model.mesh is not None or draft_model.mesh is not None:
                raise ValueError("a draft model runs on one device; no mesh")
            self.draft_module, self.draft_params = _with_cpu_kernels(draft_model, unwrap_params(draft_params),
                                                                     cpu_kernels, consume_params)
            self.draft_config = draft_model.config
            self.spec_k = self.spec_k or 4
        self.max_compile_tokens = int(max_compile_tokens)
        # prompts up to one chunk prefill in one pass (power-of-two buckets); longer ones chunk by chunk
        self.prefill_chunk = int(min(prefill_chunk, self.max_length))
        self.buckets = prefill_buckets(self.max_compile_tokens, self.prefill_chunk)
        self.stop_slots = stop_slots
        prefill = jax.jit(self._prefill, static_argnames=("cache_len", "with_logprobs"))
        self.prefill = self._with_draft_params(prefill)
        extend = jax.jit(self._extend, static_argnames=("with_logprobs",), donate_argnums=(4, 5))
        self.extend = self._with_draft_params(extend)
        self.finish = jax.jit(self._finish, static_argnames=("with_logprobs",), donate_argnums=(1,))
        self.insert = jax.jit(self._insert, donate_argnums=(1,))
        # one compiled decode loop without log-probabilities (the common case) and one with
        # `window`: attend over the first `window` cache slots only (every row's keys must lie there)
        # (the draft model's params, when there is one, are passed beside the model's)
        generate = jax.jit(
            lambda params, dparams, state, n_steps, window=None: self._generate(params, dparams, state, n_steps, False,
                                                                                window)[:2],
            static_argnames=("n_steps", "window"), donate_argnums=(2,))
        self.generate = self._with_draft_params(generate)
        generate_logprobs = jax.jit(
            lambda params, dparams, state, n_steps, window=None: self._generate(params, dparams, state, n_steps, True,
                                                                                window),
            static_argnames=("n_steps", "window"), donate_argnums=(2,))
        self.generate_logprobs = self._with_draft_params(generate_logprobs)
        self.start = jax.jit(self._start, donate_argnums=(0,))  # the decode state takes over the prefix's cache

    def _with_draft_params(self, jitted):
        """`jitted(params, ...)` called as jitted(params, draft model's params, ...): callers pass the
        model's params alone. The wrapper keeps `lower` and the compile cache's size (`_cache_size`)."""
        def call(params, *args, **kwargs):
            return jitted(params, self.draft_params, *args, **kwargs)

        call._cache_size = jitted._cache_size
        call.lower = lambda params, *args, **kwargs: jitted.lower(params, self.draft_params, *args, **kwargs)
        return call

    # ------------------------------------------------------------ device side
    def describe(self) -> str:
        """What runs here, in one line: backend, weights, KV cache and the weight products' kernels."""
        kernels = f"easympt's CPU kernels ({self.cpu_isa})" if self.cpu_isa else "XLA"
        return (f"{jax.default_backend()}: {jnp.dtype(self.model.dtype).name} compute, "
                f"{self.model.weights_format} weights, {jnp.dtype(self.kv_dtype).name} KV cache, "
                f"weight products by {kernels}")

    def _forward(self, params, tokens, mask, cache, logits_slice=None, cache_window=None, adapter=None):
        """The model's logits and cache; `adapter` [B]: each row's LoRA slot (with adapter slots)."""
        variables = {"params": params}
        if self.lora is not None and adapter is not None:
            variables[lora.ROWS] = lora.rows_collection(params, adapter)
        return self.module.apply(variables, tokens, mask, cache, None, None, True, logits_slice, cache_window)

    def _draft_forward(self, dparams, tokens, mask, cache, logits_slice=None, cache_window=None):
        """The draft model's logits and cache (no adapters)."""
        return self.draft_module.apply({"params": dparams}, tokens, mask, cache, None, None, True, logits_slice,
                                       cache_window)

    def _draft_zeros(self, n: int, cache_len: int) -> KVCache | None:
        return None if self.draft_module is None else KVCache.zeros(self.draft_config, n, cache_len, self.kv_dtype)

    def _extend(self, params, dparams, tokens, mask, cache: KVCache, draft_cache, seen, next_tokens,
                with_logprobs: bool, window: int | None = None, adapter=None):
        """One prompt chunk [n, C] into `cache` (and the draft model's `draft_cache`, if any): (cache,
        draft cache, seen, last position's logits [n, V], and with `with_logprobs` the TokenLogprobs
        [n, C] of `next_tokens`, each position's following token). `window`: attend over the cache's
        first `window` slots only (every row's keys lie there). `adapter` [n]: each row's LoRA slot."""
        C = tokens.shape[1]
        logits, cache = self._forward(params, tokens, mask, cache, logits_slice=None if with_logprobs else (C - 1, 1),
                                      cache_window=window, adapter=adapter)
        if draft_cache is not None:
            draft_cache = self._draft_forward(dparams, tokens, mask, draft_cache, (C - 1, 1), window)[1]
        seen = jax.vmap(lambda s, t, m: s.at[t].max(m))(seen, tokens, mask.astype(bool))
        return cache, draft_cache, seen, logits[:, -1], token_logprobs(logits, next_tokens) if with_logprobs else None

    def _finish(self, last_logits, cache, seen, rows: SamplingRows, max_new, stop_ids, with_logprobs: bool,
                history, draft_cache=None) -> Prefix:
        """Sample every row's first token from its last prompt position."""
        token = sample(last_logits, rows, jnp.zeros((last_logits.shape[0],), jnp.int32), seen)
        prefix = Prefix(cache, token, seen, rows, max_new, stop_ids, history=history, draft_cache=draft_cache)
        return prefix.replace(logprobs=token_logprobs(last_logits, token)) if with_logprobs else prefix

    def _prefill(self, params, dparams, tokens, mask, rows: SamplingRows, max_new, stop_ids, cache_len: int,
                 with_logprobs: bool = False) -> Prefix:
        """tokens/mask [n, P], left padded; the last column is every row's last prompt token.
        `with_logprobs` keeps every position's logits of this same pass to score the prompt."""
        n, P = tokens.shape
        cache = KVCache.zeros(self.config, n, cache_len, self.kv_dtype)
        seen = jnp.zeros((n, self.config.vocab_size), bool)
        # a fresh cache: the prompt fills slots 0..P-1, so its attention reads those alone rather than
        # the room left for the reply (a 512-token prompt in a 1,024-slot cache: 548 -> 459 ms on mpt-125m)
        window = P if P < cache_len else None
        cache, draft_cache, seen, last, lp = self._extend(params, dparams, tokens, mask, cache,
                                                          self._draft_zeros(n, cache_len), seen, _following(tokens),
                                                          with_logprobs, window, rows.adapter)
        history = jnp.full((n, cache_len), -1, jnp.int32).at[:, :P].set(jnp.where(mask > 0, tokens, -1))
        prefix = self._finish(last, cache, seen, rows, max_new, stop_ids, with_logprobs, history, draft_cache)
        return prefix.replace(prompt_logprobs=_shift_scores(lp)) if with_logprobs else prefix

    def _start(self, prefix: Prefix, capacity: int | None = None) -> DecodeState:
        """Decode rows from a prefix; `capacity` is the length of the cache they will decode in."""
        token = prefix.token
        stopped = _is_stop(token, prefix.stop_ids)
        n_new = jnp.where(stopped, 0, 1).astype(jnp.int32)
        room = prefix.cache.index < (capacity or prefix.cache.max_length)
        active = ~stopped & (n_new < prefix.max_new) & room
        seen = prefix.seen | (jax.nn.one_hot(token, self.config.vocab_size, dtype=bool) & ~stopped[:, None])
        return DecodeState(prefix.cache, token, active, n_new, prefix.max_new, prefix.stop_ids, seen,
                           prefix.rows, prefix.history, jnp.zeros((2,), jnp.int32), prefix.draft_cache)

    def _insert(self, prefix: Prefix, state: DecodeState, slots) -> DecodeState:
        """Rows `slots` [n] of `state` take the prefilled prompts; other rows are untouched. A slot
        index past the batch drops its row (a filler row of a padded prefill batch)."""
        prefix = prefix.replace(logprobs=None, prompt_logprobs=None)  # host-side results; one compiled insert
        new = self._start(prefix, capacity=state.cache.max_length)
        P = prefix.cache.max_length
        cache = _put_cache_rows(state.cache, prefix.cache, slots, self.config.kv_heads)
        draft_cache = None
        if state.draft_cache is not None:
            draft_cache = _put_cache_rows(state.draft_cache, prefix.draft_cache, slots, self.draft_config.kv_heads)
        put_rows = lambda a, b: a.at[slots].set(b, mode="drop")  # noqa: E731
        rows = jax.tree_util.tree_map(put_rows, state.rows, new.rows)
        return DecodeState(
            cache=cache,
            token=put_rows(state.token, new.token),
            active=put_rows(state.active, new.active),
            n_new=put_rows(state.n_new, new.n_new),
            max_new=put_rows(state.max_new, new.max_new),
            stop_ids=put_rows(state.stop_ids, new.stop_ids),
            seen=put_rows(state.seen, new.seen),
            rows=rows,
            history=state.history.at[slots].set(-1, mode="drop").at[slots, :P].set(new.history, mode="drop"),
            spec_counts=state.spec_counts,
            draft_cache=draft_cache)

    def _generate(self, params, dparams, state: DecodeState, n_steps: int, with_logprobs: bool = False,
                  window: int | None = None):
        """Up to n_steps decode steps; tokens [B, n_steps * (k + 1)] (k: num_speculative_tokens), each
        row's emitted tokens first and -1 after them, and with `with_logprobs` their TokenLogprobs
        (and, one past a row's last token, the score of the stop token that ended it)."""
        B, S = state.token.shape[0], state.cache.max_length
        T = self.spec_k + 1
        width = n_steps * T
        out = jnp.full((B, width), -1, jnp.int32)
        lps = None
        if with_logprobs:
            lps = TokenLogprobs(jnp.zeros((B, width), jnp.int32), jnp.zeros((B, width), jnp.float32),
                                jnp.zeros((B, width, MAX_LOGPROBS), jnp.int32),
                                jnp.zeros((B, width, MAX_LOGPROBS), jnp.float32))
        batch = jnp.arange(B)

        def running(carry):
            i, st, *_ = carry
            return (i < n_steps) & jnp.any(st.active)

        def plain(st, draft_cache):
            """One token per row: (cache, draft cache, taken [B, T] (-1 after the first), accepted drafts [B],
            scores)."""
            logits, cache = self._forward(params, st.token[:, None], st.active[:, None], st.cache, cache_window=window,
                                          adapter=st.rows.adapter)
            if draft_cache is not None:  # the draft model reads every token the model does
                draft_cache = self._draft_forward(dparams, st.token[:, None], st.active[:, None], draft_cache,
                                                  (0, 1), window)[1]
            token = sample(logits[:, 0], st.rows, st.n_new, st.seen)
            taken = jnp.full((B, T), -1, jnp.int32).at[:, 0].set(token)
            scores = None
            if with_logprobs:
                scores = jax.tree_util.tree_map(lambda x: jnp.repeat(x[:, None], T, axis=1),
                                                token_logprobs(logits[:, 0], token))
            return cache, draft_cache, taken, jnp.zeros((B,), jnp.int32), scores

        def checked(st, drafts, n_draft, draft_cache):
            """The current token and k drafts in one pass; the drafts the model agrees with are kept."""
            fed = jnp.concatenate([st.token[:, None], drafts], axis=1)
            logits, cache = self._forward(params, fed, jnp.repeat(st.active[:, None], T, axis=1).astype(jnp.int32),
                                          st.cache, cache_window=window, adapter=st.rows.adapter)
            n_acc, taken = speculative.verify(logits, drafts, n_draft, st.rows, st.n_new, st.seen)
            # slots of rejected drafts hold nothing: the next step writes from the first of them
            end = st.cache.index + n_acc + 1
            pos = jnp.arange(S)[None]
            stale = (pos >= end[:, None]) & (pos < st.cache.index[:, None] + T)

            def rewind(c):
                return c.replace(key_valid=c.key_valid & ~stale,
                                 n_tokens=st.cache.n_tokens + jnp.where(st.active, n_acc + 1, 0))

            scores = token_logprobs(logits, jnp.maximum(taken, 0)) if with_logprobs else None
            return rewind(cache), None if draft_cache is None else rewind(draft_cache), taken, n_acc, scores

        def drafted_by_model(st):
            """k greedy drafts of the draft model: it reads the current token and then its own drafts, k + 1
            tokens in all, so its cache holds every token the check may accept."""
            def one(carry, _):
                token, c = carry
                logits, c = self._draft_forward(dparams, token[:, None], st.active[:, None], c, (0, 1), window)
                nxt = greedy_tokens(logits[:, 0])
                return (nxt, c), nxt

            (_, draft_cache), outs = jax.lax.scan(one, (st.token, st.draft_cache), None, length=T)
            return outs[:self.spec_k].T, draft_cache

        def with_current_token(st):
            """Each row's token history with its current token at its slot."""
            return st.history.at[batch, jnp.where(st.active, st.cache.index, S)].set(st.token, mode="drop")

        def proposal(st):
            """(history with the current token at its slot, drafts [B, k], drafts to check [B], whether the
            step checks drafts): prompt lookup's drafts here; a draft model's are made in the step.
            Without speculation only the history."""
            index = st.cache.index
            history = with_current_token(st)
            if T == 1:
                return history, None, None, jnp.bool_(False)
            room = jnp.all(index + T <= (window or S))  # every row's k + 1 slots fit: none is clamped
            if st.draft_cache is not None:
                drafts, n_draft = jnp.zeros((B, self.spec_k), jnp.int32), jnp.full((B,), self.spec_k, jnp.int32)
            else:
                drafts, n_draft = speculative.ngram_drafts(history, index, self.spec_k)
            n_draft = jnp.where(st.active & st.rows.speculate, n_draft, 0)
            return history, drafts, n_draft, jnp.any(n_draft > 0) & room

        def body(carry, checks: bool):
            """One decode step: a checked one (`checks`: the token and the drafts in one pass) or a plain one.
            The carry holds the step's proposal, made once at the end of the step before (the loops'
            predicates read whether it checks); a plain step leaves its drafts out of the history."""
            i, st, out, lps, ptr, (history, drafts, n_draft, _) = carry
            index = st.cache.index
            if checks:
                draft_cache = None
                if st.draft_cache is not None:
                    drafts, draft_cache = drafted_by_model(st)
                cache, draft_cache, taken, n_acc, scores = checked(st, drafts, n_draft, draft_cache)
                counts = st.spec_counts + jnp.stack([jnp.sum(n_draft), jnp.sum(n_acc)])
            else:
                cache, draft_cache, taken, n_acc, scores = plain(st, st.draft_cache)
                counts = st.spec_counts
            if checks:  # the drafts sit past the current token until a step overwrites them
                history = history.at[batch[:, None], jnp.where(st.active[:, None], index[:, None] + 1 +
                                                               jnp.arange(self.spec_k)[None], S)].set(drafts,
                                                                                                      mode="drop")
            # inactive rows wrote nothing valid; keep their write position
            cache = cache.replace(index=jnp.where(st.active, index + n_acc + 1, index))
            if draft_cache is not None:
                draft_cache = draft_cache.replace(index=cache.index)
            m = jnp.arange(T)[None]
            offered = m <= n_acc[:, None]
            stop_at = jnp.any(taken[:, :, None] == st.stop_ids[:, None, :], axis=-1) & offered
            first_stop = jnp.where(jnp.any(stop_at, axis=1), jnp.argmax(stop_at, axis=1), T)
            left = st.max_new - st.n_new
            count = jnp.where(st.active, jnp.minimum(jnp.minimum(first_stop, left), n_acc + 1), 0)
            stopped = st.active & (first_stop < jnp.minimum(left, n_acc + 1))
            n_new = st.n_new + count
            done = stopped | (n_new >= st.max_new) | (cache.index >= cache.max_length)
            emitted = m < count[:, None]
            seen = st.seen | jnp.any(jax.nn.one_hot(jnp.where(emitted, taken, -1), self.config.vocab_size, dtype=bool),
                                     axis=1)
            at = ptr[:, None] + m
            out = out.at[batch[:, None], jnp.where(emitted, at, width)].set(taken, mode="drop")
            if lps is not None:  # one more than emitted: the score of a stop token that ended the row
                scored = jnp.where(st.active[:, None] & (m <= count[:, None]), at, width)
                lps = jax.tree_util.tree_map(lambda buf, x: buf.at[batch[:, None], scored].set(x, mode="drop"), lps,
                                             scores)
            last = jnp.take_along_axis(taken, n_acc[:, None], axis=1)[:, 0]
            st = st.replace(cache=cache, token=jnp.where(st.active, last, st.token), active=st.active & ~done,
                            n_new=n_new, seen=seen, history=history, spec_counts=counts, draft_cache=draft_cache)
            return i + 1, st, out, lps, ptr + count, proposal(st)

        init = (jnp.int32(0), state, out, lps, jnp.zeros((B,), jnp.int32), proposal(state))
        if T == 1:
            _, state, out, lps, *_ = jax.lax.while_loop(running, functools.partial(body, checks=False), init)
            return state, out, lps

        # Plain steps while no row has drafts, checked steps while some row has: two inner loops instead of
        # a lax.cond in one loop, whose branches XLA:CPU gave copies of the whole KV cache every step
        # (1.0 ms of a 2.2 ms checked step on the demo model's 1,024-slot cache). Each outer round takes
        # at least one step.
        def checks_now(carry):
            return carry[-1][3]

        def round_of_steps(carry):
            carry = jax.lax.while_loop(lambda c: running(c) & ~checks_now(c), functools.partial(body, checks=False),
                                       carry)
            return jax.lax.while_loop(lambda c: running(c) & checks_now(c), functools.partial(body, checks=True),
                                      carry)

        _, state, out, lps, *_ = jax.lax.while_loop(running, round_of_steps, init)
        return state, out, lps

    # -------------------------------------------------------------- adapters
    def set_adapter(self, slot: int, adapter: dict, spec: lora.LoraSpec) -> None:
        """Put a LoRA adapter (easympt.adapters.load_adapter's tree and spec) into slot `slot`: its
        alpha / r folded into B, its rank padded to the slots' rank, layers it does not target zero.
        One compiled update for every slot and adapter."""
        if self.lora is None:
            raise ValueError("this engine has no LoRA adapter slots (max_loras=0)")
        if not 0 <= slot < self.lora.slots:
            raise ValueError(f"adapter slot {slot} is not in 0..{self.lora.slots - 1}")
        if spec.rank > self.lora.rank:
            raise ValueError(f"adapter rank {spec.rank} exceeds max_lora_rank {self.lora.rank}")
        _, slots = lora.split(self.params)

        def one(path, buf):
            node = adapter
            for k in path[:-1]:
                node = node.get(str(getattr(k, "key", k)), {}) if isinstance(node, dict) else {}
            leaf = str(getattr(path[-1], "key", path[-1]))
            out = np.zeros(buf.shape[1:], np.float32)
            if isinstance(node, dict) and leaf in node:
                x = np.asarray(node[leaf], np.float32)
                if leaf == "lora_a":
                    out[:, :x.shape[1]] = x
                else:
                    out[:x.shape[0]] = x * spec.scale
            return out

        self.params = self._put_adapter(self.params, jnp.int32(slot),
                                        jax.tree_util.tree_map_with_path(one, slots))

    def clear_adapter(self, slot: int) -> None:
        """Zero slot `slot` (a row that still names it then runs the base model)."""
        self.set_adapter(slot, {}, lora.LoraSpec(rank=1, alpha=1.0))

    # -------------------------------------------------------------- host side
    def empty_state(self, batch_size: int, cache_len: int | None = None) -> DecodeState:
        S = cache_len or self.max_length
        cfg = SamplingConfig(temperature=0.0)
        return DecodeState(
            cache=KVCache.zeros(self.config, batch_size, S, self.kv_dtype),
            token=jnp.zeros((batch_size,), jnp.int32),
            active=jnp.zeros((batch_size,), bool),
            n_new=jnp.zeros((batch_size,), jnp.int32),
            max_new=jnp.zeros((batch_size,), jnp.int32),
            stop_ids=jnp.full((batch_size, self.stop_slots), NO_STOP, jnp.int32),
            seen=jnp.zeros((batch_size, self.config.vocab_size), bool),
            rows=SamplingRows.from_configs([cfg] * batch_size),
            history=jnp.full((batch_size, S), -1, jnp.int32),
            spec_counts=jnp.zeros((2,), jnp.int32),
            draft_cache=self._draft_zeros(batch_size, S))

    def prefill_plan(self, n: int, exact: bool = False) -> tuple[int, ...] | None:
        """The chunk lengths a prompt of n tokens is prefilled in, each a prompt bucket: one bucket when
        its padding is at most a quarter of the prompt and of the room left to answer (one pass, shared
        by the prompts of a burst); else a first bucket (holding the left padding) and whole chunks of
        the largest size that pads that little (a 1,100-token prompt: 128 + 1,024 slots, not 2,048,
        which would leave a 2,048 max_length no room to answer); else whichever pads least. `exact`: a plan without padding or
        None (the rest of a prompt after a cached prefix: ALiBi reads slot distances, so no padding
        may fall between the cached tokens and the new ones)."""
        def chunked(c):
            rest = n % c
            return ((bucket_for(rest, self.buckets),) if rest else ()) + (c,) * (n // c)

        plans = ([(bucket_for(n, self.buckets),)] if n <= self.prefill_chunk else [])
        plans += [chunked(c) for c in reversed(self.buckets)]  # every bucket is at most prefill_chunk
        if exact:
            return next((p for p in plans if sum(p) == n), None)
        allowed = min(n, self.max_length - n) // 4  # padding: at most a quarter of the prompt and of the room left
        return next((p for p in plans if sum(p) - n <= allowed), min(plans, key=sum))

    def padded_length(self, n: int) -> int:
        """Cache slots a prompt of n tokens takes (its prefill_plan's)."""
        return sum(self.prefill_plan(n))

    def pad_prompts(self, prompts: list[list[int]], bucket: int | None = None):
        """Left-pad token lists to one bucket: (tokens [n, P], mask [n, P])."""
        P = self.check_prompts(prompts, bucket)
        tokens = np.zeros((len(prompts), P), np.int32)
        mask = np.zeros((len(prompts), P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
        return jnp.asarray(tokens), jnp.asarray(mask)

    def check_prompts(self, prompts: list[list[int]], bucket: int | None = None) -> int:
        """The slots prompts padded together take (`bucket`, else their plan's), once their lengths are
        checked against max_length."""
        longest = max(len(p) for p in prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("a prompt must have at least one token")
        if longest >= self.max_length:
            raise ValueError(f"prompt of {longest} tokens leaves no room to generate within "
                             f"max_length {self.max_length}")
        P = bucket or self.padded_length(longest)
        if P > self.max_length:
            raise ValueError(f"prompt of {longest} tokens takes {P} cache slots once padded to its prefill "
                             f"shapes, more than max_length {self.max_length}")
        return P

    def stop_table(self, configs: list[SamplingConfig], eos_ids: tuple[int, ...]) -> jax.Array:
        table = np.full((len(configs), self.stop_slots), NO_STOP, np.int32)
        for i, c in enumerate(configs):
            ids = list(dict.fromkeys(tuple(eos_ids) + c.stop_token_ids))
            if len(ids) > self.stop_slots:
                raise ValueError(f"at most {self.stop_slots} stop token ids (with EOS), got {len(ids)}")
            table[i, :len(ids)] = ids
        return jnp.asarray(table)

    def prefill_batch(self, prompts: list[list[int]], configs: list[SamplingConfig], eos_ids=(),
                      cache_len: int | None = None) -> Prefix:
        """Prefill left-padded prompts; with log-probabilities when any config asks for them.
        Prompts whose prefill_plan has several chunks are prefilled chunk by chunk (see start_prefill)."""
        if len(self.prefill_plan(max(len(p) for p in prompts))) > 1:
            job = self.start_prefill(prompts, configs, eos_ids, cache_len)
            while not job.done:
                job.step()
            return job.prefix
        tokens, mask = self.pad_prompts(prompts)
        P = tokens.shape[1]
        max_new = jnp.asarray([c.max_new_tokens for c in configs], jnp.int32)
        return self.prefill(self.params, tokens, mask, SamplingRows.from_configs(configs), max_new,
                            self.stop_table(configs, eos_ids), cache_len=cache_len or P,
                            with_logprobs=any(c.wants_logprobs for c in configs))

    def start_prefill(self, prompts: list[list[int]], configs: list[SamplingConfig], eos_ids=(),
                      cache_len: int | None = None, cached: KVCache | None = None,
                      draft_cached: KVCache | None = None) -> ChunkedPrefill:
        """A prefill that runs one `prefill_chunk` of the prompts per `step()`, straight into a decode
        cache of `cache_len` (default max_length) slots, so a prompt of any length compiles the same
        few shapes and a server can run decode steps of other rows between its chunks.

        `cached`: a one-row cache of `cache_len` slots already holding the KV of the prompt's first
        `cached.index` tokens (a prefix cache hit, easympt.generation.prefix_cache); only the rest is
        prefilled. That rest must fill its chunk shapes exactly (see prefix_reuse), so no padding
        falls between the cached tokens and the new ones (ALiBi reads slot distances)."""
        return ChunkedPrefill(self, prompts, configs, eos_ids, cache_len or self.max_length, cached, draft_cached)

    def prefix_reuse(self, n_prompt: int, n_cached: int) -> int:
        """How many of a prompt's first `n_cached` cached tokens to reuse: all but enough to make the
        rest fill its prefill shapes (a bucket, then whole chunks) and leave at least one token to
        run; 0 when that leaves nothing."""
        rest = n_prompt - min(n_cached, n_prompt - 1)
        return max(0, n_prompt - self.padded_length(rest))

    def finish_reason(self, prompt_len: int, n_emitted: int, max_new_tokens: int) -> str:
        """Why a row that the device deactivated ended: 'length' (max_new_tokens or
        out of cache) or 'stop' (EOS / stop id)."""
        if n_emitted >= max_new_tokens:
            return "length"
        room = self.max_length - self.padded_length(prompt_len) + 1
        return "length" if n_emitted >= room else "stop"

    def decode_window(self, slots_needed: int, cache_len: int) -> int | None:
        """The cache window a decode dispatch may attend over when no row needs more than
        `slots_needed` slots: the smallest of `decode_windows`, or None for the whole cache."""
        return next((w for w in self.decode_windows(cache_len)[:-1] if slots_needed <= w), None)

    def decode_windows(self, cache_len: int) -> tuple[int | None, ...]:
        """The windows a decode dispatch can attend over in a cache of cache_len slots, smallest
        first, None (the whole cache) last: prompt buckets (few compiled shapes), then powers of two
        of the chunk; the decode shapes a server precompiles. A window is a copy of the cache's
        first slots, and the copy costs about what reading the rest would save at a quarter of
        the cache (measured on CPU, `benchmarks/profile_decode.py --windows`), so windows go up to
        an eighth. With the CPU kernels attention reads only the slots rows hold: no windows."""
        if self.module.cpu_kernels:
            return (None,)
        windows = {b for b in self.buckets if 8 * b <= cache_len}
        w = self.prefill_chunk
        while 8 * w <= cache_len:
            windows.add(w)
            w *= 2
        return (*sorted(windows), None)

    def decode_cache_len(self, prompt_bucket: int, max_new_tokens: int) -> int:
        """A power-of-two cache length with room for the whole request, capped at max_length."""
        need = prompt_bucket + max_new_tokens
        return min(self.max_length, 2 ** math.ceil(math.log2(max(need, 2))))



def _put_cache_rows(c: KVCache, new: KVCache, slots, kv_heads: int) -> KVCache:
    """Cache `c` with rows `slots` replaced by `new`'s rows (its slots 0..P-1, the rest emptied)."""
    P = new.max_length
    rows = cache_rows(slots, kv_heads)  # the slots' rows of the merged batch-and-heads dim
    key_valid = c.key_valid.at[slots].set(False, mode="drop")
    key_valid = key_valid.at[slots, :P].set(new.key_valid, mode="drop")
    return c.replace(
        keys=jax.tree_util.tree_map(lambda b, r: b.at[rows, :, :P].set(r.astype(b.dtype), mode="drop"), c.keys,
                                    new.keys),
        values=jax.tree_util.tree_map(lambda b, r: b.at[rows, :P].set(r.astype(b.dtype), mode="drop"), c.values,
                                      new.values),
        key_valid=key_valid,
        index=c.index.at[slots].set(new.index, mode="drop"),
        n_tokens=c.n_tokens.at[slots].set(new.n_tokens, mode="drop"))


def _put_adapter(params, slot, adapter):
    """params with slot `slot` of every adapter leaf replaced by `adapter`'s ([K, r] / [r, N] each)."""
    base, slots = lora.split(params)
    return lora.merge(base, jax.tree_util.tree_map(lambda buf, x: buf.at[slot].set(x.astype(buf.dtype)), slots,
                                                   adapter))


class ChunkedPrefill:
    """A long prompt's prefill, one chunk per `step()`; `prefix` is ready once `done`."""

    def __init__(self, engine: GenerationEngine, prompts, configs, eos_ids, cache_len: int,
                 cached: KVCache | None = None, draft_cached: KVCache | None = None):
        reused = 0
        if cached is not None:
            reused = int(cached.index[0])
            if len(prompts) != 1 or cached.max_length != cache_len or not 0 < reused < len(prompts[0]):
                raise ValueError("a cached prefix serves one prompt longer than it, in a cache of cache_len slots")
            engine.check_prompts(prompts)  # the whole prompt's length against max_length
            head, prompts = prompts[0][:reused], [prompts[0][reused:]]
        # after a cached prefix the rest is not padded (its exact plan below); else the prompts' plan
        self.tokens, self.mask = engine.pad_prompts(prompts, bucket=len(prompts[0]) if cached is not None else None)
        P = self.tokens.shape[1]
        plan = engine.prefill_plan(P, exact=True)
        if plan is None or (cached is not None and P != len(prompts[0])):
            raise ValueError(f"the {len(prompts[0])} tokens after a cached prefix must fill their prefill shapes "
                             f"(GenerationEngine.prefix_reuse); they take {P}")
        if reused + P > cache_len:
            raise ValueError(f"prompt of {reused + max(map(len, prompts))} tokens needs {reused + P} cache slots; "
                             f"the cache has {cache_len}")
        self.engine, self.configs = engine, configs
        ends = np.cumsum(plan).tolist()  # a first chunk holding the padding, then whole chunks
        self.bounds = list(zip([0] + ends[:-1], ends))
        self.following = _following(self.tokens)
        self.with_logprobs = any(c.wants_logprobs for c in configs)
        self.stop_ids = engine.stop_table(configs, eos_ids)
        self.adapter = jnp.asarray([c.adapter for c in configs], jnp.int32)
        n = len(prompts)
        # the token at each cache slot (speculative drafts read it), the cached prefix's included
        self.history = np.full((n, cache_len), -1, np.int32)
        self.history[:, reused:reused + P] = np.where(np.asarray(self.mask) > 0, np.asarray(self.tokens), -1)
        if cached is not None:
            self.history[0, :reused] = head
        self.cache = KVCache.zeros(engine.config, n, cache_len, engine.kv_dtype) if cached is None else cached
        self.draft_cache = engine._draft_zeros(n, cache_len) if cached is None else draft_cached
        if (self.draft_cache is None) != (engine.draft_module is None):
            raise ValueError("a cached prefix of an engine with a draft model needs the draft model's cache too")
        seen = np.zeros((n, engine.config.vocab_size), bool)
        if cached is not None:  # the cached tokens count as seen (repetition penalty)
            seen[0, np.asarray(head, np.int64)] = True
        self.seen = jnp.asarray(seen)
        self.next_chunk = 0
        self.scores: list[TokenLogprobs] = []
        self.prefix: Prefix | None = None

    @property
    def done(self) -> bool:
        return self.prefix is not None

    def step(self) -> None:
        eng = self.engine
        chunk = slice(*self.bounds[self.next_chunk])
        self.cache, self.draft_cache, self.seen, last, lp = eng.extend(
            eng.params, self.tokens[:, chunk], self.mask[:, chunk], self.cache, self.draft_cache, self.seen,
            self.following[:, chunk], with_logprobs=self.with_logprobs, adapter=self.adapter)
        if lp is not None:
            self.scores.append(lp)
        self.next_chunk += 1
        if self.next_chunk < len(self.bounds):
            return
        configs = self.configs
        max_new = jnp.asarray([c.max_new_tokens for c in configs], jnp.int32)
        prefix = eng.finish(last, self.cache, self.seen, SamplingRows.from_configs(configs), max_new, self.stop_ids,
                            with_logprobs=self.with_logprobs, history=jnp.asarray(self.history),
                            draft_cache=self.draft_cache)
        if self.with_logprobs:
            whole = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=1), *self.scores)
            prefix = prefix.replace(prompt_logprobs=_shift_scores(whole))
        self.prefix, self.cache, self.draft_cache, self.seen = prefix, None, None, None
