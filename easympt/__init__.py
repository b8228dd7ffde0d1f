"""easympt: MosaicML's MPT in JAX/Flax — exact to the PyTorch model, sharded, served."""

from easympt import host_memory

host_memory.keep_freed_memory()  # before JAX's CPU runtime starts its threads (easympt.host_memory)

from easympt.cache import KVCache
from easympt.config import AttnConfig, ConfigError, FfnConfig, MptConfig
from easympt.dtypes import default_compute_dtype
from easympt.heads import (FlaxMptForQuestionAnswering, FlaxMptForSequenceClassification,
                           FlaxMptForTokenClassification)
from easympt.model import FlaxMptForCausalLM, FlaxMptOutput, MptForCausalLMModule

__version__ = "0.1.0"

__all__ = [
    "AttnConfig", "ConfigError", "FfnConfig", "FlaxMptForCausalLM", "FlaxMptForQuestionAnswering",
    "FlaxMptForSequenceClassification", "FlaxMptForTokenClassification", "FlaxMptOutput", "KVCache",
    "MptConfig", "MptForCausalLMModule", "default_compute_dtype", "__version__",
]
