"""8- and 4-bit weights (easympt.kernels.quant): the formats' arithmetic, the CPU kernel on every
instruction set against numpy, the packed and plain layouts against each other, loading while
quantizing (one device, 8 simulated devices), the quantized checkpoint, export, and bad input.
Error bounds are measured, not loose: a quantized model is compared with the float model over the
weights it stands for (exact up to float rounding), and with the float original within a bound."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_logits_close, full_config, hf_logits, make_hf_checkpoint, random_state_dict, \
    write_checkpoint
from easympt import FlaxMptForCausalLM
from easympt.generation import GenerationEngine, SamplingConfig
from easympt.kernels import cpu, linear, quant
from easympt.sharding import MeshFitError, shardings_for
from easympt.transform import mpt_from_pretrained, mpt_to_pretrained
from easympt.transform.hf_to_flax import CheckpointError
from easympt.transform.quantized import dequantize_params, quantize_params, save_quantized
from test_cpu_kernels import ISA_PARAMS

HERE = os.path.dirname(__file__)
FORMATS = ("int8", "int4")


def test_int8_rounds_each_weight_to_half_a_step():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 40)), jnp.float32)
    a = quant.quantize(w, "int8")
    assert a["q"].dtype == jnp.int8 and a["q"].shape == (64, 40) and a["scale"].shape == (1, 40)
    step = np.asarray(a["scale"])
    assert np.all(np.abs(np.asarray(quant.dequantize(a["q"], a["scale"])) - np.asarray(w)) <= step / 2 + 1e-7)
    assert np.abs(np.asarray(a["q"])).max() == 127  # the column's largest weight is exact


def test_int4_is_q4_0_two_values_per_byte():
    """Q4_0's blocks: d = (largest-magnitude value) / -8, q = round(w / d) + 8 in [0, 15], rows 2i / 2i+1
    in the low / high nibble; each weight within half a step, but those of the other sign that round
    to +8 and are clipped to +7 (as in Q4_0: within one step)."""
    w = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    a = quant.quantize(jnp.asarray(w), "int4")
    assert a["q"].dtype == jnp.uint8 and a["q"].shape == (32, 8) and a["scale"].shape == (2, 8)
    g = w.reshape(2, 32, 8)
    biggest = np.take_along_axis(g, np.abs(g).argmax(1)[:, None], 1)[:, 0]
    np.testing.assert_allclose(np.asarray(a["scale"], np.float32), biggest / -8, rtol=2 ** -8)
    q = np.asarray(a["q"])
    values = np.stack([q & 15, q >> 4], 1).reshape(64, 8).astype(int) - 8
    np.testing.assert_array_equal(values, np.asarray(quant.int4_values(a["q"])))
    d = np.repeat(np.asarray(a["scale"], np.float32), 32, 0)
    err = np.abs(values * d - w)
    assert np.all(err <= np.abs(d) + 1e-6) and np.all(err[values < 7] <= np.abs(d[values < 7]) / 2 + 1e-6)
    assert values.min() >= -8 and values.max() <= 7


def test_int4_occupies_half_a_byte_per_value_on_device():
    a = quant.quantize(jnp.ones((256, 96)), "int4")
    assert a["q"].addressable_shards[0].data.on_device_size_in_bytes() == 256 * 96 // 2


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_kernel_matches_numpy_on_every_instruction_set(isa, fmt):
    rng = np.random.default_rng(2)
    for M, K, N in [(1, 64, 48), (2, 96, 100), (3, 32, 1), (8, 256, 200), (9, 128, 97), (40, 160, 300)]:
        x = rng.standard_normal((M, K)).astype(np.float32)
        a = quant.quantize(jnp.asarray(rng.standard_normal((K, N)), jnp.float32), fmt)
        want = x.astype(np.float64) @ np.asarray(quant.dequantize(a["q"], a["scale"]), np.float64)
        p = linear.pack_quantized(a)
        got = np.asarray(cpu.packed_matmul_quant(jnp.asarray(x), p["q"], p["scale"], N, isa=isa))
        assert np.abs(got - want).max() <= 2e-5 * np.sqrt(K) * max(1.0, np.abs(want).max()), (M, K, N)


def _dequantized_model_logits(model, params, ids):
    floats = dequantize_params(params)
    return FlaxMptForCausalLM(model.config, _do_init=False)(ids, params=floats).logits


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_model_equals_the_float_model_of_its_weights_in_both_layouts(fmt):
    """XLA's dequantize-in-the-product and the CPU kernel's packed panels give the float model's logits
    over the weights the quantized ones stand for; the packed tree unpacks to the plain one exactly."""
    model = FlaxMptForCausalLM(__import__("easympt").MptConfig.preset("tiny"), quantize=fmt, input_shape=(1, 8))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 12)))
    plain = model(ids).logits
    assert_logits_close(plain, _dequantized_model_logits(model, model.params, ids), rtol_scale=1e-5)
    if not cpu.available():
        pytest.skip("easympt's CPU kernels are not built here")
    packed = linear.pack_params(model.params)
    got = model.module.clone(cpu_kernels=True).apply({"params": packed}, ids)[0]
    assert_logits_close(got, plain, rtol_scale=1e-5)
    back = linear.unpack_params(packed, model.params_shape())
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(model.params)):
        assert a.dtype == b.dtype and bool((a == b).all())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("q") / "m", seed=4, d_model=128, n_heads=4, n_layers=2,
                              vocab_size=200, max_seq_len=64)


# measured on this checkpoint (random weights, std 0.15: logits up to ~22): max |logit error| / logit scale
ERROR_BOUND = {"int8": 0.06, "int4": 0.6}


@pytest.mark.parametrize("fmt", FORMATS)
def test_loading_quantizes_and_stays_near_transformers(checkpoint, fmt):
    ids = np.random.default_rng(1).integers(0, 200, (2, 16))
    ref = hf_logits(checkpoint, ids)
    params, config = mpt_from_pretrained(checkpoint, quantize=fmt, progress=False)
    matrices = [x for x in jax.tree_util.tree_leaves(params) if x.ndim == 2 and x.dtype in (jnp.int8, jnp.uint8)]
    assert len(matrices) == 2 * 4 + 1  # four matrices per block and the embedding
    model = FlaxMptForCausalLM(config, quantize=fmt, _do_init=False)
    got = np.asarray(model(ids, params=params).logits)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= ERROR_BOUND[fmt], err
    assert_logits_close(got, _dequantized_model_logits(model, params, ids), rtol_scale=1e-5)
    if fmt == "int8":
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_on_the_cpu_kernels_gives_xlas_greedy_tokens(checkpoint, fmt):
    params, config = mpt_from_pretrained(checkpoint, quantize=fmt, progress=False)
    model = FlaxMptForCausalLM(config, quantize=fmt, _do_init=False)
    prompts = [[5, 9, 13, 2, 7], [11, 3]]
    tokens = {}
    for kernels in ((False, True) if cpu.available() else (False,)):
        engine = GenerationEngine(model, params, max_length=48, max_compile_tokens=16, cpu_kernels=kernels)
        assert (engine.cpu_isa is not None) == kernels and f"{fmt} weights" in engine.describe()
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=12)
        prefix = engine.prefill_batch(prompts, [cfg] * 2, eos_ids=(), cache_len=32)
        first = np.asarray(prefix.token)[:, None]
        _, out = engine.generate(engine.params, engine.start(prefix), n_steps=11)
        tokens[kernels] = np.concatenate([first, np.asarray(out)], axis=1).tolist()
    assert len(set(map(str, tokens.values()))) == 1, tokens


def test_quantized_checkpoint_round_trip_and_bad_files(checkpoint, tmp_path):
    params, config = mpt_from_pretrained(checkpoint, quantize="int4", progress=False)
    out = save_quantized(params, config, str(tmp_path / "m.easympt"))
    again, config2 = mpt_from_pretrained(out, progress=False)
    assert config2 == config
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again)):
        assert a.dtype == b.dtype and bool((a == b).all())
    with pytest.raises(ValueError, match="holds int4 weights"):
        mpt_from_pretrained(out, quantize="int8", progress=False)
    # a scale missing from the file: the error names it
    from safetensors.numpy import load_file, save_file

    weights = os.path.join(out, "easympt_weights.safetensors")
    tensors = load_file(weights)
    del tensors["transformer/blocks_1/ffn/up_proj/scale"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="missing: transformer/blocks_1/ffn/up_proj/scale"):
        mpt_from_pretrained(out, progress=False)


def test_export_refuses_quantized_weights_or_dequantizes(checkpoint, tmp_path):
    params, config = mpt_from_pretrained(checkpoint, quantize="int8", progress=False)
    with pytest.raises(ValueError, match="dequantize=True"):
        mpt_to_pretrained(params, config, str(tmp_path / "hf"))
    out = mpt_to_pretrained(params, config, str(tmp_path / "hf"), dequantize=True)
    ids = np.random.default_rng(2).integers(0, 200, (1, 10))
    model = FlaxMptForCausalLM(config, quantize="int8", _do_init=False)
    assert_logits_close(hf_logits(out, ids), model(ids, params=params).logits, rtol_scale=1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_params_equals_quantizing_while_loading_in_slices(checkpoint, fmt, monkeypatch):
    """Loading quantizes each matrix in slices along the axis its scales do not span (a kernel's columns,
    an embedding's rows) to bound the transient memory: slices of 100 values give what quantizing
    whole float params gives."""
    from easympt.transform import quantized

    floats, config = mpt_from_pretrained(checkpoint, progress=False)
    monkeypatch.setattr(quantized, "CHUNK_FLOATS", 100)  # a few columns or rows per slice
    loaded, _ = mpt_from_pretrained(checkpoint, quantize=fmt, progress=False)
    monkeypatch.undo()
    for a, b in zip(jax.tree_util.tree_leaves(quantize_params(floats, config, fmt)),
                    jax.tree_util.tree_leaves(loaded)):
        assert a.dtype == b.dtype and bool((a == b).all())


def test_bad_formats_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="quantize='int3' is not one of int8, int4"):
        FlaxMptForCausalLM(__import__("easympt").MptConfig.preset("tiny"), quantize="int3")
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quant.quantize(jnp.ones((48, 16)), "int4")
    cfg = full_config(d_model=48, n_heads=4, vocab_size=128)  # 48 input rows: not whole groups of 32
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg))
    with pytest.raises(ValueError, match="48 input rows, not a multiple of 32"):
        mpt_from_pretrained(path, quantize="int4", progress=False)
    from easympt.serve import JaxServerConfig

    with pytest.raises(ValueError, match="quantize"):
        JaxServerConfig(quantize="nf4")


def test_partition_rules_shard_scales_with_their_kernels():
    """Every quantized parameter has a rule (scales too); an int4 scale whose group count does not
    divide the mesh axis is an error naming it, where a float tensor would only be replicated."""
    from jax.sharding import AbstractMesh

    config = __import__("easympt").MptConfig.preset("mpt-7b")
    shapes = FlaxMptForCausalLM(config, quantize="int4", _do_init=False).params_shape()
    mesh = AbstractMesh((1, 8, 2, 1), ("dp", "fsdp", "tp", "sp"))
    sh = shardings_for(mesh, shapes, config.get_partition_rules())
    wqkv = sh["transformer"]["blocks_0"]["attn"]["Wqkv"]
    assert wqkv["scale"].spec == wqkv["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tp")
    odd = AbstractMesh((1, 256, 1, 1), ("dp", "fsdp", "tp", "sp"))  # 4096 / 32 = 128 groups over 256
    with pytest.raises(MeshFitError, match="scale.*128 does not divide over mesh axis fsdp of size 256"):
        shardings_for(odd, shapes, config.get_partition_rules())


@pytest.mark.parametrize("fmt,shape", [("int8", "1,4,2,1"), ("int4", "2,2,2,1")])
def test_quantized_loading_on_8_simulated_devices(tmp_path, fmt, shape):
    cfg = full_config(n_heads=8, d_model=64, vocab_size=128)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=2))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(HERE, "multidevice", "quantized_load.py"), path, fmt, shape],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    _, fsdp, tp, _ = (int(s) for s in shape.split(","))
    rows = 64 if fmt == "int8" else 32  # Wqkv [64, 192]: int4 holds 32 byte rows
    assert report["kernel_shard"] == [rows // fsdp, 192 // tp]
    assert report["scale_shard"] == ([1, 192 // tp] if fmt == "int8" else [2 // fsdp, 192 // tp])
    assert report["max_abs_diff"] <= 1e-5 * max(1.0, report["logit_scale"])


def test_quantized_loading_across_two_processes(tmp_path):
    """Two JAX processes of 4 CPU devices (two hosts of a pod): each quantizes and holds only its
    slices of the int4 weights and scales; their gathered logits equal one process's quantized model."""
    from conftest import finish_processes, launch_processes, report_of

    cfg = full_config(n_heads=8, d_model=128, vocab_size=128)
    path = write_checkpoint(tmp_path / "m", cfg, random_state_dict(cfg, seed=2))
    outs = finish_processes(launch_processes([sys.executable, os.path.join(HERE, "multidevice", "quantized_load.py"),
                                              path, "int4", "1,2,4,1"]))
    reports = [report_of(o) for o in outs]
    assert [r["process"] for r in reports] == [0, 1] and all(r["processes"] == 2 for r in reports)
    # Wqkv [128, 384] in int4: 64 byte rows and 4 groups of scales, over fsdp 2 and tp 4
    assert all(r["kernel_shard"] == [32, 96] and r["scale_shard"] == [2, 96] for r in reports)
    params, config = mpt_from_pretrained(path, quantize="int4", progress=False)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 12))
    want = np.asarray(FlaxMptForCausalLM(config, quantize="int4", _do_init=False)(ids, params=params).logits)
    np.testing.assert_allclose(np.asarray(reports[0]["logits"]), want, atol=1e-5 * max(1.0, float(np.abs(want).max())))
