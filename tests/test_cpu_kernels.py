"""easympt's CPU kernels: every instruction set's library (AVX-512, AVX2, portable) against numpy and
XLA, the packed model against the plain one, the engine that packs its weights on CPU, and the run-time
choice of instruction set."""

import dataclasses
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.cache import Int8Slots, KVCache
from easympt.generation import GenerationEngine, SamplingConfig
from easympt.kernels import cpu, linear
from easympt.kernels.dense_attention import dense_attention
from easympt.kernels.mask import AttentionMask
from easympt.layers import alibi_slopes

needs_kernel = pytest.mark.skipif(not cpu.available(), reason="easympt's CPU kernels are not built here")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split()}
    except OSError:
        return set()


X86 = platform.machine().lower() in ("x86_64", "amd64")
# the instruction sets this CPU runs, by /proc/cpuinfo (independent of the kernels' own cpuid check)
CPU_ISAS = [isa for isa, flags in [("avx512", {"avx512f", "avx2", "fma"}), ("avx2", {"avx2", "fma"}),
                                   ("portable", set())]
            if flags <= _cpu_flags() and (X86 or isa == "portable")]


def _isa_param(isa):
    """Each instruction set a test runs on: skipped, with the reason, where this CPU lacks it."""
    missing = isa not in CPU_ISAS
    return pytest.param(isa, marks=pytest.mark.skipif(missing, reason=f"this CPU does not run {isa}"))


ISA_PARAMS = [_isa_param(isa) for isa in cpu.ISAS]


@pytest.mark.skipif(jax.default_backend() != "cpu" or not X86, reason="JAX not on an x86-64 CPU")
def test_every_instruction_set_this_cpu_runs_is_built():
    """The kernel tests skip only where an instruction set cannot run, never because a build failed:
    on any x86-64 machine the portable and AVX2 (where the CPU has it) libraries must exist."""
    assert set(cpu.built_isas()) == set(CPU_ISAS), (
        f"built {cpu.built_isas()}, this CPU runs {CPU_ISAS}: an extension easympt.kernels._cpu_* did not build "
        "(see pip's log)")
    assert cpu.active_isa() == CPU_ISAS[0]  # the best one runs by default


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 17])
@pytest.mark.parametrize("k,n", [(768, 2304), (64, 100), (16, 48), (40, 1), (130, 200)])
def test_packed_matmul_equals_numpy(isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(cpu.packed_matmul, static_argnums=(2, 3))(x, cpu.pack(w), n, isa))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_packed_matmul_reads_bfloat16_weights(isa):
    """bfloat16 panels (half the bytes) are widened exactly: the product equals float64's over the
    same rounded weights, for decode rows, a row group beyond one tile, and a prompt's tiles."""
    rng = np.random.default_rng(7)
    matmul = jax.jit(cpu.packed_matmul, static_argnums=(2, 3))
    for m, k, n in [(1, 768, 2304), (3, 130, 200), (8, 64, 100), (9, 40, 1), (40, 130, 200)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        packed = cpu.pack(w)
        assert packed.dtype == jnp.bfloat16
        got = np.asarray(matmul(x, packed, n, isa))
        want = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k), err_msg=f"{m}x{k}x{n}")


def test_pack_round_trip_and_rows():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((5, 100)), jnp.float32)
    packed = cpu.pack(w)
    assert packed.shape == (3, 5, 48)
    np.testing.assert_array_equal(cpu.unpack(packed, 100), w)
    np.testing.assert_array_equal(packed[2, :, 4:], 0)  # columns past N are zero
    ids = jnp.asarray([[0, 47, 48], [99, 3, 50]])
    np.testing.assert_array_equal(cpu.packed_rows(packed, ids), w.T[ids])


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
    packed = linear.pack_params(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (3, 9)), jnp.int32)

    def run(module, p):
        cache = model.init_cache(3, 16)
        prompt, cache = module.apply({"params": p}, ids[:, :8], None, cache)
        step, _ = module.apply({"params": p}, ids[:, 8:], None, cache)
        return np.asarray(prompt), np.asarray(step)

    for plain, fast in zip(run(model.module, params), run(packed_module, packed)):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)


