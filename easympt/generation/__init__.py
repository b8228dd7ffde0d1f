"""KV-cached generation: pure sampling, the prefill/insert/generate engine, and a text API."""

from easympt.generation.engine import DecodeState, GenerationEngine, Prefix
from easympt.generation.generator import GenerationResult, Generator, StreamChunk
from easympt.generation.sampling import SamplingConfig, SamplingRows, sample

__all__ = ["DecodeState", "GenerationEngine", "GenerationResult", "Generator", "Prefix", "SamplingConfig",
           "SamplingRows", "StreamChunk", "sample"]
