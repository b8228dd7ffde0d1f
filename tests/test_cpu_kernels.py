"""easympt's CPU kernel: the packed-panel product against numpy, the packed model against the plain
one, and the engine that packs its weights on CPU."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easympt import FlaxMptForCausalLM, MptConfig, cpu_kernels
from easympt.cache import KVCache
from easympt.generation import GenerationEngine, SamplingConfig

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="easympt's CPU kernel is not built for this CPU")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


def test_kernel_is_built_on_an_avx512_machine():
    """The kernel tests below skip only where the kernel cannot exist, never because a build failed."""
    if jax.default_backend() != "cpu" or "avx512f" not in _cpu_flags():
        pytest.skip("not an x86-64 CPU with AVX-512F")
    assert cpu_kernels.available(), "the optional extension easympt._cpu_kernels did not build (see pip's log)"


@needs_kernel
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(768, 2304), (64, 100), (16, 48), (40, 1)])
def test_packed_matmul_equals_numpy(m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.packed_matmul, static_argnums=2)(x, cpu_kernels.pack(w), n))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_pack_round_trip_and_rows():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((5, 100)), jnp.float32)
    packed = cpu_kernels.pack(w)
    assert packed.shape == (3, 5, 48)
    np.testing.assert_array_equal(cpu_kernels.unpack(packed, 100), w)
    np.testing.assert_array_equal(packed[2, :, 4:], 0)  # columns past N are zero
    ids = jnp.asarray([[0, 47, 48], [99, 3, 50]])
    np.testing.assert_array_equal(cpu_kernels.packed_rows(packed, ids), w.T[ids])


def _config(**overrides) -> MptConfig:
    base = dataclasses.replace(MptConfig.preset("mpt-125m"), d_model=64, n_heads=4, n_layers=2, vocab_size=101,
                               max_seq_len=64)
    return dataclasses.replace(base, **overrides)


@needs_kernel
@pytest.mark.parametrize("overrides", [{}, {"no_bias": False}, {"tie_word_embeddings": False}],
                         ids=["tied", "biases", "untied-head"])
def test_packed_model_equals_the_plain_one(overrides):
    """Prefill and cached decode logits of the packed module on packed weights equal the plain ones."""
    config = _config(**overrides)
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, seed=1)
    params = jax.tree_util.tree_map(lambda x: x + 0.01 * jnp.ones_like(x), model.params)  # biases non-zero
    packed_module = model.module.clone(cpu_kernels=True)
    packed = cpu_kernels.pack_params(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 9)), jnp.int32)

    def run(module, p):
        cache = model.init_cache(3, 16)
        prompt, cache = module.apply({"params": p}, ids[:, :8], None, cache)
        step, _ = module.apply({"params": p}, ids[:, 8:], None, cache)
        return np.asarray(prompt), np.asarray(step)

    for plain, fast in zip(run(model.module, params), run(packed_module, packed)):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


def test_pack_params_checks_the_tree():
    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=0)
    packed = cpu_kernels.pack_params(model.params)
    assert packed["transformer"]["wte"]["embedding"].shape == (3, 64, 48)  # 101 rows of 64, as the head reads them
    assert packed["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"].shape == (4, 64, 48)
    want = jax.eval_shape(model.module.clone(cpu_kernels=True).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    cpu_kernels.check_packed(packed, want["params"])
    with pytest.raises(ValueError, match="Wqkv"):
        cpu_kernels.check_packed(model.params, want["params"])
    back = cpu_kernels.unpack_params(packed, model.params_shape())
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, model.params)


PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [40, 41, 42, 43, 44, 45, 46]]


def _greedy(engine) -> tuple[np.ndarray, KVCache]:
    """24 greedy tokens for each of PROMPTS, and the cache they were decoded in."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    prefix = engine.prefill_batch(PROMPTS, [cfg] * 3, eos_ids=(), cache_len=64)
    first = np.asarray(prefix.token)[:, None]  # before `start`, which takes the prefix over
    state, out = engine.generate(engine.params, engine.start(prefix), n_steps=23)
    return np.concatenate([first, np.asarray(out)], axis=1), state.cache


@needs_kernel
def test_engine_packs_on_cpu_and_generates_the_same_tokens():
    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=2)
    fast = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8)
    plain = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, cpu_kernels=False)
    assert fast.module.cpu_kernels and not plain.module.cpu_kernels
    np.testing.assert_array_equal(_greedy(fast)[0], _greedy(plain)[0])