@needs_kernel  # the packed module's own tree comes from tracing it, which names a kernel library
def test_pack_params_checks_the_tree():
    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=0)
    packed = linear.pack_params(model.params)
    assert packed["transformer"]["wte"]["embedding"].shape == (3, 64, 48)  # 101 rows of 64, as the head reads them
    assert packed["transformer"]["blocks_0"]["attn"]["Wqkv"]["kernel"].shape == (4, 64, 48)
    want = jax.eval_shape(model.module.clone(cpu_kernels=True).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    linear.check_packed(packed, want["params"])
    with pytest.raises(ValueError, match="Wqkv"):
        linear.check_packed(model.params, want["params"])
    back = linear.unpack_params(packed, model.params_shape())
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, model.params)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_pack_params_consuming_its_input_deletes_each_matrix_and_packs_the_same(quantize):
    """consume=True (what Generator.from_pretrained and the server do with params they loaded): every
    packed source matrix (and its scale) is deleted once packed, so mpt-7b never needs two copies;
    norms and biases stay; the packed tree equals a non-consuming pack's."""
    from easympt.transform.quantized import quantize_params

    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=0)
    params = model.params if quantize is None else quantize_params(model.params, model.config, quantize)
    params = jax.tree_util.tree_map(jnp.asarray, params)  # on device, as mpt_from_pretrained gives them
    copy = jax.tree_util.tree_map(jnp.copy, params)
    want = linear.pack_params(copy)
    got = linear.pack_params(params, consume=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        assert x.is_deleted() == (x.ndim == 2), name  # matrices and their scales go; norms and biases stay


PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [40, 41, 42, 43, 44, 45, 46]]


def _greedy(engine) -> tuple[np.ndarray, KVCache]:
    """24 greedy tokens for each of PROMPTS, and the cache they were decoded in."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=24)
    prefix = engine.prefill_batch(PROMPTS, [cfg] * 3, eos_ids=(), cache_len=64)
    first = np.asarray(prefix.token)[:, None]  # before `start`, which takes the prefix over
    state, out = engine.generate(engine.params, engine.start(prefix), n_steps=23)
    return np.concatenate([first, np.asarray(out)], axis=1), state.cache


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_engine_packs_on_cpu_and_generates_the_same_tokens(isa, monkeypatch):
    """EASYMPT_CPU_ISA forces an instruction set; on each, the engine's greedy tokens equal XLA's."""
    monkeypatch.setenv(cpu.ISA_ENV, isa)
    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=2)
    fast = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8)
    plain = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, cpu_kernels=False)
    assert fast.module.cpu_kernels and fast.cpu_isa == isa
    assert not plain.module.cpu_kernels and plain.cpu_isa is None
    np.testing.assert_array_equal(_greedy(fast)[0], _greedy(plain)[0])


@needs_kernel
def test_a_forced_instruction_set_that_cannot_run_is_a_clear_error(monkeypatch):
    model = FlaxMptForCausalLM(_config(), dtype=jnp.float32, seed=2)
    monkeypatch.setenv(cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="EASYMPT_CPU_ISA='sse9' is not one of avx512, avx2, portable"):
        GenerationEngine(model, model.params, max_length=64)
    missing = [isa for isa in cpu.ISAS if isa not in cpu.built_isas()]
    if missing:  # e.g. avx512 on an AVX2 machine: named, with what is available
        monkeypatch.setenv(cpu.ISA_ENV, missing[0])
        with pytest.raises(ValueError, match=f"{missing[0]} CPU kernels are not built here or this CPU lacks"):
            GenerationEngine(model, model.params, max_length=64)
    monkeypatch.setenv("EASYMPT_CPU_KERNELS", "0")  # off wins over a forced set
    assert GenerationEngine(model, model.params, max_length=64).cpu_isa is None


@pytest.mark.skipif(jax.default_backend() != "cpu" or "portable" not in cpu.built_isas(),
                    reason="the portable kernels are not built here")
def test_the_isa_is_chosen_at_run_time_in_a_fresh_process():
    """A fresh process picks the best set the CPU runs, or the one EASYMPT_CPU_ISA names."""
    code = "from easympt.kernels import cpu; print(cpu.active_isa())"

    def run(env):
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    env = {k: v for k, v in os.environ.items() if k != cpu.ISA_ENV}
    assert run(env) == cpu.built_isas()[0]
    assert run({**env, cpu.ISA_ENV: "portable"}) == "portable"


@needs_kernel
def test_bfloat16_weights_run_under_float32_compute_on_bfloat16_panels():
    """A bfloat16-weight model (param_dtype bf16, float32 compute) runs on bfloat16 panels (half the
    bytes) with the same greedy tokens as XLA's float32 compute over the same weights; its logits stay
    within bfloat16 rounding of the float32 model's."""
    config = _config()
    full = FlaxMptForCausalLM(config, dtype=jnp.float32, seed=2)
    half = FlaxMptForCausalLM(config, dtype=jnp.float32, param_dtype=jnp.bfloat16, _do_init=False)
    weights = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), full.params)
    fast = GenerationEngine(half, weights, max_length=64, max_compile_tokens=8)
    plain = GenerationEngine(half, weights, max_length=64, max_compile_tokens=8, cpu_kernels=False)
    assert fast.module.cpu_kernels and "bfloat16 weights" in fast.describe()
    packed = fast.params["transformer"]
    assert packed["blocks_0"]["attn"]["Wqkv"]["kernel"].dtype == jnp.bfloat16
    assert packed["wte"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_greedy(fast)[0], _greedy(plain)[0])
    # float32 weights given to a bfloat16-weight model are packed as bfloat16 (the model's weight dtype)
    assert GenerationEngine(half, full.params, max_length=64).params["transformer"]["wte"]["embedding"].dtype \
        == jnp.bfloat16

    ids = jnp.asarray([PROMPTS[2]])
    want = np.asarray(full.module.apply({"params": full.params}, ids)[0])
    got = np.asarray(fast.module.apply({"params": fast.params}, ids)[0])
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # measured: ~1% of the largest logit


