"""Automatic prefix caching: the index (chains, LRU, namespaces) and a server with the cache against
one without it: the same tokens, log-probabilities and echo scores."""

import numpy as np
import pytest

from easympt.generation import Generator
from easympt.generation.prefix_cache import PrefixIndex
from easympt.generation.sampling import SamplingConfig

from conftest import SERVER_CONFIG


def test_index_finds_whole_block_prefixes_only():
    ix = PrefixIndex(n_blocks=8, block_tokens=4)
    assert ix.insert(list(range(10))) == [(0, 0), (1, 1)]  # two whole blocks; the last two tokens are not one
    assert ix.lookup(list(range(10))) == [0, 1]
    assert ix.lookup(list(range(7)) + [99]) == [0]  # the second block differs
    assert ix.lookup([99] + list(range(1, 8))) == []  # a block is found only after the same whole prefix
    assert ix.lookup([0, 1, 2, 3, 4, 5, 6, 7], namespace=2) == []  # another adapter's KV
    assert ix.insert(list(range(12))) == [(2, 2)]  # only what is new


def test_lru_evicts_continuations_before_their_prefix_and_never_its_own_chain():
    ix = PrefixIndex(n_blocks=3, block_tokens=2)
    ix.insert([1, 1, 2, 2, 3, 3])  # a chain of three blocks: the pool is full
    assert ix.insert([1, 1, 9, 9]) == [(1, 2)]  # the leaf [3, 3] goes first, not the shared root
    assert ix.evictions == 1
    assert ix.lookup([1, 1, 2, 2, 3, 3]) == [0, 1] and ix.lookup([1, 1, 9, 9]) == [0, 2]
    assert ix.insert([5, 5, 6, 6, 7, 7, 8, 8]) != []  # longer than the pool: what fits, no self-eviction
    assert ix.used_blocks == 3
    ix.drop_namespace(-1)
    assert ix.used_blocks == 0 and ix.lookup([1, 1]) == []


def test_a_budget_below_one_block_is_a_clear_error(lm_checkpoint):
    from easympt.serve import MPTJaxServer

    with pytest.raises(ValueError, match="prefix_cache_bytes 100 cannot hold one block"):
        MPTJaxServer.from_pretrained(lm_checkpoint, config={**SERVER_CONFIG, "prefix_cache_bytes": 100,
                                                            "pre_compile": False}, progress=False)


def _run(server, ids, **sampling):
    handle = server.scheduler.submit(list(ids), SamplingConfig(**sampling))
    tokens, scores, prompt_scores = [], [], None
    for ev in handle.iter_events(timeout=120):
        assert ev.error is None, ev.error
        tokens += ev.token_ids
        scores += ev.logprobs or []
        prompt_scores = ev.prompt_logprobs or prompt_scores
    return tokens, scores, prompt_scores


def _close(a, b, tol):
    assert [s.token_id for s in a] == [s.token_id for s in b]
    np.testing.assert_allclose([s.logprob for s in a], [s.logprob for s in b], atol=tol)
    for x, y in zip(a, b):
        assert [i for i, _ in x.top] == [i for i, _ in y.top]
        np.testing.assert_allclose([v for _, v in x.top], [v for _, v in y.top], atol=tol)


@pytest.mark.parametrize("kv_dtype,chunk", [("float32", 32), ("bfloat16", 32), ("int8", 256)])
def test_a_server_with_the_cache_answers_as_one_without_it(lm_checkpoint, tokenizer, kv_dtype, chunk):
    """A chat: turn 2 resends turn 1's prompt and reply. With the cache it prefills only the rest,
    chunked or not; greedy tokens, seeded samples and log-probabilities equal those of a server without
    the cache (float rounding apart), and echo scores (which bypass the cache) too."""
    from easympt.serve import MPTJaxServer

    cfg = {**SERVER_CONFIG, "max_length": 512, "kv_dtype": kv_dtype, "prefill_chunk": chunk, "pre_compile": False}
    on = MPTJaxServer.from_pretrained(lm_checkpoint, config=cfg, progress=False)
    off = MPTJaxServer.from_pretrained(lm_checkpoint, config={**cfg, "prefix_cache_bytes": 0}, progress=False)
    try:
        assert on.scheduler.prefix is not None and off.scheduler.prefix is None
        turn1 = tokenizer("import os\nimport sys\n\ndef main(argv):\n    for name in argv:\n        print(name)\n"
                          "    return 0\n\nclass Thing:\n    def __init__(self, a, b):\n        self.a = a\n")["input_ids"]
        greedy = dict(temperature=0.0, max_new_tokens=24, logprobs=3)
        reply, lp_on, _ = _run(on, turn1, **greedy)
        assert _run(off, turn1, **greedy)[0] == reply
        turn2 = turn1 + reply + tokenizer("\nif __name__ == '__main__':\n    main(sys.argv)\n")["input_ids"]
        assert len(turn2) > 64
        tol = 1e-4 if kv_dtype == "float32" else 2e-2
        got, want = _run(on, turn2, **greedy), _run(off, turn2, **greedy)
        assert got[0] == want[0]
        _close(got[1], want[1], tol)
        assert on.scheduler.prefix.hits >= 1 and on.scheduler.prefix.reused_tokens >= 32
        seeded = dict(temperature=0.9, top_k=20, seed=11, max_new_tokens=16)
        assert _run(on, turn2, **seeded)[0] == _run(off, turn2, **seeded)[0]
        echo = dict(temperature=0.0, max_new_tokens=4, logprobs=2, prompt_logprobs=True)
        got, want = _run(on, turn2, **echo), _run(off, turn2, **echo)
        assert got[0] == want[0]
        _close(got[2][1:], want[2][1:], tol)
        text = on.metrics.render().decode()
        for name in ("hits", "misses", "reused_tokens", "evictions"):
            assert f"easympt_prefix_cache_{name}_total" in text
        assert "easympt_prefix_cache_hits_total 0.0" not in text
        stats = on.scheduler.prefix.stats()
        assert stats["used_blocks"] > 0 and stats["block_tokens"] == SERVER_CONFIG["max_compile_tokens"]
    finally:
        on.shutdown()
        off.shutdown()


