"""Random-weight MPT checkpoints on disk; no downloads anywhere in the suite."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# exact-parity tests compute in float32; on a GPU, XLA would otherwise run float32 matmuls in TF32
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# One XLA compilation cache for the whole run, workers and the processes tests start included (they
# inherit it): the same programs of the same tiny models compile once instead of in every test that
# builds an engine. A fresh directory per run (xdist's controller sets it before its workers start),
# so nothing compiled by another version of the code is reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_XLA_CACHE = tempfile.mkdtemp(prefix="easympt-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
else:
    _OWN_XLA_CACHE = None


def pytest_unconfigure(config):
    if _OWN_XLA_CACHE and not hasattr(config, "workerinput"):  # the process that made it, after its workers
        import shutil

        shutil.rmtree(_OWN_XLA_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each test module, drop compiled programs once they crowd the process's memory mappings.
    Each compiled XLA:CPU program holds ~14 mappings of JIT code, and a worker that ran half the suite
    reached the kernel's limit of 65,530 (vm.max_map_count): the next compilation's mmap failed and
    the worker aborted (fatal signal mid-compile, seen twice in test_speculative). Engines of finished
    modules are garbage, but reference cycles keep their programs until a collection, and jit caches of
    module-level functions keep theirs for good: past MAX_MAPPINGS the caches are cleared too (later
    modules reload from the run's compilation cache; clearing after every module cost ~1 min a run)."""
    yield
    import gc

    gc.collect()
    try:
        with open("/proc/self/maps") as fh:
            mappings = sum(1 for _ in fh)
    except OSError:  # not Linux
        return
    if mappings > MAX_MAPPINGS:
        import jax

        jax.clear_caches()
        gc.collect()
    if os.environ.get("EASYMPT_TESTS_REPORT_MAPS"):
        print(f"\n[memory mappings after the module: {mappings}]", flush=True)


MAX_MAPPINGS = 20000  # of the kernel's default 65,530


BASE = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64)


def full_config(**overrides) -> dict:
    """A config.json dict in llm-foundry's shape (attn_config / ffn_config nested)."""
    cfg = {"model_type": "mpt", "expansion_ratio": 4, "no_bias": True, "learned_pos_emb": True,
           "norm_type": "low_precision_layernorm", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
           **BASE}
    attn = {"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"}
    attn.update(overrides.pop("attn_config", {}))
    cfg["attn_config"] = attn
    if "ffn_config" in overrides:
        cfg["ffn_config"] = overrides.pop("ffn_config")
    cfg.update(overrides)
    return cfg


def mosaicml_tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Name -> shape of every tensor MosaicML's modeling_mpt.py saves for a config.json dict
    (llm-foundry's definition, [out, in] weights; transformers uses the same names). `wpe` exists
    only without ALiBi, as in the hub code next to MosaicML's checkpoints."""
    a, f = cfg["attn_config"], cfg.get("ffn_config") or {}
    d, nh, L = cfg["d_model"], cfg["n_heads"], cfg["n_layers"]
    hd = d // nh
    kvh = {"multihead_attention": nh, "multiquery_attention": 1}.get(a.get("attn_type", "multihead_attention"),
                                                                     a.get("kv_n_heads"))
    F = f.get("ffn_hidden_size") or int(d * cfg.get("expansion_ratio", 4))
    bias = not cfg.get("no_bias", True)
    shapes = {}

    def norm(name, n):
        shapes[name + ".weight"] = (n,)
        if bias and "rms" not in cfg.get("norm_type", ""):
            shapes[name + ".bias"] = (n,)

    def linear(name, out, inp):
        shapes[name + ".weight"] = (out, inp)
        if bias:
            shapes[name + ".bias"] = (out,)

    shapes["transformer.wte.weight"] = (cfg["vocab_size"], d)
    if cfg.get("learned_pos_emb", True) and not a.get("alibi", True):
        shapes["transformer.wpe.weight"] = (cfg["max_seq_len"], d)
    for i in range(L):
        p = f"transformer.blocks.{i}"
        norm(p + ".norm_1", d)
        linear(p + ".attn.Wqkv", (nh + 2 * kvh) * hd, d)
        if a.get("qk_ln"):
            norm(p + ".attn.q_ln", d)
            norm(p + ".attn.k_ln", kvh * hd)
        linear(p + ".attn.out_proj", d, d)
        norm(p + ".norm_2", d)
        linear(p + ".ffn.up_proj", F, d)
        if f.get("ffn_type") == "mptglu":
            linear(p + ".ffn.gate_proj", F, d)
        linear(p + ".ffn.down_proj", d, F)
    norm("transformer.norm_f", d)
    if not cfg.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (cfg["vocab_size"], d)
    return shapes


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.15) -> dict[str, np.ndarray]:
    """Random tensors in MosaicML's layout (mosaicml_tensor_shapes); norm weights near one."""
    rng = np.random.default_rng(seed)
    sd = {}
    for name, shape in mosaicml_tensor_shapes(cfg).items():
        x = rng.standard_normal(shape)
        if name.endswith(".bias"):
            x = x * 0.1
        elif len(shape) == 1:  # a norm's weight
            x = 1 + 0.2 * x
        else:
            x = x * (0.5 if name.startswith(("transformer.wte", "transformer.wpe")) else std)
        sd[name] = x.astype(np.float32)
    return sd


