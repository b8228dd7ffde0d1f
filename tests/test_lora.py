"""LoRA adapters: parity with PEFT on transformers' MptForCausalLM both ways, PEFT's files, merging,
training only the adapter (QLoRA on int8 / int4 bases), bad adapters refused by name."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_logits_close, make_hf_checkpoint
from easympt.adapters import LoraSpec, load_adapter, read_spec, save_adapter
from easympt.adapters import lora

ALL = ("Wqkv", "out_proj", "up_proj", "down_proj")


def peft_model(path, targets, r=4, alpha=8.0, seed=0, adapter=None):
    """transformers' MptForCausalLM under PEFT: a fresh adapter with random (non-zero) A and B, or `adapter` loaded."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import MptForCausalLM

    base = MptForCausalLM.from_pretrained(str(path)).eval()
    if adapter is not None:
        return PeftModel.from_pretrained(base, adapter).eval()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                            init_lora_weights=False, lora_dropout=0.0))
    return model.eval()


def torch_logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        m = None if mask is None else torch.tensor(np.asarray(mask))
        return model(input_ids=torch.tensor(np.asarray(ids)), attention_mask=m).logits.float().numpy()


def easympt_logits(ckpt, adapter_tree, spec, ids, mask=None, quantize=None):
    from easympt import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained

    params, config = mpt_from_pretrained(ckpt, dtype="fp32", progress=False, quantize=quantize)
    model = FlaxMptForCausalLM(config, dtype=jnp.float32, _do_init=False, quantize=quantize, lora=spec)
    return np.asarray(model(ids, mask, params=lora.merge(params, adapter_tree)).logits)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("lora") / "mpt", seed=5)


@pytest.mark.parametrize("targets", [("Wqkv",), ALL])
def test_peft_adapter_loads_with_peft_logits(ckpt, tokens, tmp_path, targets):
    """An adapter PEFT made (random, non-zero B) gives easympt PEFT's logits."""
    ids, mask = tokens
    model = peft_model(ckpt, targets)
    model.save_pretrained(str(tmp_path / "adapter"))
    ref = torch_logits(model, ids, mask)
    tree, spec = load_adapter(str(tmp_path / "adapter"), _config(ckpt))
    assert set(spec.targets) == set(targets) and spec.rank == 4 and spec.scale == 2.0
    got = easympt_logits(ckpt, tree, spec, ids, mask)
    assert_logits_close(got, ref, mask)


def _config(ckpt):
    from easympt import MptConfig

    return MptConfig.from_pretrained(ckpt)


TEXT = "\n\n".join(f"def f{i}(x):\n    return x * {i} + {i % 3}" for i in range(24))


def _train(tmp_path, ckpt, max_steps=12, stop_at=None, **tc):
    from easympt.training.run import run_training
    from easympt.training.trainer import TrainConfig

    (tmp_path / "data.txt").write_text(TEXT)
    cfg = TrainConfig(**{"output_dir": str(tmp_path / "run"), "seq_len": 48, "batch_size": 2, "learning_rate": 1e-2,
                         "warmup_steps": 1, "max_steps": max_steps, "save_every": 4, "lora_rank": 4,
                         "lora_targets": ALL, **tc})
    return run_training(ckpt, str(tmp_path / "data.txt"), cfg, progress=False)


def test_trained_adapter_loads_in_peft_with_the_same_logits(lm_checkpoint, tmp_path, tokenizer):
    """easympt trains the adapter alone (the base is untouched), writes PEFT's files, and PEFT's model with
    them gives easympt's logits; the run's loss falls."""
    out = _train(tmp_path, lm_checkpoint)
    adapter = out["adapter"]
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    ids = np.asarray([tokenizer.encode("def f3(x):\n    return x * 3")], np.int32)
    ref = torch_logits(peft_model(lm_checkpoint, ALL, adapter=adapter), ids)
    tree, spec = load_adapter(adapter, _config(lm_checkpoint))
    assert float(np.abs(tree["transformer"]["blocks_0"]["ffn"]["down_proj"]["lora_b"]).max()) > 0  # trained
    assert_logits_close(easympt_logits(lm_checkpoint, tree, spec, ids), ref)
    base = easympt_logits(lm_checkpoint, jax.tree_util.tree_map(jnp.zeros_like, tree), spec, ids)
    assert np.abs(base - ref).max() > 1e-2  # the adapter changed the model


