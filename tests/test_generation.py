"""KV-cached generation: cache equivalence, greedy parity with transformers,
per-request sampling without recompiles, stop handling."""

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import full_config, random_state_dict, write_checkpoint
from easympt import FlaxMptForCausalLM
from easympt.generation import Generator, SamplingConfig
from easympt.generation.sampling import greedy_tokens
from easympt.transform import mpt_from_pretrained

PROMPTS = ["def forward(self, x):", "import jax", "class KVCache:\n    keys: tuple  # per layer"]


@pytest.fixture(scope="module")
def gen(lm_checkpoint):
    g = Generator.from_pretrained(lm_checkpoint, max_length=192, max_compile_tokens=16, progress=False)
    g.eos_ids = ()  # a random model may say EOS anywhere; tests that need EOS set it themselves
    return g


@pytest.fixture(scope="module")
def xla_gen(lm_checkpoint):
    """XLA only (no CPU kernels): decode windows are XLA's attention path (accelerators, other CPUs)."""
    return Generator.from_pretrained(lm_checkpoint, max_length=192, max_compile_tokens=16, progress=False,
                                     cpu_kernels=False)


def _uncached_vs_cached(path, total, batch_prompt_lens, cache_len):
    params, config = mpt_from_pretrained(path, dtype="fp32", progress=False)
    model = FlaxMptForCausalLM(config, dtype="fp32", _do_init=False)
    rng = np.random.default_rng(0)
    B, P = len(batch_prompt_lens), max(batch_prompt_lens)
    ids = rng.integers(0, config.vocab_size, (B, total))
    mask = np.ones((B, total), np.int32)
    for b, n in enumerate(batch_prompt_lens):
        mask[b, :P - n] = 0  # left padding
    full = np.asarray(model(ids, mask, params=params).logits)
    cache = model.init_cache(B, cache_len)
    out = model(ids[:, :P], mask[:, :P], params=params, cache=cache)
    steps = [np.asarray(out.logits)[:, -1]]
    cache = out.cache
    for t in range(P, total - 1):
        out = model(ids[:, t:t + 1], mask[:, t:t + 1], params=params, cache=cache)
        cache = out.cache
        steps.append(np.asarray(out.logits)[:, 0])
    cached = np.stack(steps, 1)
    ref = full[:, P - 1:total - 1]
    np.testing.assert_allclose(cached, ref, atol=1e-4 * max(1, np.abs(ref).max()))
    assert (cached.argmax(-1) == ref.argmax(-1)).all()
    assert np.asarray(cache.index).tolist() == [total - 1] * B


def test_cached_decode_equals_uncached_forward(tmp_path):
    cfg = full_config(n_heads=6, d_model=48)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=1))
    _uncached_vs_cached(path, total=40, batch_prompt_lens=[9, 4, 7], cache_len=48)


@pytest.mark.parametrize("variant", [
    dict(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True}),
    dict(learned_pos_emb=True, attn_config={"alibi": False}),
])
def test_cached_decode_equals_uncached_variants(tmp_path, variant):
    cfg = full_config(**variant)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=2))
    _uncached_vs_cached(path, total=30, batch_prompt_lens=[6, 3], cache_len=32)


def test_cached_decode_across_max_seq_len(tmp_path):
    """ALiBi: decoding runs past max_seq_len (16 here) and stays equal to the full forward."""
    cfg = full_config(max_seq_len=16)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=3))
    _uncached_vs_cached(path, total=44, batch_prompt_lens=[5, 8], cache_len=64)


def _hf_greedy(path, tokenizer, prompts, n):
    import torch
    from transformers import MptForCausalLM

    model = MptForCausalLM.from_pretrained(path).eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=None)
    return out[:, enc.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "left-padded-batch3"])