def test_a_failed_start_answers_its_request_and_the_server_goes_on(lm_checkpoint, tokenizer, monkeypatch):
    """A cache hit whose start fails (here: forced) ends that request with an error event instead of
    leaving it waiting for ever; the next request is served. The rest after a cached prefix is
    prefilled unpadded (a 100-token rest of a 16-token-bucket server used to be padded to 128)."""
    from easympt.serve import MPTJaxServer

    srv = MPTJaxServer.from_pretrained(lm_checkpoint, config={**SERVER_CONFIG, "pre_compile": False},
                                       progress=False)
    try:
        ids = tokenizer("import os\nimport sys\n" * 12)["input_ids"][:130]
        greedy = dict(temperature=0.0, max_new_tokens=8)
        want = _run(srv, ids, **greedy)[0]
        real = srv.device_batch.start_cached

        def broken(*args):
            raise RuntimeError("forced")

        monkeypatch.setattr(srv.device_batch, "start_cached", broken)
        events = list(srv.scheduler.submit(list(ids), SamplingConfig(**greedy)).iter_events(timeout=60))
        assert events[-1].finish_reason == "error" and "forced" in events[-1].error
        monkeypatch.setattr(srv.device_batch, "start_cached", real)
        assert _run(srv, ids[:100] + ids[:30], **greedy)[0] is not None  # served after the failure
        assert _run(srv, ids, **greedy)[0] == want
    finally:
        srv.shutdown()


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_the_memory_plan_counts_the_pool_a_server_keeps(lm_checkpoint, kv_dtype):
    """`easympt plan --prefix-cache-bytes` sizes the pool by the server's rule: the same blocks and
    bytes as the pool an engine of the same shapes gets; a budget below one block is refused."""
    from easympt.generation.prefix_cache import BlockPool, pool_blocks
    from easympt.plan import memory_plan

    g = Generator.from_pretrained(lm_checkpoint, max_length=256, max_compile_tokens=16, progress=False,
                                  kv_dtype=kv_dtype)
    eng = g.engine
    block = BlockPool.block_bytes(eng.config, 16, eng.kv_dtype)
    for budget, batch in [(10 * block + 5, 4), (10**9, 2)]:  # bounded by the budget, then by the cap
        plan = memory_plan(eng.config, dtype="float32", max_length=256, batch_size=batch, kv_dtype=kv_dtype,
                           prefix_cache_bytes=budget, block_tokens=16)
        blocks = pool_blocks(eng, budget, batch)
        assert (plan.prefix_blocks, plan.prefix_cache_bytes) == (blocks, blocks * block)
        assert plan.device_bytes == plan.device_param_bytes + plan.device_kv_bytes + blocks * block
    assert memory_plan(eng.config, dtype="float32", max_length=256).prefix_cache_bytes == 0
    with pytest.raises(ValueError, match="cannot hold one block"):
        memory_plan(eng.config, dtype="float32", max_length=256, prefix_cache_bytes=block - 1, block_tokens=16)


def test_plan_command_shows_the_prefix_cache(capsys):
    import json

    from easympt.cli import main

    assert main(["plan", "mpt-7b", "--batch-size", "8", "--prefix-cache-bytes", "512MiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # bf16: 0.5 MiB of keys and values a token, 32 MiB a 64-token block; 16 blocks fill the budget
    assert plan["prefix_blocks"] == 16 and plan["prefix_cache_bytes"] == 512 * 2**20
    assert main(["plan", "mpt-7b", "--prefix-cache-bytes", "512MiB"]) == 0
    assert "prefix cache      0.54 GB: 16 blocks of 64 tokens" in capsys.readouterr().out
    assert main(["plan", "mpt-7b", "--prefix-cache-bytes", "1MiB"]) == 2
    assert "cannot hold one block" in capsys.readouterr().err
