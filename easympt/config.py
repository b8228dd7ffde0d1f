"""MptConfig: the Hugging Face / llm-foundry MPT config, validated and frozen.

Field names and meanings are those of `config.json` as transformers and
llm-foundry write it. Every field either changes what the model computes or is
known to be bookkeeping; a value the model does not implement is an error
here, at construction, so no checkpoint is ever run with a setting silently
dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

ATTN_TYPES = ("multihead_attention", "multiquery_attention", "grouped_query_attention")
ATTN_IMPLS = ("torch", "flash", "triton", "flex")  # kernels of one computation; XLA runs them all alike
NORM_TYPES = ("layernorm", "low_precision_layernorm", "rmsnorm", "low_precision_rmsnorm")
FFN_TYPES = ("mptmlp", "mptglu")
ACTIVATIONS = ("gelu", "silu", "relu")
INIT_NAMES = (
    "baseline_", "kaiming_normal_", "kaiming_uniform_", "xavier_normal_", "xavier_uniform_",
    "small_init_", "neox_init_",
)

# Keys every transformers PretrainedConfig writes into config.json (and into the
# nested attn_config). They describe the checkpoint, not the network.
_HF_BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype",
    "dtype", "id2label", "label2id", "num_labels", "problem_type", "return_dict", "output_attentions",
    "output_hidden_states", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_name",
    "verbose", "init_device", "use_cache", "initializer_range", "_attn_implementation_autoset",
    "tie_encoder_decoder", "is_decoder", "add_cross_attention", "torchscript", "pruned_heads",
    "finetuning_task", "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id",
    "cross_attention_hidden_size", "tf_legacy_loss", "use_bfloat16", "_commit_hash",
    "classifier_dropout", "hidden_dropout",  # read by the token-classification head
})


# Keys MosaicML's published config.json files carry that change nothing easympt computes: accepted,
# kept for export, and listed in the README. (`attn_impl` picks a PyTorch kernel of the same math.)
NO_OP_KEYS = ("attn_impl", "init_device", "verbose", "tokenizer_name", "use_cache", "auto_map",
              "transformers_version", "torch_dtype", "model_type", "_name_or_path")
assert set(NO_OP_KEYS) - {"attn_impl"} <= _HF_BOOKKEEPING

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Every `architectures` spelling an MPT checkpoint carries -> the transformers class easympt builds.
# MosaicML's own modeling code (every mosaicml/* and replit/* hub repo) saves `MPTForCausalLM`;
# re-saves by transformers say `MptForCausalLM`; a config with no `architectures` is a causal LM.
ARCHITECTURES = {
    "MPTForCausalLM": "MptForCausalLM",
    "MptForCausalLM": "MptForCausalLM",
    "MptForSequenceClassification": "MptForSequenceClassification",
    "MptForTokenClassification": "MptForTokenClassification",
    "MptForQuestionAnswering": "MptForQuestionAnswering",
}


class ConfigError(ValueError):
    """A config value easympt cannot honour; the message names the field."""


def _fail(source: str, msg: str) -> None:
    raise ConfigError(f"{source}: {msg}" if source else msg)


@dataclass(frozen=True)
class AttnConfig:
    """`attn_config` of an MPT config.json."""

    attn_type: str = "multihead_attention"
    attn_pdrop: float = 0.0
    attn_impl: str = "torch"
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    prefix_lm: bool = False
    qk_ln: bool = False
    qk_gn: bool = False
    attn_uses_sequence_id: bool = False
    alibi: bool = True
    alibi_bias_max: int = 8
    kv_n_heads: int | None = None
    fused_qkv: bool = True
    rope: bool = False
    sliding_window_size: int = -1


@dataclass(frozen=True)
class FfnConfig:
    """`ffn_config` of an MPT config.json; `ffn_act_fn` as llm-foundry writes it."""

    ffn_type: str = "mptmlp"
    ffn_hidden_size: int | None = None
    act_name: str = "gelu"
    act_approximate: str = "none"  # gelu only: "none" (erf) or "tanh"
    ffn_bias: bool | None = None  # None: follow `no_bias`


@dataclass(frozen=True)
class MptConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    expansion_ratio: float = 4
    max_seq_len: int = 2048
    vocab_size: int = 50368
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    learned_pos_emb: bool = True
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FfnConfig = field(default_factory=FfnConfig)
    logit_scale: float | str | None = None
    no_bias: bool = True
    embedding_fraction: float = 1.0
    norm_type: str = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    initializer_range: float = 0.02
    # llm-foundry's init recipe; empty means transformers' normal(initializer_range).
    init_config: dict = field(default_factory=dict, compare=False, hash=False)
    # Bookkeeping keys from config.json, written back unchanged by save_pretrained.
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False, hash=False, repr=False)

    def __post_init__(self):
        self._validate()

    # ------------------------------------------------------------------ derived
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_attention_heads(self) -> int:
        return self.n_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layers

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads after resolving `attn_type`."""
        a = self.attn_config
        if a.attn_type == "multihead_attention":
            return self.n_heads
        if a.attn_type == "multiquery_attention":
            return 1
        return a.kv_n_heads

    @property
    def ffn_hidden_size(self) -> int:
        f = self.ffn_config.ffn_hidden_size
        return int(f) if f is not None else int(self.d_model * self.expansion_ratio)

    @property
    def logit_multiplier(self) -> float | None:
        if self.logit_scale is None:
            return None
        if self.logit_scale == "inv_sqrt_d_model":
            return 1.0 / math.sqrt(self.d_model)
        return float(self.logit_scale)

    @property
    def uses_learned_pos_emb(self) -> bool:
        # MPT checkpoints (and transformers) set learned_pos_emb=True next to
        # alibi=True and carry no `wpe` tensor: ALiBi replaces the embedding.
        return self.learned_pos_emb and not self.attn_config.alibi

    @property
    def ffn_uses_bias(self) -> bool:
        b = self.ffn_config.ffn_bias
        return (not self.no_bias) if b is None else bool(b)

    @property
    def causal(self) -> bool:
        return not self.attn_config.prefix_lm

    # --------------------------------------------------------------- validation
    def _validate(self) -> None:
        s, a, f = self.source, self.attn_config, self.ffn_config
        named = self.extra.get("architectures") or ["MptForCausalLM"]
        if not isinstance(named, list) or len(named) != 1 or named[0] not in ARCHITECTURES:
            _fail(s, f"architectures {named!r} is not an MPT model easympt builds; it reads "
                     f"{', '.join(ARCHITECTURES)}")
        if self.extra.get("problem_type") not in (None, *PROBLEM_TYPES):
            _fail(s, f"problem_type {self.extra['problem_type']!r} is not one of {', '.join(PROBLEM_TYPES)}")
        for name in ("d_model", "n_heads", "n_layers", "max_seq_len", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                _fail(s, f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            _fail(s, f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if a.attn_type not in ATTN_TYPES:
            _fail(s, f"attn_config.attn_type {a.attn_type!r} is not one of {', '.join(ATTN_TYPES)}")
        if a.attn_type == "grouped_query_attention":
            if not isinstance(a.kv_n_heads, int) or a.kv_n_heads <= 0 or self.n_heads % a.kv_n_heads:
                _fail(s, f"attn_config.kv_n_heads {a.kv_n_heads!r} must be a positive divisor of "
                         f"n_heads {self.n_heads} for grouped_query_attention")
        if a.attn_impl not in ATTN_IMPLS:
            _fail(s, f"attn_config.attn_impl {a.attn_impl!r} is not one of {', '.join(ATTN_IMPLS)}")
        if a.qk_gn:
            _fail(s, "attn_config.qk_gn=True (per-head group norm on q/k) is not implemented; use qk_ln")
        if not a.fused_qkv:
            _fail(s, "attn_config.fused_qkv=False (separate Wq/Wk/Wv) is not implemented")
        if a.rope:
            _fail(s, "attn_config.rope=True is not implemented; easympt runs ALiBi or learned positions")
        if a.sliding_window_size not in (-1, None):
            _fail(s, f"attn_config.sliding_window_size={a.sliding_window_size} is not implemented (only -1)")
        if a.clip_qkv is not None and a.clip_qkv <= 0:
            _fail(s, f"attn_config.clip_qkv must be positive or null, got {a.clip_qkv!r}")
        if a.softmax_scale is not None and a.softmax_scale <= 0:
            _fail(s, f"attn_config.softmax_scale must be positive or null, got {a.softmax_scale!r}")
        if a.alibi and (not isinstance(a.alibi_bias_max, (int, float)) or a.alibi_bias_max <= 0):
            _fail(s, f"attn_config.alibi_bias_max must be positive, got {a.alibi_bias_max!r}")
        if not (0.0 <= a.attn_pdrop < 1.0 and 0.0 <= self.resid_pdrop < 1.0 and 0.0 <= self.emb_pdrop < 1.0):
            _fail(s, "attn_pdrop, resid_pdrop and emb_pdrop must lie in [0, 1)")
        if self.norm_type not in NORM_TYPES:
            _fail(s, f"norm_type {self.norm_type!r} is not one of {', '.join(NORM_TYPES)}")
        if f.ffn_type not in FFN_TYPES:
            _fail(s, f"ffn_config.ffn_type {f.ffn_type!r} is not one of {', '.join(FFN_TYPES)}")
        if f.act_name not in ACTIVATIONS:
            _fail(s, f"ffn_config.ffn_act_fn name {f.act_name!r} is not one of {', '.join(ACTIVATIONS)}")
        if f.act_approximate not in ("none", "tanh"):
            _fail(s, f"ffn_config.ffn_act_fn approximate {f.act_approximate!r} is not 'none' or 'tanh'")
        if self.ffn_hidden_size <= 0:
            _fail(s, f"ffn hidden size must be positive, got {self.ffn_hidden_size}")
        if isinstance(self.logit_scale, str) and self.logit_scale != "inv_sqrt_d_model":
            _fail(s, f"logit_scale {self.logit_scale!r} is not a number or 'inv_sqrt_d_model'")
        if not 0.0 < self.embedding_fraction <= 1.0:
            _fail(s, f"embedding_fraction must lie in (0, 1], got {self.embedding_fraction}")
        if self.init_config:
            name = self.init_config.get("name", "kaiming_normal_")
            if name not in INIT_NAMES:
                _fail(s, f"init_config.name {name!r} is not one of {', '.join(INIT_NAMES)}")

    # -------------------------------------------------------------- task heads
    @property
    def architecture(self) -> str:
        """The transformers class this checkpoint is (MosaicML's `MPTForCausalLM` is `MptForCausalLM`)."""
        return ARCHITECTURES[(self.extra.get("architectures") or ["MptForCausalLM"])[0]]

    @property
    def num_labels(self) -> int:
        """As transformers derives it: the size of id2label, 2 by default."""
        return len(self.extra.get("id2label") or {}) or int(self.extra.get("num_labels", 2))

    @property
    def problem_type(self) -> str | None:
        return self.extra.get("problem_type")

    @property
    def classifier_dropout(self) -> float:
        """transformers' rule for MptForTokenClassification: classifier_dropout, else hidden_dropout, else 0.1."""
        for key in ("classifier_dropout", "hidden_dropout"):
            if self.extra.get(key) is not None:
                return float(self.extra[key])
        return 0.1

    def for_task(self, architecture: str, num_labels: int | None = None, problem_type: str | None = None,
                 id2label: dict | None = None) -> MptConfig:
        """This geometry with a task head: the config a fine-tuned classifier is saved with."""
        extra = {**self.extra, "architectures": [architecture]}
        if id2label is None and num_labels is not None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        if id2label is not None:
            extra["id2label"] = {str(k): v for k, v in id2label.items()}
            extra["label2id"] = {v: int(k) for k, v in id2label.items()}
        if problem_type is not None:
            extra["problem_type"] = problem_type
        return dataclasses.replace(self, extra=extra)  # _validate checks problem_type

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides) -> MptConfig:
        """Geometry of a released MPT (or `tiny` for tests); `overrides` replace top-level fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        base = dict(PRESETS[name])
        base.update(overrides)
        return cls.from_dict(base)

    # ----------------------------------------------------------- dict / json io
    @classmethod
    def from_dict(cls, d: dict, source: str = "") -> MptConfig:
        d = dict(d)
        attn = _parse_attn(d.pop("attn_config", None) or {}, source)
        ffn = _parse_ffn(d.pop("ffn_config", None) or {}, source)
        known = {f.name for f in dataclasses.fields(cls)} - {"attn_config", "ffn_config", "extra", "source"}
        kwargs, extra, unknown = {}, {}, []
        for k, v in d.items():
            if k in known:
                kwargs[k] = v
            elif k in _HF_BOOKKEEPING or k.startswith("_"):
                extra[k] = v
            elif k in ("fc_type",):
                name = v.get("name") if isinstance(v, dict) else v
                if name != "torch":
                    _fail(source, f"fc_type {v!r} is not implemented (only 'torch' linear layers)")
                extra[k] = v
            elif k in ("block_overrides",):
                if v:
                    _fail(source, "block_overrides (per-layer configs) are not implemented")
            elif k in ("use_pad_tok_in_ffn", "tie_word_embeddings"):
                kwargs[k] = v
            elif k == "norm_eps":  # llm-foundry's newer name for layer_norm_epsilon
                kwargs["layer_norm_epsilon"] = v
            elif k == "final_logit_softcapping":
                if v is not None:
                    _fail(source, "final_logit_softcapping is not implemented")
            else:
                unknown.append(k)
        if unknown:
            _fail(source, f"unknown config field(s) {', '.join(sorted(unknown))}: easympt does not "
                          "know what they change, so it refuses to guess")
        kwargs.pop("use_pad_tok_in_ffn", None)  # the FFN here is position-wise; padding is masked in attention
        if isinstance(kwargs.get("eos_token_id"), list):
            ids = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = ids[0] if ids else None
            if len(ids) > 1:
                extra["eos_token_ids"] = ids
        if kwargs.get("init_config") is None:
            kwargs["init_config"] = {}
        return cls(attn_config=attn, ffn_config=ffn, extra=extra, source=source, **kwargs)

    def to_dict(self) -> dict:
        # transformers' spelling and no `auto_map`: the file loads in transformers without remote code
        d: dict[str, Any] = {"model_type": "mpt"}
        d.update({k: v for k, v in self.extra.items() if k != "auto_map"})
        d["architectures"] = [self.architecture]
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source", "attn_config", "ffn_config"):
                continue
            d[f.name] = getattr(self, f.name)
        d["attn_config"] = _attn_to_dict(self.attn_config)
        fc = self.ffn_config
        ffn = {"ffn_type": fc.ffn_type, "ffn_act_fn": {"name": fc.act_name}}
        if fc.act_name == "gelu":
            ffn["ffn_act_fn"]["approximate"] = fc.act_approximate
        if fc.ffn_hidden_size is not None:
            ffn["ffn_hidden_size"] = fc.ffn_hidden_size
        if fc.ffn_bias is not None:
            ffn["ffn_bias"] = fc.ffn_bias
        d["ffn_config"] = ffn
        if "eos_token_ids" in d:
            d["eos_token_id"] = d.pop("eos_token_ids")
        return d

    @classmethod
    def from_json_file(cls, path: str) -> MptConfig:
        try:
            with open(path, encoding="utf-8") as fh:
                d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if d.get("model_type", "mpt") != "mpt":
            raise ConfigError(f"{path}: model_type {d.get('model_type')!r} is not 'mpt'")
        return cls.from_dict(d, source=f"config.json in {os.path.dirname(path) or '.'}")

    @classmethod
    def from_pretrained(cls, path: str, **hub_kwargs) -> MptConfig:
        """Read `config.json` from a directory, a file, or a Hugging Face cache / hub id."""
        if os.path.isfile(path):
            return cls.from_json_file(path)
        if os.path.isdir(path):
            cfg = os.path.join(path, "config.json")
            if not os.path.isfile(cfg):
                raise ConfigError(f"{path}: no config.json in this directory")
            return cls.from_json_file(cfg)
        from huggingface_hub import hf_hub_download  # resolves the local cache before the network

        return cls.from_json_file(hf_hub_download(path, "config.json", **hub_kwargs))

    def save_pretrained(self, out_dir: str) -> str:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "config.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
        return path

    def replace(self, **changes) -> MptConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ sharding
    def get_partition_rules(self, fsdp: bool = True):
        """(regex, PartitionSpec) pairs over '/'-joined param paths; see easympt.sharding."""
        from easympt.sharding import mpt_partition_rules

        return mpt_partition_rules(fsdp=fsdp)


# Fields transformers' strict MptAttentionConfig knows; llm-foundry's other
# fields are written only when they differ from their defaults.
_HF_ATTN_FIELDS = ("attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "prefix_lm", "qk_ln",
                   "attn_uses_sequence_id", "alibi", "alibi_bias_max")


def _attn_to_dict(a: AttnConfig) -> dict:
    defaults = AttnConfig()
    out = {k: v for k, v in dataclasses.asdict(a).items()
           if k in _HF_ATTN_FIELDS or v != getattr(defaults, k)}
    if float(out["attn_pdrop"]).is_integer():
        out["attn_pdrop"] = int(out["attn_pdrop"])  # transformers' strict config wants an int for 0
    return out


_ATTN_BOOKKEEPING = _HF_BOOKKEEPING | {"rope_theta", "rope_impl", "rope_dail_config", "rope_hf_config",
                                      "flex_attn_mod_list", "flex_attn_config", "flex_attn_compile"}


def _parse_attn(d: dict, source: str) -> AttnConfig:
    known = {f.name for f in dataclasses.fields(AttnConfig)}
    kwargs, unknown = {}, []
    for k, v in d.items():
        if k in known:
            kwargs[k] = v
        elif k in _ATTN_BOOKKEEPING or k.startswith("_"):
            continue
        else:
            unknown.append(k)
    if unknown:
        _fail(source, f"unknown attn_config field(s) {', '.join(sorted(unknown))}")
    if kwargs.get("sliding_window_size") is None:
        kwargs.pop("sliding_window_size", None)
    return AttnConfig(**kwargs)


def _parse_ffn(d: dict, source: str) -> FfnConfig:
    d = dict(d)
    kwargs = {}
    act = d.pop("ffn_act_fn", None)
    if act is not None:
        if not isinstance(act, dict) or "name" not in act:
            _fail(source, f"ffn_config.ffn_act_fn must be a dict with a 'name', got {act!r}")
        act = dict(act)
        kwargs["act_name"] = act.pop("name")
        if "approximate" in act:
            kwargs["act_approximate"] = act.pop("approximate")
        if act:
            _fail(source, f"ffn_config.ffn_act_fn has unsupported argument(s) {', '.join(sorted(act))}")
    for k in ("ffn_type", "ffn_hidden_size", "ffn_bias"):
        if k in d:
            kwargs[k] = d.pop(k)
    fc_type = d.pop("fc_type", None)
    if fc_type not in (None, "torch", {"name": "torch"}):
        _fail(source, f"ffn_config.fc_type {fc_type!r} is not implemented (only 'torch' linear layers)")
    if d:
        _fail(source, f"unknown or unsupported ffn_config field(s) {', '.join(sorted(d))}")
    return FfnConfig(**kwargs)


_MPT_7B = dict(d_model=4096, n_heads=32, n_layers=32, max_seq_len=2048, vocab_size=50432,
               expansion_ratio=4, no_bias=True, learned_pos_emb=True,
               attn_config={"alibi": True, "alibi_bias_max": 8},
               init_config={"name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu",
                            "init_div_is_residual": True, "init_gain": 0.0})
PRESETS: dict[str, dict] = {
    "mpt-7b": _MPT_7B,
    "mpt-7b-8k": {**_MPT_7B, "max_seq_len": 8192},
    "mpt-7b-storywriter": {**_MPT_7B, "max_seq_len": 65536,
                           "attn_config": {"alibi": True, "alibi_bias_max": 8, "clip_qkv": 6}},
    "mpt-30b": {**_MPT_7B, "d_model": 7168, "n_heads": 64, "n_layers": 48, "max_seq_len": 8192},
    "mpt-125m": {**_MPT_7B, "d_model": 768, "n_heads": 12, "n_layers": 12, "vocab_size": 50368},
    "mpt-1b": {**_MPT_7B, "d_model": 2048, "n_heads": 16, "n_layers": 24, "vocab_size": 50368},
    "tiny": {**_MPT_7B, "d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256, "max_seq_len": 128},
}
