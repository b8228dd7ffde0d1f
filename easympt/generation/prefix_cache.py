"""Automatic prefix caching: the KV of prompts (and replies) seen before, kept in blocks and reused.

A token's keys and values depend only on the tokens before it: MPT has no rotary positions (ALiBi
adds its bias at attention time from slot differences; learned position embeddings count the tokens
before), so the cache of a prompt's first h tokens serves every later prompt that starts with the
same h tokens: the next turn of a chat (its history), users sharing a system prompt.

`PrefixIndex` (host) maps chains of token blocks to blocks of a pool, as vLLM's automatic prefix
caching does: a block's key is its tokens and its parent's key, so a block is found only after the
same whole prefix. The least recently used block goes first when the pool is full; a lookup touches
a chain leaf first, so a prefix's blocks outlive their continuations. Entries keep their tokens and
are compared in full: no hash collision can serve a wrong prefix.

`BlockPool` (device) is a KVCache whose rows are blocks of `block_tokens` slots; `save` copies a
decode row's slots into blocks and `load` copies blocks into a fresh row cache. One compiled shape
each: the block lists are padded to the most blocks a row can hold.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from easympt.cache import KVCache

# keys' slot axis is 2 ([B*K, D, S]), values' 1 ([B*K, S, D]); Int8Slots scales share their buffer's axes
_KEY_AXIS, _VALUE_AXIS = 2, 1


@dataclass
class _Block:
    id: int  # row of the pool
    parent: int | None  # the key of the block before it in the prompt
    tokens: tuple[int, ...]
    namespace: int  # what else the KV depends on: the LoRA adapter slot (-1: the base model)


class PrefixIndex:
    """Which pool block holds the KV of which token block, least recently used first."""

    def __init__(self, n_blocks: int, block_tokens: int):
        if n_blocks < 1:
            raise ValueError("a prefix cache needs at least one block")
        self.n_blocks, self.block_tokens = int(n_blocks), int(block_tokens)
        self.clear()
        self.hits = self.misses = self.reused_tokens = self.evictions = 0

    def clear(self) -> None:
        """Forget every block (the pool's contents are lost: a reset engine)."""
        self.table: OrderedDict[int, _Block] = OrderedDict()  # key -> block, least recently used first
        self.free = list(range(self.n_blocks))[::-1]

    @property
    def used_blocks(self) -> int:
        return len(self.table)

    def stats(self) -> dict:
        return {"blocks": self.n_blocks, "block_tokens": self.block_tokens, "used_blocks": self.used_blocks,
                "hits": self.hits, "misses": self.misses, "reused_tokens": self.reused_tokens,
                "evictions": self.evictions}

    def _chain(self, tokens, namespace: int):
        """(key, parent key, block tokens) of each whole block of `tokens`."""
        parent, B = None, self.block_tokens
        for j in range(len(tokens) // B):
            block = tuple(int(t) for t in tokens[j * B:(j + 1) * B])
            key = hash((parent, namespace, block))
            yield key, parent, block
            parent = key

    def _match(self, tokens, namespace: int) -> list[int]:
        """Keys of the cached blocks `tokens` starts with."""
        keys = []
        for key, parent, block in self._chain(tokens, namespace):
            entry = self.table.get(key)
            if entry is None or entry.parent != parent or entry.tokens != block or entry.namespace != namespace:
                break
            keys.append(key)
        return keys

    def _touch(self, keys: list[int]) -> None:
        for key in reversed(keys):  # the leaf first: parents end up the more recently used
            self.table.move_to_end(key)

    def lookup(self, tokens, namespace: int = -1) -> list[int]:
        """Pool ids of the longest cached block prefix of `tokens` (marked as just used)."""
        keys = self._match(tokens, namespace)
        self._touch(keys)
        return [self.table[k].id for k in keys]

    def count(self, hit: bool, reused_tokens: int) -> None:
        self.hits += hit
        self.misses += not hit
        self.reused_tokens += reused_tokens

    def insert(self, tokens, namespace: int = -1) -> list[tuple[int, int]]:
        """Make room for the whole blocks of `tokens` not cached yet: [(block position, pool id)] to
        copy (BlockPool.save), evicting least recently used blocks, never one of this chain."""
        chain = list(self._chain(tokens, namespace))
        have = self._match(tokens, namespace)
        self._touch(have)
        mine, new = set(have), []
        for j, (key, parent, block) in enumerate(chain[len(have):], start=len(have)):
            if self.free:
                pool_id = self.free.pop()
            else:
                oldest = next(iter(self.table))
                if oldest in mine:  # the pool holds nothing older than this chain: keep what fits
                    break
                pool_id = self.table.pop(oldest).id
                self.evictions += 1
            stale = self.table.pop(key, None)  # a colliding key with other tokens: replaced
            if stale is not None:
                self.free.append(stale.id)
            self.table[key] = _Block(pool_id, parent, block, namespace)
            mine.add(key)
            new.append((j, pool_id))
        self._touch([k for k, _, _ in chain if k in mine])
        return new

    def drop_namespace(self, namespace: int) -> None:
        """Forget the blocks made under `namespace` (an adapter slot whose weights changed)."""
        for key in [k for k, b in self.table.items() if b.namespace == namespace]:
            self.free.append(self.table.pop(key).id)


def _blocks_into_pool(pool, row, pool_rows, first_row, starts, axis: int, block_tokens: int, K: int):
    """`pool` with the K buffer rows from `first_row` of a row cache buffer `row`, block_tokens slots from
    each of `starts`, written to `pool_rows` (block-major; rows past the pool are dropped)."""
    def one(start):
        begin = [0] * row.ndim
        begin[0], begin[axis] = first_row, start
        size = list(row.shape)
        size[0], size[axis] = K, block_tokens
        return jax.lax.dynamic_slice(row, begin, size)

    blocks = jax.vmap(one)(starts)  # [M, K, ...]
    return pool.at[pool_rows].set(blocks.reshape((-1,) + blocks.shape[2:]), mode="drop")


def _blocks_into_row(row, pool, pool_rows, axis: int, K: int):
    """A fresh row cache buffer `row` with pool block m (its K rows at pool_rows, block-major) in slots
    [m * block_tokens, (m + 1) * block_tokens)."""
    blocks = pool[pool_rows]  # [M*K, ...]
    blocks = blocks.reshape((blocks.shape[0] // K, K) + blocks.shape[1:])
    blocks = jnp.moveaxis(blocks, 0, axis)  # [K, ..., M, block, ...]
    shape = list(blocks.shape)
    merged = shape[:axis] + [shape[axis] * shape[axis + 1]] + shape[axis + 2:]
    return jax.lax.dynamic_update_slice(row, blocks.reshape(merged).astype(row.dtype), (0,) * row.ndim)


CONTEXTS_PER_SLOT = 4  # a pool never holds more than this many full contexts per decode slot


def pool_blocks(engine, budget_bytes: int, batch_size: int) -> int:
    """Blocks a pool of `budget_bytes` holds for `engine` (blocks of its smallest prompt bucket: the rest
    of a prompt is prefilled in bucket shapes anyway, so finer blocks would reuse nothing more)."""
    block = engine.max_compile_tokens
    one = sum(BlockPool.block_bytes(c, block, engine.kv_dtype) for c in (engine.config, engine.draft_config) if c)
    return blocks_for_budget(budget_bytes, one, block, batch_size, engine.max_length)


def blocks_for_budget(budget_bytes: int, block_bytes: int, block_tokens: int, batch_size: int,
                      max_length: int) -> int:
    """Whole blocks of `block_bytes` in `budget_bytes`, capped at CONTEXTS_PER_SLOT full contexts per
    decode slot; 0 for a budget of 0. From sizes alone: `easympt plan` counts the pool by this rule too."""
    if budget_bytes == 0:
        return 0
    if budget_bytes < block_bytes:
        raise ValueError(f"prefix_cache_bytes {budget_bytes} cannot hold one block of the prefix cache "
                         f"({block_tokens} tokens of every layer's keys and values: {block_bytes} bytes for this "
                         "model and KV dtype); raise it, or 0 turns the cache off")
    cap = CONTEXTS_PER_SLOT * batch_size * (max_length // block_tokens)
    return int(min(budget_bytes // block_bytes, max(1, cap)))


class BlockPool:
    """The device side: `n_blocks` blocks of `block_tokens` KV slots (a KVCache, one row per block) of
    the engine's model, or of its draft model with `config` the draft's (the two pools share ids)."""

    def __init__(self, engine, n_blocks: int, block_tokens: int, config=None):
        self.engine, self.n_blocks, self.block_tokens = engine, int(n_blocks), int(block_tokens)
        self.config = config or engine.config
        self.max_blocks = engine.max_length // self.block_tokens  # most blocks one row holds
        self.cache = None
        self.clear()
        self._save = jax.jit(self._save_fn, donate_argnums=(0,))
        self._load = jax.jit(self._load_fn, static_argnames=("cache_len",))

    def clear(self) -> None:
        """Empty blocks (what they held is forgotten by the index too)."""
        self.cache = None  # the old blocks' memory first
        self.cache = KVCache.zeros(self.config, self.n_blocks, self.block_tokens, self.engine.kv_dtype)

    @staticmethod
    def block_bytes(config, block_tokens: int, kv_dtype) -> int:
        """Bytes one block of every layer's keys and values takes."""
        shapes = jax.eval_shape(lambda: KVCache.zeros(config, 1, block_tokens, kv_dtype))
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves((shapes.keys,
                                                                                               shapes.values)))

    def _padded(self, ids, fill):
        if len(ids) > self.max_blocks:
            raise ValueError(f"{len(ids)} blocks exceed the {self.max_blocks} a row holds")
        return np.asarray(list(ids) + [fill] * (self.max_blocks - len(ids)), np.int32)

    def _rows(self, ids):
        K = self.config.kv_heads
        return (ids[:, None] * K + jnp.arange(K)[None]).reshape(-1)

    def _save_fn(self, pool: KVCache, cache: KVCache, slot, starts, ids) -> KVCache:
        K, B = self.config.kv_heads, self.block_tokens
        rows = self._rows(ids)  # ids past the pool: padding, dropped

        def copy(axis):
            return lambda dst, src: _blocks_into_pool(dst, src, rows, slot * K, starts, axis, B, K)

        return pool.replace(keys=jax.tree_util.tree_map(copy(_KEY_AXIS), pool.keys, cache.keys),
                            values=jax.tree_util.tree_map(copy(_VALUE_AXIS), pool.values, cache.values))

    def save(self, cache: KVCache, slot: int, start: int, blocks: list[tuple[int, int]]) -> None:
        """Copy blocks of decode row `slot` (whose first token sits at slot `start`) into the pool:
        `blocks` [(block position in the row's tokens, pool id)]."""
        if not blocks:
            return
        starts = self._padded([start + j * self.block_tokens for j, _ in blocks], 0)
        self.cache = self._save(self.cache, cache, np.int32(slot), starts, self._padded([i for _, i in blocks],
                                                                                      self.n_blocks))

    def _load_fn(self, pool: KVCache, ids, n_tokens, cache_len: int) -> KVCache:
        K = self.config.kv_heads
        row = KVCache.zeros(self.config, 1, cache_len, self.engine.kv_dtype)
        rows = self._rows(ids)

        def copy(axis):
            return lambda dst, src: _blocks_into_row(dst, src, rows, axis, K)

        return row.replace(keys=jax.tree_util.tree_map(copy(_KEY_AXIS), row.keys, pool.keys),
                           values=jax.tree_util.tree_map(copy(_VALUE_AXIS), row.values, pool.values),
                           key_valid=(jnp.arange(cache_len) < n_tokens)[None],
                           index=jnp.full((1,), n_tokens, jnp.int32), n_tokens=jnp.full((1,), n_tokens, jnp.int32))

    def load(self, ids: list[int], n_tokens: int, cache_len: int) -> KVCache:
        """A one-row cache of `cache_len` slots holding the first `n_tokens` tokens from blocks `ids`."""
        return self._load(self.cache, self._padded(ids, 0), np.int32(n_tokens), cache_len=cache_len)
