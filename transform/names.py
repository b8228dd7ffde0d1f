"""The one name map between Hugging Face MPT tensors and easympt parameters.

HF Linear weights are [out, in]; flax kernels are [in, out], so 2-D
`weight`s of Linear layers are transposed both ways. Everything else is copied.
"""

from __future__ import annotations

import re

# (HF regex, flax template, transpose). Group 1 of the regex is the block index.
_TABLE = (
    (r"transformer\.wte\.weight", "transformer/wte/embedding", False),
    (r"transformer\.wpe\.weight", "transformer/wpe/embedding", False),
    (r"transformer\.norm_f\.weight", "transformer/norm_f/scale", False),
    (r"transformer\.norm_f\.bias", "transformer/norm_f/bias", False),
    (r"transformer\.blocks\.(\d+)\.(norm_1|norm_2)\.weight", "transformer/blocks_{0}/{1}/scale", False),
    (r"transformer\.blocks\.(\d+)\.(norm_1|norm_2)\.bias", "transformer/blocks_{0}/{1}/bias", False),
    (r"transformer\.blocks\.(\d+)\.attn\.(q_ln|k_ln)\.weight", "transformer/blocks_{0}/attn/{1}/scale", False),
    (r"transformer\.blocks\.(\d+)\.attn\.(q_ln|k_ln)\.bias", "transformer/blocks_{0}/attn/{1}/bias", False),
    (r"transformer\.blocks\.(\d+)\.attn\.(Wqkv|out_proj)\.weight", "transformer/blocks_{0}/attn/{1}/kernel", True),
    (r"transformer\.blocks\.(\d+)\.attn\.(Wqkv|out_proj)\.bias", "transformer/blocks_{0}/attn/{1}/bias", False),
    (r"transformer\.blocks\.(\d+)\.ffn\.(up_proj|down_proj|gate_proj)\.weight",
     "transformer/blocks_{0}/ffn/{1}/kernel", True),
    (r"transformer\.blocks\.(\d+)\.ffn\.(up_proj|down_proj|gate_proj)\.bias", "transformer/blocks_{0}/ffn/{1}/bias",
     False),
    # transformers keeps the LM head at the top; llm-foundry inside `transformer`.
    (r"(?:transformer\.)?lm_head\.weight", "lm_head/kernel", True),
    # task heads (MptForSequenceClassification / TokenClassification / QuestionAnswering)
    (r"(score|classifier|qa_outputs)\.weight", "{0}/kernel", True),
    (r"(classifier|qa_outputs)\.bias", "{0}/bias", False),
)
_COMPILED = tuple((re.compile(p + r"\Z"), t, tr) for p, t, tr in _TABLE)

# transformers writes the tied head as its own (identical) tensor in some versions.
TIED_ALIASES = ("lm_head.weight", "transformer.lm_head.weight")


def hf_to_flax_name(hf_name: str) -> tuple[str, bool] | None:
    """('transformer/blocks_0/attn/Wqkv/kernel', transpose) or None for an unknown tensor."""
    for regex, template, transpose in _COMPILED:
        m = regex.match(hf_name)
        if m:
            return template.format(*m.groups()), transpose
    return None


def flax_to_hf_name(flax_name: str) -> tuple[str, bool]:
    """The inverse of hf_to_flax_name (the HF name transformers' MptForCausalLM uses)."""
    parts = flax_name.split("/")
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    out = []
    for p in parts:
        m = re.fullmatch(r"blocks_(\d+)", p)
        out.append(f"blocks.{m.group(1)}" if m else p)
    leaf = out[-1]
    transpose = leaf == "kernel"
    out[-1] = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join(out), transpose
