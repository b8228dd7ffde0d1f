"""Adapters on a frozen MPT: LoRA layers (easympt.adapters.lora), PEFT's files (easympt.adapters.peft_format)
and the slots a server keeps several adapters in (easympt.adapters.slots)."""

from easympt.adapters.lora import TARGETS, LoraSpec
from easympt.adapters.peft_format import load_adapter, read_spec, save_adapter

__all__ = ["LoraSpec", "TARGETS", "load_adapter", "read_spec", "save_adapter"]