def write_checkpoint(path, cfg: dict, sd: dict, fmt: str = "safetensors", torch_dtype: str = "float32",
                     n_shards: int = 1) -> str:
    """Save like save_pretrained: safetensors or .bin, optionally sharded with an index."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    names = sorted(sd)
    groups = [names[i::n_shards] for i in range(n_shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if n_shards == 1 else f"{stem}-{i + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: sd[k] for k in group}
        if fmt == "safetensors" and torch_dtype == "float32":
            from safetensors.numpy import save_file

            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        else:
            import torch

            tdt = getattr(torch, torch_dtype)
            tensors = {k: torch.from_numpy(v).to(tdt) for k, v in part.items()}
            if fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
            else:
                torch.save(tensors, os.path.join(path, fname))
        weight_map.update({k: fname for k in group})
    if n_shards > 1:
        with open(os.path.join(path, f"{stem}.{ext}.index.json"), "w") as fh:
            json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    return str(path)


def make_hf_checkpoint(path, seed: int = 0, architecture: str = "MptForCausalLM", **config_kwargs) -> str:
    """A checkpoint written by transformers' own save_pretrained (MptForCausalLM or a task-head class),
    with LayerNorm weights perturbed away from ones."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = {**BASE, **config_kwargs}
    model = getattr(transformers, architecture)(transformers.MptConfig(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if "wte" not in name else 0.5)
    model.save_pretrained(str(path))
    return str(path)


def hf_logits(path, input_ids, attention_mask=None) -> np.ndarray:
    import torch
    from transformers import MptForCausalLM

    model = MptForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(np.asarray(attention_mask))
        return model(torch.tensor(np.asarray(input_ids)), attention_mask=mask).logits.float().numpy()


def assert_logits_close(got, ref, mask=None, rtol_scale: float = 1e-4):
    """max |got - ref| <= rtol_scale * logit scale, over real (unpadded) positions."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if mask is not None:
        keep = np.asarray(mask, bool)
        got, ref = got[keep], ref[keep]
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= rtol_scale * scale, f"max abs diff {err:.3g} > {rtol_scale:g} x logit scale {scale:.3g}"


@pytest.fixture
def tokens():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, BASE["vocab_size"], size=(3, 20))
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :11] = 0
    return ids, mask


@pytest.fixture(scope="session")
def tokenizer():
    """A small BPE trained on a fixed corpus (a few standard-library modules), so the tests' token data do not
    change whenever easympt's own source (train_tokenizer's default corpus) is edited."""
    import glob
    import sysconfig

    from easympt.demo import train_tokenizer

    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "json", "*.py")) + [os.path.join(lib, n) for n in
                                                                     ("textwrap.py", "shlex.py", "fnmatch.py")])
    return train_tokenizer(vocab_size=384, files=files)


@pytest.fixture(scope="session")
def lm_checkpoint(tmp_path_factory, tokenizer):
    """A transformers-written MPT whose vocabulary matches the test tokenizer."""
    path = tmp_path_factory.mktemp("lm") / "mpt"
    make_hf_checkpoint(path, seed=3, vocab_size=len(tokenizer), max_seq_len=96, n_heads=4, d_model=64,
                       n_layers=2, eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(str(path))
    return str(path)


SERVER_CONFIG = dict(host="127.0.0.1", port=0, batch_size=4, max_length=256, max_new_tokens=64,
                     max_compile_tokens=16, max_queue=64, max_body_bytes=20_000)


@pytest.fixture(scope="session")
def server(lm_checkpoint):
    """One precompiled MPTJaxServer on a free port, shared by the HTTP, Gradio and browser tests."""
    from easympt.serve import MPTJaxServer

    srv = MPTJaxServer.from_pretrained(lm_checkpoint, config=SERVER_CONFIG, progress=False)
    srv.fire()
    yield srv
    srv.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(proc, url: str, timeout_s: float = 300) -> None:
    """Poll `url`/health until it answers 200; fail with the process output if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url}/health did not answer within {timeout_s:.0f} s")


def launch_processes(argv: list[str], n: int = 2, devices_each: int = 4, log_dir=None) -> list:
    """`argv` as n local JAX processes of `devices_each` CPU devices joined through EASYMPT_* variables
    (as n hosts of a pod would be); stdout and stderr together, as text, piped or (long-running
    processes, whose pipes nobody drains) into `log_dir`/process-<i>.log."""
    import subprocess

    port = free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}",
               "EASYMPT_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "EASYMPT_NUM_PROCESSES": str(n),
               "EASYMPT_PROCESS_ID": str(i), "PYTHONUNBUFFERED": "1"}
        out = subprocess.PIPE if log_dir is None else open(os.path.join(log_dir, f"process-{i}.log"), "w")
        procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    return procs


def finish_processes(procs, timeout_s: float = 300) -> list[str]:
    """Each process's output once all have exited 0 (the output of any that did not, in the failure)."""
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except Exception:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def report_of(output: str) -> dict:
    """The JSON a worker script printed after 'REPORT '."""
    return json.loads([line for line in output.splitlines() if line.startswith("REPORT ")][-1][len("REPORT "):])
