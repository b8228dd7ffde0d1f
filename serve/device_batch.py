"""The device side of the scheduler: the running decode batch and what changes it.

Every method is one operation on the devices whose results come back as host
(numpy) values. With more than one JAX process each process holds its own
`DeviceBatch`, and the leader sends every call to the followers before it runs
it (easympt.serve.lockstep): the same calls in the same order, so every
process joins the same compiled steps and collectives. Nothing here may depend
on anything but the arguments and earlier calls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from dataclasses import dataclass

from easympt.distributed import to_host
from easympt.generation.engine import ChunkedPrefill, GenerationEngine, Prefix
from easympt.generation.prefix_cache import BlockPool
from easympt.generation.sampling import SamplingConfig, TokenLogprobs


@dataclass
class Admitted:
    """Host view of prefilled rows just inserted: prefix row r went to slot slots[r]."""

    firsts: np.ndarray  # [n] first sampled token per prefix row
    active: np.ndarray  # [B] decode rows still running after the insert
    n_new: np.ndarray  # [B] tokens each decode row has emitted
    logprobs: TokenLogprobs | None  # [n, 1] the first token's scores, when a row asked
    prompt_logprobs: TokenLogprobs | None  # [n, P] the prompt's scores, when a row asked


@dataclass
class Dispatched:
    """Host view of one decode dispatch."""

    tokens: np.ndarray  # [B, n_steps], -1 where a row emitted nothing
    logprobs: TokenLogprobs | None  # [B, n_steps]
    active: np.ndarray  # [B] rows still running after it
    spec_counts: np.ndarray  # [2] speculative draft tokens checked and accepted, all dispatches so far


class DeviceBatch:
    def __init__(self, engine: GenerationEngine, batch_size: int, eos_ids: tuple[int, ...], prefix_blocks: int = 0):
        """prefix_blocks: blocks of the prefix cache's pool (easympt.generation.prefix_cache; 0: none)."""
        self.engine, self.batch_size, self.eos_ids = engine, batch_size, tuple(eos_ids)
        self.pool = BlockPool(engine, prefix_blocks, engine.max_compile_tokens) if prefix_blocks else None
        self.draft_pool = None  # the draft model's KV of the same blocks (speculative decoding)
        if prefix_blocks and engine.draft_config is not None:
            self.draft_pool = BlockPool(engine, prefix_blocks, engine.max_compile_tokens, engine.draft_config)
        self.state = None
        self.long: dict[int, ChunkedPrefill] = {}  # slot -> a long prompt being prefilled chunk by chunk
        self.in_flight: list = []  # decode dispatches not yet read, oldest first
        self.cache_len = engine.max_length

    def reset(self) -> None:
        """An empty decode batch (start, or after a failed step)."""
        self.state = self.engine.empty_state(self.batch_size)
        self.cache_len = self.state.cache.max_length
        self.long, self.in_flight = {}, []
        for pool in (self.pool, self.draft_pool):  # the scheduler forgets its index on every reset too
            if pool is not None:
                pool.clear()

    def ping(self) -> None:
        """Nothing: sent to the followers while idle, it shows whether they still answer."""

    def admit(self, slots: list[int], prompts: list[list[int]], configs: list[SamplingConfig]) -> Admitted:
        """Prefill prompts together and insert row r into slot slots[r] (a slot past the batch drops
        that row: filler rows of a batch padded to a compiled shape)."""
        return self._insert(slots, self.engine.prefill_batch(prompts, configs, self.eos_ids), configs)

    def start_long(self, slot: int, prompt: list[int], config: SamplingConfig) -> None:
        self.long[slot] = self.engine.start_prefill([prompt], [config], self.eos_ids, cache_len=self.cache_len)

    def start_cached(self, slot: int, prompt: list[int], config: SamplingConfig, blocks: list[int],
                     reused: int) -> None:
        """Start slot's prompt from its first `reused` tokens' KV in the prefix pool's `blocks`; the
        rest prefills chunk by chunk (`chunk`) as a long prompt does."""
        cached = self.pool.load(blocks, reused, self.cache_len)
        draft = None if self.draft_pool is None else self.draft_pool.load(blocks, reused, self.cache_len)
        self.long[slot] = self.engine.start_prefill([prompt], [config], self.eos_ids, cache_len=self.cache_len,
                                                    cached=cached, draft_cached=draft)

    def save_prefix(self, slot: int, start: int, blocks: list[tuple[int, int]]) -> None:
        """Copy decode row `slot`'s token blocks (its first token at cache slot `start`) into the prefix
        pool: blocks [(block position, pool id)] (PrefixIndex.insert)."""
        self.save_prefix_of(self.state, slot, start, blocks)

    def save_prefix_of(self, state, slot: int, start: int, blocks: list[tuple[int, int]]) -> None:
        self.pool.save(state.cache, slot, start, blocks)
        if self.draft_pool is not None:
            self.draft_pool.save(state.draft_cache, slot, start, blocks)

    def drop_long(self, slot: int) -> None:
        self.long.pop(slot, None)

    def chunk(self, slot: int) -> Admitted | None:
        """The next chunk of slot's long prompt; once it is the last, the row joins the batch."""
        job = self.long[slot]
        job.step()
        if not job.done:
            return None
        del self.long[slot]
        return self._insert([slot], job.prefix, job.configs)

    def _insert(self, slots, prefix: Prefix, configs) -> Admitted:
        lp = plp = None
        if any(c.wants_logprobs for c in configs):
            lp, plp = to_host((prefix.logprobs, prefix.prompt_logprobs))
            lp = jax.tree_util.tree_map(lambda x: x[:, None], lp)
        firsts = to_host(prefix.token)
        self.state = self.engine.insert(prefix, self.state, jnp.asarray(slots, jnp.int32))
        active, n_new = to_host((self.state.active, self.state.n_new))
        return Admitted(firsts, active, n_new, lp, plp)

    def decode(self, n_steps: int, window: int | None, with_logprobs: bool) -> None:
        """Dispatch n_steps decode steps of every active row; read the result later with `collect`,
        so the device runs while the host handles the previous dispatch."""
        eng = self.engine
        if with_logprobs:
            self.state, out, lps = eng.generate_logprobs(eng.params, self.state, n_steps=n_steps, window=window)
        else:
            (self.state, out), lps = eng.generate(eng.params, self.state, n_steps=n_steps, window=window), None
        # a copy: the next dispatch donates (and so deletes) the state's own buffers
        self.in_flight.append((out, lps, jnp.copy(self.state.active), jnp.copy(self.state.spec_counts)))

    def collect(self) -> Dispatched:
        """The oldest dispatch not yet read (waits for it only)."""
        return Dispatched(*to_host(self.in_flight.pop(0)))

    def deactivate(self, rows: list[int]) -> None:
        """Stop rows on the device whose requests ended on the host (stop string, disconnect)."""
        self.state = self.state.replace(active=self.state.active.at[jnp.asarray(rows, jnp.int32)].set(False))