def test_lora_resume_is_exact(lm_checkpoint, tmp_path):
    """A LoRA run killed after a save and started again ends with the adapter of an uninterrupted run."""
    import shutil

    from safetensors.numpy import load_file

    for run in ("a", "b"):
        (tmp_path / run).mkdir()
    _train(tmp_path / "a", lm_checkpoint, max_steps=8)
    _train(tmp_path / "b", lm_checkpoint, max_steps=8)  # saves at steps 4 and 8
    shutil.rmtree(tmp_path / "b" / "run" / "checkpoints" / "8")  # as if killed after step 4's save
    shutil.rmtree(tmp_path / "b" / "run" / "adapter")
    assert _train(tmp_path / "b", lm_checkpoint, max_steps=8)["resumed"]
    a = load_file(str(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_qlora_trains_adapters_on_a_quantized_base(lm_checkpoint, tmp_path, quantize):
    """QLoRA: the base frozen in 8 or 4 bits, the adapter in float32; the loss falls and the adapter's logits
    with the quantized base are the float base's within the format's error."""
    out = _train(tmp_path, lm_checkpoint, quantize=quantize, max_steps=12)
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    tree, spec = load_adapter(out["adapter"], _config(lm_checkpoint))
    ids = np.arange(1, 30, dtype=np.int32)[None]
    q = easympt_logits(lm_checkpoint, tree, spec, ids, quantize=quantize)
    f = easympt_logits(lm_checkpoint, tree, spec, ids)
    assert np.abs(q - f).max() < (0.05 if quantize == "int8" else 0.5) * np.abs(f).max()


def test_merged_adapter_equals_the_adapter(ckpt, tokens, tmp_path):
    """`merged_kernels` (and `easympt convert --merge-lora`) fold the adapter into the weights: the plain
    model then gives the adapted logits, as PEFT's merge_and_unload."""
    from easympt import FlaxMptForCausalLM
    from easympt.cli import main
    from easympt.transform import mpt_from_pretrained

    ids, mask = tokens
    model = peft_model(ckpt, ALL, seed=2)
    model.save_pretrained(str(tmp_path / "adapter"))
    ref = torch_logits(model, ids, mask)
    tree, spec = load_adapter(str(tmp_path / "adapter"), _config(ckpt))
    params, config = mpt_from_pretrained(ckpt, dtype="fp32", progress=False)
    merged = lora.merged_kernels(lora.merge(params, tree), spec)
    plain = FlaxMptForCausalLM(config, dtype=jnp.float32, _do_init=False)
    assert_logits_close(np.asarray(plain(ids, mask, params=merged).logits), ref, mask)
    assert main(["convert", ckpt, str(tmp_path / "merged"), "--merge-lora", str(tmp_path / "adapter")]) == 0
    from conftest import hf_logits

    assert_logits_close(hf_logits(tmp_path / "merged", ids, mask), ref, mask)


def test_adapter_round_trip(ckpt, tmp_path):
    tree, spec = load_adapter(_peft_dir(ckpt, tmp_path), _config(ckpt))
    save_adapter(tree, spec, str(tmp_path / "again"))
    again, spec2 = load_adapter(str(tmp_path / "again"), _config(ckpt))
    assert spec2 == spec
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, tree)


def _peft_dir(ckpt, tmp_path, targets=("Wqkv", "down_proj")):
    out = tmp_path / "peft_adapter"
    if not out.exists():
        peft_model(ckpt, targets).save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("field,value,match", [
    ("use_dora", True, "use_dora"), ("use_rslora", True, "use_rslora"),
    ("modules_to_save", ["lm_head"], "modules_to_save"), ("rank_pattern", {"Wqkv": 2}, "rank_pattern"),
    ("peft_type", "IA3", "only LORA"), ("target_modules", ".*Wqkv", "target_modules"),
    ("target_modules", ["Wqkv", "q_proj"], "q_proj"), ("r", 8, "needs"), ("bias", "all", "bias"),
])
def test_unsupported_peft_options_are_refused_by_name(ckpt, tmp_path, field, value, match):
    src = _peft_dir(ckpt, tmp_path)
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    cfg[field] = value
    bad = tmp_path / "bad"
    bad.mkdir()
    json.dump(cfg, open(bad / "adapter_config.json", "w"))
    os.link(os.path.join(src, "adapter_model.safetensors"), bad / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=match):
        load_adapter(str(bad), _config(ckpt))


def test_adapter_for_another_shape_is_refused(ckpt, tmp_path):
    other = make_hf_checkpoint(tmp_path / "wide", seed=1, d_model=32)
    with pytest.raises(ValueError, match="needs"):
        load_adapter(_peft_dir(other, tmp_path), _config(ckpt))
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        read_spec(str(tmp_path))


def test_lora_spec_checks():
    with pytest.raises(ValueError, match="q_proj"):
        LoraSpec(rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(rank=0, alpha=8)
    from easympt.training.trainer import TrainConfig

    with pytest.raises(ValueError, match="lora-rank"):
        TrainConfig(output_dir="x", quantize="int4").lora_spec()


def _peft_greedy(ckpt, adapter, prompt, n):
    import torch

    model = peft_model(ckpt, None, adapter=adapter) if adapter else None
    if model is None:
        from transformers import MptForCausalLM

        model = MptForCausalLM.from_pretrained(str(ckpt)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=True,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cpu_kernels", [False, True])
def test_rows_of_one_batch_use_different_adapters(lm_checkpoint, tokenizer, tmp_path, cpu_kernels):
    """Three adapters (ranks 2, 4, 8; different targets) in one engine's slots and the base model, in one
    batch: each row's greedy tokens equal PEFT's model with that adapter, and that adapter served alone."""
    from easympt.generation import Generator
    from easympt.generation.sampling import SamplingConfig
    from easympt.kernels import cpu

    if cpu_kernels and not cpu.available():
        pytest.skip("easympt's CPU kernels are not built here")
    dirs = []
    for i, (targets, r) in enumerate([(("Wqkv",), 2), (ALL, 4), (("up_proj", "down_proj"), 8)]):
        peft_model(lm_checkpoint, targets, r=r, alpha=2.0 * r, seed=10 + i).save_pretrained(str(tmp_path / f"a{i}"))
        dirs.append(str(tmp_path / f"a{i}"))
    prompt = tokenizer.encode("def f3(x):\n    return")
    n = 12
    gen = Generator.from_pretrained(lm_checkpoint, max_length=64, max_compile_tokens=16, cpu_kernels=cpu_kernels,
                                    max_loras=4, max_lora_rank=8)
    config = _config(lm_checkpoint)
    for slot, d in enumerate(dirs):
        gen.engine.set_adapter(slot + 1, *load_adapter(d, config))  # slot 0 stays empty
    configs = [SamplingConfig(temperature=0.0, max_new_tokens=n, adapter=a) for a in (1, -1, 3, 2, 0)]
    together = [r.token_ids for r in gen.generate_batch([prompt] * 5, configs)]
    for row, c in enumerate(configs):
        alone = gen.generate_batch([prompt], [c])[0].token_ids
        adapter = dirs[c.adapter - 1] if c.adapter > 0 else None
        assert together[row] == alone == _peft_greedy(lm_checkpoint, adapter, prompt, n), (row, c.adapter)
    assert len({tuple(t) for t in together}) >= 3  # the adapters change the output
    gen.engine.clear_adapter(1)
    assert gen.generate_batch([prompt], [configs[0]])[0].token_ids == together[1]  # back to the base model
    with pytest.raises(ValueError, match="max_lora_rank"):
        peft_model(lm_checkpoint, ("Wqkv",), r=16).save_pretrained(str(tmp_path / "big"))
        gen.engine.set_adapter(0, *load_adapter(str(tmp_path / "big"), config))


# ------------------------------------------------------------------ serving
@pytest.fixture(scope="module")
def adapter_dirs(lm_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = {}
    for i, (name, targets, r) in enumerate([("coder", ALL, 4), ("poet", ("Wqkv", "down_proj"), 8),
                                            ("huge", ("Wqkv",), 16)]):
        peft_model(lm_checkpoint, targets, r=r, alpha=2.0 * r, seed=20 + i).save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


def test_server_serves_many_adapters(lm_checkpoint, tokenizer, adapter_dirs):
    """`--lora NAME=DIR` at start-up and vLLM's load / unload routes at run time; a request picks its adapter
    with "model" (OpenAI and /chat routes), concurrent requests on different adapters share decode batches,
    and each answer's greedy tokens equal PEFT's model with that adapter. Bad loads are 4xx naming the problem,
    and the server keeps serving."""
    import concurrent.futures

    import httpx

    from conftest import SERVER_CONFIG
    from easympt.serve import MPTJaxServer

    srv = MPTJaxServer.from_pretrained(lm_checkpoint, progress=False, config={
        **SERVER_CONFIG, "lora_modules": {"coder": adapter_dirs["coder"]}, "max_loras": 2, "max_lora_rank": 8,
        "pre_compile": False})
    srv.fire()
    prompt = tokenizer.encode("def f3(x):\n    return")
    n = 10
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            def complete(model):
                body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
                if model:
                    body["model"] = model
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return tokenizer.encode(r.json()["choices"][0]["text"]), r.json()["model"]

            models = [m["id"] for m in c.get("/v1/models").json()["data"]]
            assert models == [srv.config.model_name, "coder"]
            r = c.post("/v1/load_lora_adapter", json={"lora_name": "poet", "lora_path": adapter_dirs["poet"]})
            assert r.status_code == 200 and r.json()["rank"] == 8, r.text
            card = c.get("/v1/models/poet").json()
            assert card["parent"] == srv.config.model_name and card["root"] == adapter_dirs["poet"]
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(complete, ["coder", None, "poet", "coder", "poet", None]))
            for model, (ids, served) in zip(["coder", None, "poet", "coder", "poet", None], answers):
                assert served == (model or srv.config.model_name)
                want = _peft_greedy(lm_checkpoint, adapter_dirs.get(model), prompt, n)
                assert ids == tokenizer.encode(tokenizer.decode(want)), model
            assert answers[0][0] != answers[1][0] != answers[2][0]
            chat = c.post("/chat", json={"prompt": "hello", "greedy": True, "max_new_tokens": 4, "model": "poet"})
            assert chat.status_code == 200, chat.text
            # the Gradio pages offer the adapters: the instruct page with "poet" answers as /instruct does
            from gradio_client import Client

            urls = srv.launch()
            want = c.post("/instruct", json={"instruction": "write a loop", "greedy": True, "max_new_tokens": 8,
                                             "model": "poet"}).json()["response"]
            page = Client(urls["inst"], verbose=False)
            assert page.predict("write a loop", "", 0.0, 0.9, 8, "poet", api_name="/instruct") == want
            base = c.post("/instruct", json={"instruction": "write a loop", "greedy": True,
                                             "max_new_tokens": 8}).json()["response"]
            assert page.predict("write a loop", "", 0.0, 0.9, 8, api_name="/instruct") == base

            # bad input: each a clear 4xx, and the server goes on
            for body, status, words in [
                ({"lora_name": "big", "lora_path": adapter_dirs["huge"]}, 400, "max_lora_rank 8"),
                ({"lora_name": "coder", "lora_path": adapter_dirs["poet"]}, 400, "already loaded"),
                ({"lora_name": "x", "lora_path": "/nonexistent"}, 400, "not a PEFT adapter"),
                ({"lora_name": "x"}, 400, "lora_path"),
                ({"lora_name": "third", "lora_path": adapter_dirs["poet"]}, 400, "slots"),
            ]:
                r = c.post("/v1/load_lora_adapter", json=body)
                assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 200
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "poet"})
            assert r.status_code == 404 and "'poet'" in r.json()["error"]["message"]
            r = c.post("/chat", json={"prompt": "x", "max_new_tokens": 2, "model": "poet"})
            assert r.status_code == 404 and "'poet'" in r.json()["error"]["message"]
            assert c.post("/v1/unload_lora_adapter", json={"lora_name": "poet"}).status_code == 404
            assert c.get("/status").json()["lora_adapters"].keys() == {"coder"}
            # the freed slot takes another adapter, which now answers as PEFT's
            assert c.post("/v1/load_lora_adapter", json={"lora_name": "poet2",
                                                         "lora_path": adapter_dirs["poet"]}).status_code == 200
            ids, _ = complete("poet2")
            assert ids == tokenizer.encode(tokenizer.decode(_peft_greedy(lm_checkpoint, adapter_dirs["poet"],
                                                                         prompt, n)))
    finally:
        srv.shutdown()


# ------------------------------------------------------------------ training memory plan
def test_training_plan_counts_what_each_method_trains():
    """`easympt plan --train`: the compiled step's memory; LoRA trains and stores far less than full
    fine-tuning, its optimizer state is two float32 moments of the adapter alone."""
    from easympt import MptConfig
    from easympt.training.memory import training_plan

    c = MptConfig.preset("mpt-125m", n_layers=2)
    full = training_plan(c, seq_len=128, lora_rank=0)
    lo = training_plan(c, seq_len=128, lora_rank=8)
    q = training_plan(c, seq_len=128, lora_rank=8, quantize="int8")
    assert full.trained_params == sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
        __import__("easympt").FlaxMptForCausalLM(c, _do_init=False).params_shape()))
    per_layer = 8 * (768 + 3 * 768) + 8 * (768 + 768) + 8 * (768 + 3072) * 2  # r (in + out) per target
    assert lo.trained_params == q.trained_params == 2 * per_layer
    assert lo.optimizer_bytes == pytest.approx(2 * 4 * lo.trained_params, abs=64)
    assert q.frozen_bytes < 0.6 * lo.frozen_bytes  # int8 matrices under bf16 norms and embedding
    assert lo.peak_bytes < 0.7 * full.peak_bytes and q.peak_bytes < lo.peak_bytes


