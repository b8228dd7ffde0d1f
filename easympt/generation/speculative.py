"""Prompt-lookup speculative decoding: drafts from a row's own history, checked in one pass.

A batch-1 decode step reads every weight once for one token; a pass over k + 1 tokens reads them once
too, so checking k proposed tokens costs about one step and each accepted one is a step saved. The
drafts are copied from the row's history (prompt and reply so far): the latest earlier occurrence of
its last n tokens (n from MAX_NGRAM down to MIN_NGRAM) and the k tokens that followed it, as
transformers' `prompt_lookup_num_tokens`, vLLM's `ngram` speculator and llama.cpp's lookup decoding
do. Editing, summarising and answering over a document copy long runs of the prompt.

Acceptance keeps the output distribution exact. A greedy row keeps the drafts equal to its argmax
and then takes the argmax, so its tokens are plain greedy decoding's. A sampled row keeps draft d
with probability p(d) (p: the row's distribution after repetition penalty, temperature, top-k/p,
min-p) and on a rejection samples from p without d, renormalised: rejection sampling against a
proposal that is certain of d, whose accepted-or-resampled token follows p exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from easympt.generation.sampling import SamplingRows, apply_repetition_penalty, filter_logits, greedy_tokens

MAX_NGRAM, MIN_NGRAM = 3, 1


def ngram_drafts(history, index, k: int):
    """history [B, S]: the token at each cache slot (-1: none), the current token already at slot
    index[b]. -> (drafts [B, k], n_draft [B]): the tokens after the latest earlier match of the row's
    last n tokens, the longest n first; n_draft 0 where nothing matches."""
    B, S = history.shape
    pos = jnp.arange(S)

    def one(h, i):
        best, found = jnp.int32(-1), jnp.bool_(False)
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            pattern = h[jnp.clip(i - n + 1 + jnp.arange(n), 0, S - 1)]  # the last n tokens
            ok = (pos < i) & (pos >= n - 1) & (i >= n - 1) & jnp.all(pattern >= 0)
            for m in range(n):  # h[j - m] == pattern[n - 1 - m] for a match ending at slot j
                ok &= jnp.roll(h, m) == pattern[n - 1 - m]
            j = jnp.max(jnp.where(ok, pos, -1))
            best = jnp.where(~found & (j >= 0), j, best)
            found |= j >= 0
        drafts = h[jnp.clip(best + 1 + jnp.arange(k), 0, S - 1)]
        return drafts, jnp.where(found, jnp.minimum(k, i - best), 0).astype(jnp.int32)

    return jax.vmap(one)(history, index)


def verify(logits, drafts, n_draft, rows: SamplingRows, step, seen):
    """logits [B, k + 1, V] after the current token and each draft; drafts [B, k]; n_draft [B] drafts
    to check; step [B] tokens each row has emitted (its sampling stream's position); seen [B, V].
    -> (n_accepted [B], tokens [B, k + 1]: the accepted drafts, then the token taken where the next
    draft was rejected or after the last one)."""
    B, T, V = logits.shape
    greedy_rows = rows.temperature == 0
    accepted, tokens = [], []
    for i in range(T):
        drafted = i < n_draft
        d = drafts[:, i] if i < T - 1 else jnp.zeros((B,), jnp.int32)
        lg = apply_repetition_penalty(logits[:, i].astype(jnp.float32), seen, rows.repetition_penalty)
        best = greedy_tokens(lg)

        def draw(_, lg=lg, d=d, drafted=drafted, i=i):
            masked, order = filter_logits(lg, rows)
            keys = jax.vmap(lambda key, s: jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key), s)))(
                rows.key, step + i)
            probs = jax.nn.softmax(masked, axis=-1)
            p_d = jnp.sum(jnp.where(order == d[:, None], probs, 0.0), axis=-1)
            keep = jax.vmap(jax.random.uniform)(keys[:, 0]) < p_d
            without = jnp.where(drafted[:, None] & (order == d[:, None]), -jnp.inf, masked)
            choice = jax.vmap(jax.random.categorical)(keys[:, 1], without)
            token = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
            return jnp.where(greedy_rows, best == d, keep), jnp.where(greedy_rows, best, token)

        keep, token = jax.lax.cond(jnp.all(greedy_rows), lambda _: (best == d, best), draw, None)
        accepted.append(keep & drafted)
        tokens.append(token)
        seen = seen | (jax.nn.one_hot(d, V, dtype=bool) & drafted[:, None])
    n_acc = jnp.sum(jnp.cumprod(jnp.stack(accepted[:-1], 1).astype(jnp.int32), axis=1), axis=1) if T > 1 else \
        jnp.zeros((B,), jnp.int32)
    taken = jnp.stack(tokens, 1)  # [B, T]: the token taken at each position had the drafts before it held
    slot = jnp.arange(T)[None]
    d_pad = jnp.concatenate([drafts, jnp.zeros((B, 1), jnp.int32)], axis=1)
    out = jnp.where(slot < n_acc[:, None], d_pad, jnp.where(slot == n_acc[:, None], taken, -1))
    return n_acc.astype(jnp.int32), out
