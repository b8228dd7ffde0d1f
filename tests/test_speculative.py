"""Prompt-lookup speculative decoding: drafts, exact acceptance (greedy and by rejection sampling),
and the engine and server with it equal to plain decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easympt.generation import Generator, SamplingConfig
from easympt.generation.sampling import SamplingRows
from easympt.generation.speculative import ngram_drafts, verify


def test_drafts_copy_what_followed_the_latest_match_of_the_last_tokens():
    h = jnp.asarray([[-1, 5, 6, 7, 8, 9, 5, 6, -1, -1, -1, -1],  # ... 5 6 | 7 8 9 followed "5 6" before
                     [-1, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1]])  # nothing repeats
    drafts, n = ngram_drafts(h, jnp.asarray([7, 7]), 3)
    assert n.tolist() == [3, 0] and drafts[0].tolist() == [7, 8, 9]
    h2 = jnp.asarray([[4, 4, 4, -1, -1, -1]])  # a run: the match ending just before the last token
    drafts, n = ngram_drafts(h2, jnp.asarray([2]), 4)
    assert n.tolist() == [1] and drafts[0, 0] == 4  # only the tokens known so far


def _rows(n, **kw):
    return SamplingRows.from_configs([SamplingConfig(seed=s, **kw) for s in range(n)])


def test_greedy_acceptance_keeps_the_drafts_equal_to_the_argmax_then_takes_the_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 10)), jnp.float32)
    best = jnp.argmax(logits, -1)[0]
    drafts = jnp.asarray([[best[0], best[1], (best[2] + 1) % 10]])
    n_acc, out = verify(logits, drafts, jnp.asarray([3]), _rows(1, temperature=0.0), jnp.zeros(1, jnp.int32),
                        jnp.zeros((1, 10), bool))
    assert n_acc.tolist() == [2] and out[0].tolist() == [int(best[0]), int(best[1]), int(best[2]), -1]


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=4)])
def test_rejection_sampling_keeps_the_distribution_exact(sampling):
    """20,000 rows with their own seeds, one draft each: the first token taken (the draft if kept, else a
    sample without it) follows the row's distribution; so does the token after a kept draft."""
    n, V = 20000, 6
    base = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0], [0.0, 1.5, -1.0, 0.5, 1.0, -2.0]], jnp.float32)
    logits = jnp.broadcast_to(base[None], (n, 2, V))
    rows = _rows(n, **sampling)
    n_acc, out = verify(logits, jnp.full((n, 1), 1, jnp.int32), jnp.ones(n, jnp.int32), rows,
                        jnp.zeros(n, jnp.int32), jnp.zeros((n, V), bool))

    def expected(lg):
        lg = lg / sampling["temperature"]
        if sampling.get("top_k"):
            lg = jnp.where(lg >= jnp.sort(lg)[-sampling["top_k"]], lg, -jnp.inf)
        return np.asarray(jax.nn.softmax(lg))

    first = np.bincount(np.asarray(out[:, 0]), minlength=V) / n
    np.testing.assert_allclose(first, expected(base[0]), atol=0.015)
    kept = np.asarray(n_acc) == 1
    second = np.bincount(np.asarray(out[kept, 1]), minlength=V) / kept.sum()
    np.testing.assert_allclose(second, expected(base[1]), atol=0.03)


@pytest.fixture(scope="module")
def generators(lm_checkpoint):
    out = {}
    for k in (0, 4):
        g = Generator.from_pretrained(lm_checkpoint, max_length=192, max_compile_tokens=16, progress=False,
                                      num_speculative_tokens=k)
        g.eos_ids = ()
        out[k] = g
    return out


def _repetitive(seed=0):
    rng = np.random.default_rng(seed)
    base = list(rng.integers(1, 200, 24))
    return [base * 3, list(rng.integers(1, 200, 40)), base + base[:8]]


def test_greedy_output_equals_plain_decoding_and_drafts_are_taken(generators):
    prompts = _repetitive()
    configs = [SamplingConfig(temperature=0.0, max_new_tokens=48)] * 3
    plain, spec = (generators[k].generate_batch(prompts, configs) for k in (0, 4))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    eng = generators[4].engine
    state = eng.start(eng.prefill_batch(prompts, configs, (), cache_len=192))
    state, _ = eng.generate(eng.params, state, n_steps=8)
    drafted, accepted = np.asarray(state.spec_counts).tolist()
    assert drafted > 0 and accepted > 0
    assert int(np.asarray(state.n_new).max()) > 9  # more tokens than steps


def test_sampling_with_drafts_matches_plain_sampling_statistically(generators):
    """256 seeds of one repetitive prompt, temperature 1 over the 3 likeliest tokens: the histogram of
    the first decoded token with speculation matches plain sampling's (total variation < 0.12)."""
    prompt = _repetitive()[0]
    hist = {}
    for k in (0, 4):
        out = []
        for b in range(4):  # batches of 64: one compiled shape
            configs = [SamplingConfig(temperature=1.0, top_k=3, seed=64 * b + s, max_new_tokens=2) for s in range(64)]
            out += generators[k].generate_batch([prompt] * 64, configs)
        second = np.asarray([r.token_ids[1] for r in out])
        hist[k] = np.bincount(second, minlength=256) / len(second)
    assert 0.5 * np.abs(hist[0] - hist[4]).sum() < 0.12


