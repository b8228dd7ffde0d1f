"""A small numpy MPT written from llm-foundry's definition (modeling_mpt.py,
attention.py, ffn.py, norm.py), independent of easympt's code.

It covers what transformers' MptForCausalLM lacks (qk_ln, GQA/MQA, prefix_lm,
sequence_id, learned_pos_emb, mptglu, rmsnorm, logit_scale, biases,
alibi_bias_max, lengths past max_seq_len) and is itself checked against
transformers where the two overlap. Inputs: a plain config dict (config.json)
and a {hf_name: np.ndarray} state dict.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def gen_slopes(n_heads, alibi_bias_max):
    _n_heads = 2 ** math.ceil(math.log2(n_heads))
    m = np.arange(1, _n_heads + 1, dtype=np.float64) * (alibi_bias_max / _n_heads)
    slopes = 1.0 / np.power(2, m)
    if _n_heads != n_heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def build_alibi_bias(n_heads, seq_len, full, alibi_bias_max, rows=slice(None)):
    # llm-foundry: bias relative to the last key; `full` makes it symmetric. `rows`: only those
    # query rows (the same values, without the [S, S] matrix)
    alibi_bias = np.arange(1 - seq_len, 1, dtype=np.float64).reshape(1, 1, seq_len)
    if full:
        query = np.arange(1 - seq_len, 1, dtype=np.float64)[rows]
        alibi_bias = -np.abs(alibi_bias - query.reshape(1, -1, 1))
    return alibi_bias * gen_slopes(n_heads, alibi_bias_max).reshape(n_heads, 1, 1)


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    y = y * w if w is not None else y
    return y + b if b is not None else y


def rms_norm(x, w, eps):
    y = x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    return y * w if w is not None else y


def gelu(x, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


ACTS = {"gelu": gelu, "silu": lambda x: x / (1 + np.exp(-x)), "relu": lambda x: np.maximum(x, 0)}


def forward(cfg: dict, sd: dict, input_ids, attention_mask=None, prefix_mask=None, sequence_id=None,
            query_block: int | None = None):
    """Logits [B, S, V] in float64. `query_block` computes attention for that many query rows at a
    time (the same numbers in [B, H, query_block, S] memory: long inputs)."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    a = {"attn_type": "multihead_attention", "alibi": True, "alibi_bias_max": 8, "clip_qkv": None,
         "softmax_scale": None, "qk_ln": False, "prefix_lm": False, "attn_uses_sequence_id": False,
         "kv_n_heads": None, **(cfg.get("attn_config") or {})}
    f = cfg.get("ffn_config") or {}
    d, nh, eps = cfg["d_model"], cfg["n_heads"], cfg.get("layer_norm_epsilon", 1e-5)
    hd = d // nh
    kvh = {"multihead_attention": nh, "multiquery_attention": 1}.get(a["attn_type"], a["kv_n_heads"])
    norm_type = cfg.get("norm_type", "low_precision_layernorm")
    act_cfg = f.get("ffn_act_fn") or {"name": "gelu"}
    act = ACTS[act_cfg["name"]]
    if act_cfg["name"] == "gelu":
        act = lambda x: gelu(x, act_cfg.get("approximate", "none"))  # noqa: E731

    def norm(prefix, x):
        w, b = sd.get(prefix + ".weight"), sd.get(prefix + ".bias")
        return rms_norm(x, w, eps) if "rms" in norm_type else layer_norm(x, w, b, eps)

    def linear(prefix, x):
        y = x @ sd[prefix + ".weight"].T
        return y + sd[prefix + ".bias"] if prefix + ".bias" in sd else y

    input_ids = np.asarray(input_ids)
    B, S = input_ids.shape
    mask = np.ones((B, S), bool) if attention_mask is None else np.asarray(attention_mask, bool)
    x = sd["transformer.wte.weight"][input_ids]
    if cfg.get("learned_pos_emb", True) and not a["alibi"]:
        pos = np.arange(S)[None].repeat(B, 0)
        pos = np.clip(pos - np.cumsum(~mask, axis=1), 0, None)  # llm-foundry's left-padding shift
        x = x + sd["transformer.wpe.weight"][pos]

    # attention bias of query rows `rows` [B, H, r, S]: llm-foundry's _attn_bias + masks
    causal = not a["prefix_lm"]
    neg = np.finfo(np.float64).min
    keys = np.arange(S)

    def attention_bias(rows: slice):
        queries = keys[rows]
        bias = np.zeros((B, nh, len(queries), S))
        if a["alibi"]:
            bias = bias + build_alibi_bias(nh, S, full=not causal, alibi_bias_max=a["alibi_bias_max"], rows=rows)[None]
        if a["prefix_lm"]:
            cannot = ~((keys[None, :] <= queries[:, None])[None] | np.asarray(prefix_mask, bool)[:, None, :])
            bias = np.where(cannot[:, None], neg, bias)
        if a["attn_uses_sequence_id"] and sequence_id is not None:
            sid = np.asarray(sequence_id)
            cannot = sid[:, rows, None] != sid[:, None, :]
            bias = np.where(cannot[:, None], neg, bias)
        bias = np.where(~mask[:, None, None, :], neg, bias)
        if causal:
            bias = np.where((keys[None, :] > queries[:, None])[None, None], neg, bias)
        return bias

    blocks = [slice(r, min(r + (query_block or S), S)) for r in range(0, S, query_block or S)]

    for i in range(cfg["n_layers"]):
        p = f"transformer.blocks.{i}"
        h = norm(p + ".norm_1", x)
        qkv = linear(p + ".attn.Wqkv", h)
        if a["clip_qkv"]:
            qkv = np.clip(qkv, -a["clip_qkv"], a["clip_qkv"])
        q, k, v = np.split(qkv, [d, d + kvh * hd], axis=-1)
        if a["qk_ln"]:
            q, k = norm(p + ".attn.q_ln", q), norm(p + ".attn.k_ln", k)
        q = q.reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        k = np.repeat(k.reshape(B, S, kvh, hd), nh // kvh, axis=2).transpose(0, 2, 1, 3)
        v = np.repeat(v.reshape(B, S, kvh, hd), nh // kvh, axis=2).transpose(0, 2, 1, 3)
        scale = a["softmax_scale"] or 1 / math.sqrt(hd)
        o = np.empty((B, nh, S, hd))
        for rows in blocks:
            w = q[:, :, rows] @ k.transpose(0, 1, 3, 2) * scale + attention_bias(rows)
            w = np.exp(w - w.max(-1, keepdims=True))
            o[:, :, rows] = (w / w.sum(-1, keepdims=True)) @ v
        o = o.transpose(0, 2, 1, 3).reshape(B, S, d)
        x = x + linear(p + ".attn.out_proj", o)
        h = norm(p + ".norm_2", x)
        if f.get("ffn_type", "mptmlp") == "mptglu":
            h = act(linear(p + ".ffn.gate_proj", h)) * linear(p + ".ffn.up_proj", h)
        else:
            h = act(linear(p + ".ffn.up_proj", h))
        x = x + linear(p + ".ffn.down_proj", h)
    x = norm("transformer.norm_f", x)
    head = sd.get("lm_head.weight", sd.get("transformer.lm_head.weight", sd["transformer.wte.weight"]))
    logits = x @ head.T
    ls = cfg.get("logit_scale")
    if ls is not None:
        logits = logits * (1 / math.sqrt(d) if ls == "inv_sqrt_d_model" else ls)
    return logits