@needs_kernel
def test_a_bfloat16_cache_is_stored_as_bits_on_cpu_and_read_alike_by_the_kernel_and_xla():
    """kv_dtype="bfloat16" under float32 compute: the cache holds uint16 bits (updated in place, see
    easympt.cache.storage_dtype); the attention kernel and XLA's attention read the same values, so
    their greedy tokens agree; logits stay close to the float32 cache's."""
    config = _config()
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, seed=2)
    fast = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, kv_dtype="bfloat16")
    plain = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, kv_dtype="bf16",
                             cpu_kernels=False)
    assert fast.module.cpu_kernels and fast.kv_dtype == jnp.bfloat16
    (fast_tokens, cache), (plain_tokens, _) = _greedy(fast), _greedy(plain)
    assert cache.keys[0].dtype == jnp.uint16 and cache.values[0].dtype == jnp.uint16
    np.testing.assert_array_equal(fast_tokens, plain_tokens)

    def step_logits(kv_dtype):
        cache = KVCache.zeros(config, 1, 16, kv_dtype)
        _, cache = model.module.apply({"params": model.params}, jnp.asarray([PROMPTS[0]]), None, cache)
        logits, _ = model.module.apply({"params": model.params}, jnp.asarray([[3]]), None, cache)
        return np.asarray(logits)

    np.testing.assert_allclose(step_logits(jnp.bfloat16), step_logits(jnp.float32), atol=2e-2)
    with pytest.raises(ValueError, match="kv_dtype"):
        GenerationEngine(model, model.params, max_length=64, kv_dtype="int3")


def test_engine_refuses_cpu_kernels_where_they_cannot_run():
    model = FlaxMptForCausalLM(_config(), dtype=jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="float32"):
        GenerationEngine(model, model.params, max_length=64, cpu_kernels=True)
    assert not GenerationEngine(model, model.params, max_length=64).module.cpu_kernels  # auto: plain, no error


@needs_kernel
@pytest.mark.parametrize("K,G,D,S", [(4, 1, 16, 37), (2, 3, 64, 64), (1, 8, 32, 130)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("cache", ["float32", "bfloat16", "bfloat16-bits"])
def test_decode_attention_equals_the_dense_kernel(K, G, D, S, alibi, cache):
    """Rows of different lengths, left padding, a row at the last slot, and slots past each row's
    position holding garbage the kernel must not read; a float32 or a bfloat16 cache (also stored
    as its uint16 bits, as easympt.cache keeps it on CPU), widened exactly."""
    from easympt.attention import AttentionMask, dense_attention
    from easympt.layers import alibi_slopes

    rng = np.random.default_rng(K * 100 + S)
    B = 3
    q = jnp.asarray(rng.standard_normal((B, K, G, 1, D)), jnp.float32)
    kt = jnp.asarray(rng.standard_normal((B * K, D, S)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B * K, S, D)), jnp.float32)
    q_slot = np.array([5, S - 1, 20 % S])
    valid = np.arange(S)[None] <= q_slot[:, None]
    valid[0, :2] = False  # left padding
    valid[2, 7] = False
    mask = AttentionMask(jnp.asarray(q_slot[:, None], jnp.int32), jnp.arange(S, dtype=jnp.int32), jnp.asarray(valid))
    slopes = jnp.asarray(alibi_slopes(K * G)).reshape(K, G) if alibi else None
    if cache != "float32":
        kt, v = kt.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    # the reference reads the same (rounded) cache in float32
    want = dense_attention(q, kt.astype(jnp.float32), v.astype(jnp.float32), mask, slopes, 0.3)
    stored = (lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)) if cache == "bfloat16-bits" else (lambda x: x)
    got = jax.jit(cpu_kernels.decode_attention, static_argnums=5)(q, stored(kt), stored(v), mask, slopes, 0.3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # NaN past each row's slot and in its masked slots changes nothing: the kernel never reads them
    unread = np.repeat(~valid, K, axis=0)  # [B*K, S]
    kt_bad = jnp.where(jnp.asarray(unread)[:, None, :], jnp.nan, kt).astype(kt.dtype)
    v_bad = jnp.where(jnp.asarray(unread)[:, :, None], jnp.nan, v).astype(v.dtype)
    bad = cpu_kernels.decode_attention(q, stored(kt_bad), stored(v_bad), mask, slopes, 0.3)
    np.testing.assert_array_equal(np.asarray(bad), np.asarray(got))


@needs_kernel
def test_decode_attention_of_a_row_with_no_valid_slot_is_zero():
    from easympt.attention import AttentionMask

    q = jnp.ones((2, 1, 1, 1, 16))
    kt, v = jnp.ones((2, 16, 8)), jnp.full((2, 8, 16), jnp.nan)
    mask = AttentionMask(jnp.asarray([[3], [3]], jnp.int32), jnp.arange(8, dtype=jnp.int32),
                         jnp.asarray([[False] * 8, [True] * 8]))
    out = np.asarray(cpu_kernels.decode_attention(q, kt, v.at[1].set(1.0), mask, None, 1.0))
    np.testing.assert_array_equal(out[0], 0)  # an empty decode row reads no value (these are NaN)
    np.testing.assert_allclose(out[1], 1.0)