def test_greedy_equals_transformers_generate(lm_checkpoint, tokenizer, prompts):
    g = Generator.from_pretrained(lm_checkpoint, max_length=128, max_compile_tokens=16, dtype="fp32", progress=False)
    g.eos_ids = ()  # compare 48 tokens even if the random model says EOS
    ours = g.generate(prompts, max_new_tokens=48, temperature=0)
    ref = _hf_greedy(lm_checkpoint, tokenizer, prompts, 48)
    for r, want in zip(ours, ref):
        assert r.token_ids == want
        assert len(r.token_ids) == 48 and r.finish_reason == "length"


def test_greedy_tokens_is_argmax():
    """The two-pass greedy choice equals jnp.argmax: ties go to the first, a NaN wins, -inf rows give 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 50368)).astype(np.float32)
    x[1, [7, 90, 4000]] = 50.0  # a tie
    x[2, [11, 3]] = np.nan
    x[3] = -np.inf
    x[4, 5] = np.inf
    x[5] = 0.0
    for logits in (jnp.asarray(x), jnp.asarray(x, jnp.bfloat16), jnp.asarray(x[:, :100]).reshape(2, 4, 100)):
        got = np.asarray(greedy_tokens(logits))
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, np.asarray(jnp.argmax(logits, axis=-1)))
    np.testing.assert_array_equal(np.asarray(greedy_tokens(jnp.asarray(x)))[1:6], [7, 3, 0, 5, 0])


def test_seed_controls_sampling_without_recompiles(gen):
    kw = dict(max_new_tokens=20, temperature=1.0)
    a = gen.generate(PROMPTS[0], seed=1, **kw)
    b = gen.generate(PROMPTS[0], seed=1, **kw)
    c = gen.generate(PROMPTS[0], seed=2, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    sizes = (gen.engine.prefill._cache_size(), gen.engine.generate._cache_size(), gen.engine.start._cache_size())
    for settings in [dict(temperature=0.7, top_p=0.9, seed=5), dict(temperature=1.3, top_k=5, seed=6),
                     dict(temperature=0.0), dict(temperature=0.9, min_p=0.1, repetition_penalty=1.3, seed=7)]:
        gen.generate(PROMPTS[0], max_new_tokens=20, **settings)
    assert (gen.engine.prefill._cache_size(), gen.engine.generate._cache_size(),
            gen.engine.start._cache_size()) == sizes


def test_top_k_one_is_greedy(gen):
    greedy = gen.generate(PROMPTS[1], max_new_tokens=12, temperature=0)
    top1 = gen.generate(PROMPTS[1], max_new_tokens=12, temperature=1.5, top_k=1, seed=3)
    assert greedy.token_ids == top1.token_ids


def test_rows_keep_their_own_settings(gen):
    """Per-row sampling: a greedy row in a sampled batch equals the greedy row alone."""
    alone = gen.generate(PROMPTS[2], max_new_tokens=16, temperature=0)
    ids = [gen.encode(p) for p in PROMPTS]
    cfgs = [SamplingConfig(temperature=1.0, seed=1, max_new_tokens=16), SamplingConfig(temperature=0.8, seed=9,
            max_new_tokens=5), SamplingConfig(temperature=0.0, max_new_tokens=16)]
    res = gen.generate_batch(ids, cfgs)
    assert res[2].token_ids == alone.token_ids
    assert len(res[1].token_ids) == 5 and res[1].finish_reason == "length"


def test_stop_strings_cut_exactly(gen):
    full = gen.generate(PROMPTS[0], max_new_tokens=40, temperature=0.8, seed=11)
    text = full.text
    assert len(text) > 12
    stop = text[8:11]
    cut = text[:text.find(stop)]
    res = gen.generate(PROMPTS[0], max_new_tokens=40, temperature=0.8, seed=11, stop=[stop])
    assert res.text == cut and res.finish_reason == "stop"
    streamed = list(gen.stream(PROMPTS[0], max_new_tokens=40, temperature=0.8, seed=11, stop=[stop]))
    assert "".join(c.text for c in streamed) == cut
    assert streamed[-1].finish_reason == "stop"


def test_stream_equals_generate(gen):
    res = gen.generate(PROMPTS[1], max_new_tokens=40, temperature=0.9, seed=4)
    chunks = list(gen.stream(PROMPTS[1], max_new_tokens=40, temperature=0.9, seed=4))
    assert "".join(c.text for c in chunks) == res.text
    assert sum((c.token_ids for c in chunks), []) == res.token_ids
    assert len(chunks) >= 3  # streamed in max_compile_tokens pieces, not all at the end
    assert chunks[-1].finish_reason == "length"


def test_stop_token_ids_and_eos_per_row(gen):
    rows = gen.generate(PROMPTS, max_new_tokens=30, temperature=0)
    target = rows[0].token_ids[5]
    first = rows[0].token_ids.index(target)
    res = gen.generate(PROMPTS[0], max_new_tokens=30, temperature=0, stop_token_ids=[target])
    assert res.token_ids == rows[0].token_ids[:first] and res.finish_reason == "stop"
    saved = gen.eos_ids
    try:
        gen.eos_ids = (target,)  # EOS ends only the rows that produce it
        res = gen.generate(PROMPTS, max_new_tokens=30, temperature=0)
    finally:
        gen.eos_ids = saved
    for r, base in zip(res, rows):
        if target in base.token_ids:
            assert r.token_ids == base.token_ids[:base.token_ids.index(target)] and r.finish_reason == "stop"
        else:
            assert r.token_ids == base.token_ids and r.finish_reason == "length"


def test_max_new_tokens_one(gen):
    res = gen.generate(PROMPTS, max_new_tokens=1, temperature=0)
    assert [len(r.token_ids) for r in res] == [1, 1, 1]
    assert all(r.finish_reason == "length" for r in res)


def test_length_is_bounded_by_max_length_not_max_seq_len(gen):
    # the checkpoint's max_seq_len is 96; the engine's max_length is 192
    res = gen.generate(PROMPTS[0], max_new_tokens=500, temperature=0.7, seed=1)
    n_prompt = len(gen.encode(PROMPTS[0]))
    assert len(res.token_ids) > 96 - n_prompt
    assert res.finish_reason == "length"


def test_bad_requests(gen):
    with pytest.raises(ValueError, match="temperature"):
        gen.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate("x", top_p=0)
    with pytest.raises(ValueError, match="max_length"):
        gen.generate(list(range(1, 300)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate([5, 10**6])


def test_engine_insert_into_running_batch(gen):
    """Continuous batching: a request inserted into a running decode batch
    produces exactly what it produces alone."""
    eng = gen.engine
    alone = gen.generate(PROMPTS[1], max_new_tokens=24, temperature=0).token_ids
    state = eng.empty_state(4)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    p0 = eng.prefill_batch([gen.encode(PROMPTS[0])], [cfg])
    state = eng.insert(p0, state, jnp.asarray([2]))
    state, out0 = eng.generate(eng.params, state, n_steps=16)
    p1 = eng.prefill_batch([gen.encode(PROMPTS[1])], [cfg])
    got = [int(p1.token[0])]
    state = eng.insert(p1, state, jnp.asarray([0]))
    while bool(np.asarray(state.active)[0]):
        state, out = eng.generate(eng.params, state, n_steps=16)
        got += [int(t) for t in np.asarray(out)[0] if t >= 0]
    assert got == alone


def test_windowed_decode_equals_the_whole_cache_and_copies_no_cache(xla_gen):
    """Decoding over a window of the cache gives the same tokens and cache as over all of it, and
    the compiled step copies no whole-cache buffer. (Read from the updated cache, XLA:CPU once
    copied every layer's whole cache twice per step to update it in place: a 2,048-slot window of
    an 8,192-slot cache decoded 3x slower than the whole cache.)"""
    import re

    gen = xla_gen
    eng = gen.engine
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    S = eng.max_length
    runs = {}
    for window in (None, 64):
        state = eng.insert(eng.prefill_batch([gen.encode(PROMPTS[0])], [cfg]), eng.empty_state(2, S),
                           jnp.asarray([1]))
        state, out = eng.generate(eng.params, state, n_steps=20, window=window)
        runs[window] = (np.asarray(out), state.cache)
    np.testing.assert_array_equal(runs[None][0], runs[64][0])
    K = eng.config.kv_heads  # the running row's buffer rows (row 0 is idle: what it writes is unused)
    for a, b in zip(runs[None][1].keys + runs[None][1].values, runs[64][1].keys + runs[64][1].values):
        np.testing.assert_allclose(np.asarray(a)[K:], np.asarray(b)[K:], atol=1e-6)

    hlo = eng.generate.lower(eng.params, eng.empty_state(2, S), n_steps=4, window=64).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line]
    whole = [line for line in copies if re.search(rf"f32\[\d+,(\d+,{S}|{S},\d+)\]", line.split("=")[1])]
    assert not whole, whole[:2]


@pytest.mark.parametrize("fixture", ["gen", "xla_gen"])
def test_prefill_attends_over_the_prompts_slots_alone_and_equals_a_cache_of_its_size(fixture, request):
    """A prompt prefilled into a cache with room for its reply attends over its own P slots (a window):
    the same prompt scores, first token and cache slots as a cache of exactly P slots."""
    gen = request.getfixturevalue(fixture)
    eng = gen.engine
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8, logprobs=2, prompt_logprobs=True)
    prompts = [gen.encode(PROMPTS[0]), gen.encode(PROMPTS[1])]
    P = eng.pad_prompts(prompts)[0].shape[1]
    exact, roomy = (eng.prefill_batch(prompts, [cfg] * 2, cache_len=n) for n in (P, 4 * P))
    np.testing.assert_array_equal(np.asarray(exact.token), np.asarray(roomy.token))
    np.testing.assert_allclose(np.asarray(roomy.prompt_logprobs.chosen), np.asarray(exact.prompt_logprobs.chosen),
                               atol=1e-5)
    for a, b in zip(exact.cache.keys, roomy.cache.keys):
        np.testing.assert_allclose(np.asarray(b)[:, :, :P], np.asarray(a), atol=1e-6)
    for a, b in zip(exact.cache.values, roomy.cache.values):
        np.testing.assert_allclose(np.asarray(b)[:, :P], np.asarray(a), atol=1e-6)


def test_prefill_plans_leave_room_to_answer_and_chunk_what_would_pad_too_much(gen):
    """A prompt's padding is at most a quarter of it and of the room left: one bucket when that holds,
    else a first bucket and whole chunks. Before, a 100-token prompt of a 192-slot engine was padded to
    192 slots and got one token; every plan is also exact when asked for its own padded length."""
    eng = gen.engine  # buckets 16, 32, 64, 128, 192
    assert eng.prefill_plan(10) == (16,) and eng.prefill_plan(60) == (64,)
    assert eng.prefill_plan(100) == (16, 32, 32, 32) and eng.padded_length(100) == 112
    assert eng.prefill_plan(100, exact=True) is None and eng.prefill_plan(112, exact=True) == (16, 32, 32, 32)
    for n in range(1, 191):
        plan = eng.prefill_plan(n)
        assert all(c in eng.buckets for c in plan) and sum(plan) >= n
        assert sum(eng.prefill_plan(sum(plan), exact=True)) == sum(plan)
    for n in range(2, 191):  # the rest after a cached prefix always has an exact plan (no padding)
        for cached in range(16, n, 16):
            rest = n - eng.prefix_reuse(n, cached)
            assert rest == n or sum(eng.prefill_plan(rest, exact=True)) == rest
    prompt = list(np.random.default_rng(0).integers(1, 200, 100))
    out = gen.generate_batch([prompt], [SamplingConfig(temperature=0.0, max_new_tokens=40)])[0]
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