def test_a_bfloat16_request_on_cpu_means_bfloat16_weights_under_float32_compute(lm_checkpoint):
    from easympt.dtypes import inference_dtypes
    from easympt.generation import Generator

    assert inference_dtypes("bf16") == (jnp.float32, jnp.bfloat16) and inference_dtypes(None) == (jnp.float32,) * 2
    gens = [Generator.from_pretrained(lm_checkpoint, dtype="bf16", max_length=64, max_compile_tokens=8,
                                      cpu_kernels=kernels) for kernels in (None, False)]
    for gen in gens:
        assert gen.engine.model.dtype == jnp.float32 and gen.engine.model.param_dtype == jnp.bfloat16
    assert gens[0].engine.cpu_isa == cpu.active_isa()
    a, b = (gen.generate("def f(x):", max_new_tokens=8, temperature=0.0).token_ids for gen in gens)
    assert a == b and len(a) == 8  # the kernels on bfloat16 panels and XLA over the same weights agree


def _step_logits(model, kv_dtype) -> np.ndarray:
    """One decode step's logits after PROMPTS[0], through a cache of `kv_dtype` (XLA's path)."""
    cache = KVCache.zeros(model.config, 1, 16, kv_dtype)
    _, cache = model.module.apply({"params": model.params}, jnp.asarray([PROMPTS[0]]), None, cache)
    logits, _ = model.module.apply({"params": model.params}, jnp.asarray([[3]]), None, cache)
    return np.asarray(logits)


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

    np.testing.assert_allclose(_step_logits(model, jnp.bfloat16), _step_logits(model, jnp.float32), atol=2e-2)
    with pytest.raises(ValueError, match="kv_dtype"):
        GenerationEngine(model, model.params, max_length=64, kv_dtype="int3")


@needs_kernel
def test_an_int8_cache_is_read_alike_by_the_kernel_and_xla_within_a_measured_bound():
    """kv_dtype="int8": Int8Slots (int8 keys and values, a float32 scale per slot and KV head); the
    attention kernel reads the int8 slots, XLA's path a dequantized copy of the same values, so their
    greedy tokens agree, chunked prefill included. Against the float32 cache one decode step's logits
    stay within 0.05 (measured 0.01 here: the rounding of 8 bits over a head's max)."""
    config = _config()
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, seed=2)
    fast = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, kv_dtype="int8")
    plain = GenerationEngine(model, model.params, max_length=64, max_compile_tokens=8, kv_dtype="int8",
                             cpu_kernels=False, prefill_chunk=8)
    assert fast.module.cpu_kernels and fast.kv_dtype == jnp.int8 and "int8 KV cache" in fast.describe()
    (fast_tokens, cache), (plain_tokens, _) = _greedy(fast), _greedy(plain)
    assert isinstance(cache.keys[0], Int8Slots) and cache.keys[0].q.dtype == jnp.int8
    assert cache.keys[0].scale.shape == (3 * config.kv_heads, 1, 64)  # a scale per slot and KV head
    np.testing.assert_array_equal(fast_tokens, plain_tokens)

    np.testing.assert_allclose(_step_logits(model, jnp.int8), _step_logits(model, jnp.float32), atol=5e-2)
    with pytest.raises(ValueError, match="kv_dtype 'int4' is not one of float32, bfloat16, float16, int8"):
        GenerationEngine(model, model.params, max_length=64, kv_dtype="int4")