def test_a_server_speculates_per_request_and_counts_acceptance(lm_checkpoint):
    import httpx

    from conftest import SERVER_CONFIG
    from easympt.serve import MPTJaxServer

    config = {**SERVER_CONFIG, "num_speculative_tokens": 4, "pre_compile": False}  # compiles what it runs
    srv = MPTJaxServer.from_pretrained(lm_checkpoint, config=config, progress=False)
    srv.fire()
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            text = "def add(a, b):\n    return a + b\n\n" * 4
            body = {"prompt": text, "max_tokens": 40, "temperature": 0}
            spec = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
            plain = c.post("/v1/completions", json={**body, "speculative": False}).json()["choices"][0]["text"]
            assert spec == plain
            assert c.get("/status").json()["num_speculative_tokens"] == 4
            metrics = c.get("/metrics").text
            assert "easympt_speculative_draft_tokens_total" in metrics
            assert "easympt_speculative_accepted_tokens_total 0.0" not in metrics
    finally:
        srv.shutdown()


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, tokenizer):
    """A smaller random MPT with the test tokenizer's vocabulary: a draft model that often disagrees."""
    from conftest import make_hf_checkpoint

    path = tmp_path_factory.mktemp("draft") / "mpt"
    make_hf_checkpoint(path, seed=9, vocab_size=len(tokenizer), max_seq_len=96, n_heads=2, d_model=32,
                       n_layers=1, eos_token_id=tokenizer.eos_token_id)
    return str(path)


@pytest.mark.parametrize("itself,cpu_kernels", [(True, False), (False, True)])
def test_a_draft_model_changes_no_greedy_token(lm_checkpoint, draft_checkpoint, generators, itself, cpu_kernels):
    """Drafts from the model itself are all accepted (XLA's path); from another model some are (the
    CPU kernels): either way the greedy tokens are plain decoding's."""
    prompts = _repetitive(1)
    configs = [SamplingConfig(temperature=0.0, max_new_tokens=40)] * 3
    plain = [r.token_ids for r in generators[0].generate_batch(prompts, configs)]
    for draft in [lm_checkpoint if itself else draft_checkpoint]:
        g = Generator.from_pretrained(lm_checkpoint, max_length=192, max_compile_tokens=16, progress=False,
                                      draft_model=draft, cpu_kernels=cpu_kernels)
        g.eos_ids = ()
        assert g.engine.spec_k == 4
        assert [r.token_ids for r in g.generate_batch(prompts, configs)] == plain
        eng = g.engine
        state = eng.start(eng.prefill_batch(prompts, configs, (), cache_len=192))
        state, _ = eng.generate(eng.params, state, n_steps=4)
        drafted, accepted = np.asarray(state.spec_counts).tolist()
        assert drafted == 4 * 4 * 3 and (accepted == drafted if draft == lm_checkpoint else 0 < accepted < drafted)


def test_a_draft_model_of_another_vocabulary_is_refused(lm_checkpoint, tmp_path):
    from conftest import make_hf_checkpoint

    other = make_hf_checkpoint(tmp_path / "other", vocab_size=77, max_seq_len=96, n_heads=2, d_model=32, n_layers=1)
    with pytest.raises(ValueError, match=r"draft model's vocabulary \(77 tokens\) differs"):
        Generator.from_pretrained(lm_checkpoint, max_length=192, progress=False, draft_model=str(other))


def test_a_server_with_a_draft_model_and_the_prefix_cache(lm_checkpoint, draft_checkpoint):
    """`draft_model` in the config: the draft model's KV rides along in the prefix cache, so a chat's
    second turn (a cache hit) still drafts; text equals the same server's without drafts."""
    import httpx

    from conftest import SERVER_CONFIG
    from easympt.serve import MPTJaxServer

    # precompiled (the draft model's programs and its prefix pool's too), on a shorter cache than the
    # other servers': fewer prompt buckets to compile
    config = {**SERVER_CONFIG, "draft_model": draft_checkpoint, "max_length": 128, "max_new_tokens": 32}
    srv = MPTJaxServer.from_pretrained(lm_checkpoint, config=config, progress=False)
    srv.fire()
    try:
        assert srv.device_batch.draft_pool is not None
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            turn = {"prompt": "def add(a, b):\n    return a + b\n\n" * 3, "max_tokens": 24, "temperature": 0}
            first = c.post("/v1/completions", json=turn).json()["choices"][0]["text"]
            again = {**turn, "prompt": turn["prompt"] + first + "\nprint(add(1, 2))\n"}
            spec = c.post("/v1/completions", json=again).json()["choices"][0]["text"]
            assert srv.scheduler.prefix.hits >= 1
            plain = c.post("/v1/completions", json={**again, "speculative": False}).json()["choices"][0]["text"]
            assert spec == plain
            status = c.get("/status").json()
            assert status["draft_model"] == draft_checkpoint and status["num_speculative_tokens"] == 4
    finally:
        srv.shutdown()