def test_training_plan_at_mpt_7b_shapes():
    """QLoRA of mpt-7b at 2,048 tokens, batch 1, on abstract shapes: the adapter and its optimizer state
    are exact, and the compiled step fits one 16 GB GPU (11.43 GB when written; 38.95 GB while XLA kept
    every layer's dequantized weights for the whole step: see recompute_in_backward)."""
    from easympt import MptConfig
    from easympt.training.memory import training_plan

    plan = training_plan(MptConfig.preset("mpt-7b"), seq_len=2048, lora_rank=16, quantize="int4",
                         device_memory=16e9)
    assert plan.trained_params == 32 * 16 * ((4096 + 3 * 4096) + (4096 + 4096) + 2 * (4096 + 4 * 4096))
    assert plan.frozen_bytes == pytest.approx(3.83e9, rel=0.01)
    assert plan.argument_bytes < plan.frozen_bytes + 0.5e9
    assert plan.fits, plan.summary()


def test_cli_train_lora_and_serve_flags(lm_checkpoint, tmp_path, capsys):
    from easympt.cli import _name_and_dir, main

    (tmp_path / "d.txt").write_text(TEXT)
    rc = main(["train", lm_checkpoint, "--data", str(tmp_path / "d.txt"), "--output-dir", str(tmp_path / "run"),
               "--seq-len", "48", "--batch-size", "2", "--max-steps", "2", "--save-every", "2", "--lora-rank", "2",
               "--lora-targets", "Wqkv,down_proj", "--quantize", "int8"])
    assert rc == 0
    spec = read_spec(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapter"])
    assert spec.rank == 2 and spec.alpha == 4.0 and spec.targets == ("Wqkv", "down_proj")
    assert _name_and_dir("a=/x/y") == ("a", "/x/y")
    with pytest.raises(ValueError, match="NAME=DIR"):
        _name_and_dir("just-a-dir")
