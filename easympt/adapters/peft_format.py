"""LoRA adapters in Hugging Face PEFT's files: `adapter_config.json` + `adapter_model.safetensors`.

PEFT names an MPT adapter's tensors `base_model.model.transformer.blocks.{i}.attn.Wqkv.lora_A.weight`
([r, in], a torch Linear's weight) and `...lora_B.weight` ([out, r]); easympt's are
`transformer/blocks_{i}/attn/Wqkv/lora_a` [in, r] and `lora_b` [r, out]: the same numbers, transposed.
The scale is lora_alpha / r. PEFT options that change the arithmetic (DoRA, rsLoRA, per-layer rank or
alpha patterns, trained biases, extra trained modules, ...) are refused by name: an adapter easympt
loads computes exactly what PEFT's does.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from easympt.adapters.lora import TARGETS, LoraSpec, split
from easympt.config import MptConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?transformer\.blocks\.(\d+)\.(attn|ffn)\.(\w+)\.lora_([AB])\.weight\Z")
_PLACE = {"Wqkv": "attn", "out_proj": "attn", "up_proj": "ffn", "gate_proj": "ffn", "down_proj": "ffn"}


def peft_config(spec: LoraSpec, base_model: str | None = None) -> dict:
    """adapter_config.json for an adapter of `spec`, the fields PEFT's LoraConfig reads."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }


def save_adapter(params_or_adapter: dict, spec: LoraSpec, out_dir: str, base_model: str | None = None) -> str:
    """Write the adapter leaves of `params_or_adapter` (a trained model's params, or the adapter tree)
    as a PEFT adapter directory; atomically, so a directory that has both files is complete."""
    import jax
    from safetensors.numpy import save_file

    from easympt.checkpoint import atomic_directory

    _, adapter = split(params_or_adapter)
    tensors = {}
    for path, x in jax.tree_util.tree_leaves_with_path(adapter):
        keys = [str(getattr(k, "key", k)) for k in path]
        m = re.fullmatch(r"blocks_(\d+)", keys[1])
        if keys[0] != "transformer" or m is None or len(keys) != 5:
            raise ValueError(f"unexpected adapter parameter {'/'.join(keys)}")
        which = "A" if keys[-1] == "lora_a" else "B"
        name = f"base_model.model.transformer.blocks.{m.group(1)}.{keys[2]}.{keys[3]}.lora_{which}.weight"
        tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(x), np.float32).T)
    if not tensors:
        raise ValueError("the params hold no adapter (no lora_a / lora_b leaves)")
    with atomic_directory(out_dir) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as fh:
            json.dump(peft_config(spec, base_model), fh, indent=2)
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    return out_dir


def _fail(path: str, why: str):
    raise ValueError(f"{path}: {why}")


def read_spec(path: str) -> LoraSpec:
    """The LoraSpec of a PEFT adapter directory, refusing options easympt does not implement."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        _fail(path, f"not a PEFT adapter directory (no {CONFIG_FILE})")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        _fail(cfg_path, f"unreadable: {e}")
    if not isinstance(cfg, dict):
        _fail(cfg_path, "must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        _fail(cfg_path, f"peft_type {cfg.get('peft_type')!r}: only LORA adapters are supported")
    refused = {
        "use_dora": lambda v: bool(v), "use_rslora": lambda v: bool(v), "fan_in_fan_out": lambda v: bool(v),
        "modules_to_save": lambda v: bool(v), "rank_pattern": lambda v: bool(v), "alpha_pattern": lambda v: bool(v),
        "layers_to_transform": lambda v: v is not None, "bias": lambda v: v not in (None, "none"),
        "use_qalora": lambda v: bool(v), "lora_bias": lambda v: bool(v), "megatron_config": lambda v: bool(v),
        "layer_replication": lambda v: bool(v), "trainable_token_indices": lambda v: bool(v),
        "target_parameters": lambda v: bool(v), "exclude_modules": lambda v: bool(v),
    }
    for field, bad in refused.items():
        if field in cfg and bad(cfg[field]):
            _fail(cfg_path, f"{field}={cfg[field]!r} is not supported by easympt's LoRA")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = [targets] if targets in TARGETS else None
    if not isinstance(targets, list) or not targets:
        _fail(cfg_path, f"target_modules {cfg.get('target_modules')!r}: give a list of MPT layer names "
                        f"({', '.join(TARGETS)})")
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool):
            _fail(cfg_path, f"{field} must be a number, got {cfg.get(field)!r}")
    try:
        return LoraSpec(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), targets=tuple(targets),
                        dropout=float(cfg.get("lora_dropout") or 0.0))
    except ValueError as e:
        _fail(cfg_path, str(e))


def load_adapter(path: str, config: MptConfig) -> tuple[dict, LoraSpec]:
    """(adapter tree {transformer/blocks_i/.../lora_a [in, r], lora_b [r, out]} in float32, spec) of a
    PEFT adapter directory, checked against the model's `config`: every targeted layer of every block
    present with the shapes the model has, nothing else."""
    from safetensors import safe_open

    spec = read_spec(path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        bin_file = os.path.join(path, "adapter_model.bin")
        _fail(path, f"no {WEIGHTS_FILE}" + (" (adapter_model.bin is not read: save with safe_serialization)"
                                             if os.path.isfile(bin_file) else ""))
    dims = layer_dims(config)
    tree: dict = {}
    with safe_open(weights, "np") as fh:
        for key in fh.keys():
            m = _KEY.match(key)
            if m is None:
                _fail(weights, f"tensor {key!r} is not a LoRA weight of an MPT layer")
            block, place, layer, which = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            if layer not in spec.targets or _PLACE.get(layer) != place:
                _fail(weights, f"tensor {key!r} is for a layer outside target_modules {list(spec.targets)}")
            if block >= config.n_layers:
                _fail(weights, f"tensor {key!r}: the model has {config.n_layers} blocks")
            x = fh.get_tensor(key).astype(np.float32)
            K, N = dims[layer]
            want = (spec.rank, K) if which == "A" else (N, spec.rank)
            if x.shape != want:
                _fail(weights, f"tensor {key!r} has shape {x.shape}; this model's {layer} with r={spec.rank} "
                               f"needs {want}")
            node = tree.setdefault("transformer", {}).setdefault(f"blocks_{block}", {}).setdefault(place, {})
            node.setdefault(layer, {})["lora_a" if which == "A" else "lora_b"] = x.T.copy()
    for i in range(config.n_layers):
        for layer in spec.targets:
            got = tree.get("transformer", {}).get(f"blocks_{i}", {}).get(_PLACE[layer], {}).get(layer, {})
            if set(got) != {"lora_a", "lora_b"}:
                _fail(weights, f"block {i} {layer}: lora_A and lora_B weights missing")
    return tree, spec


def layer_dims(config: MptConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each MPT dense layer a LoRA can target."""
    c = config
    H, K, D = c.n_heads, c.kv_heads, c.head_dim
    dims = {"Wqkv": (c.d_model, (H + 2 * K) * D), "out_proj": (H * D, c.d_model),
            "up_proj": (c.d_model, c.ffn_hidden_size), "down_proj": (c.ffn_hidden_size, c.d_model)}
    if c.ffn_config.ffn_type == "mptglu":
        dims["gate_proj"] = (c.d_model, c.ffn_hidden_size)
    return dims