def test_engine_refuses_cpu_kernels_where_they_cannot_run():
    model = FlaxMptForCausalLM(_config(), dtype=jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="float32"):
        GenerationEngine(model, model.params, max_length=64, cpu_kernels=True)
    assert not GenerationEngine(model, model.params, max_length=64).module.cpu_kernels  # auto: plain, no error


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("K,G,D,S", [(4, 1, 16, 37), (2, 3, 64, 64), (1, 8, 32, 130)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("alibi", [True, False])
@pytest.mark.parametrize("cache", ["float32", "bfloat16", "bfloat16-bits", "int8"])
def test_decode_attention_equals_the_dense_kernel(isa, K, G, D, S, alibi, cache):
    """Rows of different lengths, left padding, a row at the last slot, and slots past each row's
    position holding garbage the kernel must not read; a float32 or a bfloat16 cache (also stored
    as its uint16 bits, as easympt.cache keeps it on CPU), widened exactly, or an int8 cache with a
    scale per slot (easympt.cache.Int8Slots), read as XLA's path reads its dequantized copy."""
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
    unread = jnp.asarray(np.repeat(~valid, K, axis=0))  # [B*K, S]: past each row's slot, or masked
    if cache == "int8":
        kt, v = Int8Slots.quantize(kt, 1), Int8Slots.quantize(v, 2)
        want = dense_attention(q, kt.dequantize(), v.dequantize(), mask, slopes, 0.3)
        # NaN scales in unread slots: the kernel must read neither their int8 values nor their scales
        kt_bad = kt.replace(scale=jnp.where(unread[:, None, :], jnp.nan, kt.scale))
        v_bad = v.replace(scale=jnp.where(unread[:, :, None], jnp.nan, v.scale))
        stored = lambda x: x  # noqa: E731
    else:
        if cache != "float32":
            kt, v = kt.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
        # the reference reads the same (rounded) cache in float32
        want = dense_attention(q, kt.astype(jnp.float32), v.astype(jnp.float32), mask, slopes, 0.3)
        kt_bad = jnp.where(unread[:, None, :], jnp.nan, kt).astype(kt.dtype)
        v_bad = jnp.where(unread[:, :, None], jnp.nan, v).astype(v.dtype)
        stored = (lambda x: jax.lax.bitcast_convert_type(x, jnp.uint16)) if cache == "bfloat16-bits" else (lambda x: x)
    got = jax.jit(cpu.decode_attention, static_argnums=(5, 6))(q, stored(kt), stored(v), mask, slopes, 0.3, isa)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6)
    # NaN past each row's slot and in its masked slots changes nothing: the kernel never reads them
    bad = cpu.decode_attention(q, stored(kt_bad), stored(v_bad), mask, slopes, 0.3, isa)
    np.testing.assert_array_equal(np.asarray(bad), np.asarray(got))


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_decode_attention_of_a_row_with_no_valid_slot_is_zero(isa):
    q = jnp.ones((2, 1, 1, 1, 16))
    kt, v = jnp.ones((2, 16, 8)), jnp.full((2, 8, 16), jnp.nan)
    mask = AttentionMask(jnp.asarray([[3], [3]], jnp.int32), jnp.arange(8, dtype=jnp.int32),
                         jnp.asarray([[False] * 8, [True] * 8]))
    out = np.asarray(cpu.decode_attention(q, kt, v.at[1].set(1.0), mask, None, 1.0, isa))
    np.testing.assert_array_equal(out[0], 0)  # an empty decode row reads no value (these are NaN)
    np.testing.assert_allclose(out[1], 1.0)
