"""Checkpoint conversion between Hugging Face MPT and easympt (installed as easympt.transform)."""

from easympt.transform.hf_to_flax import mpt_from_pretrained, resolve_checkpoint_dir
from easympt.transform.flax_to_hf import mpt_to_pretrained

__all__ = ["mpt_from_pretrained", "mpt_to_pretrained", "resolve_checkpoint_dir"]
