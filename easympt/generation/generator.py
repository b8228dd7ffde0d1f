"""Text in, text out: batched and streaming generation over the engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from easympt.dtypes import inference_dtypes
from easympt.generation.engine import GenerationEngine
from easympt.generation.sampling import SamplingConfig
from easympt.generation.text import IncrementalText
from easympt.model import FlaxMptForCausalLM


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string) or "length"
    prompt_tokens: int
    timings: dict = field(default_factory=dict)  # ttft_s, total_s


@dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]
    finish_reason: str | None = None


def _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
              stop_token_ids) -> SamplingConfig:
    return SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty, seed, max_new_tokens,
                          tuple([stop] if isinstance(stop, str) else stop), tuple(stop_token_ids))


def load_draft_model(source: str, compute, weights) -> tuple[FlaxMptForCausalLM, dict]:
    """(model, params) of a draft model for speculative decoding: any MPT checkpoint (dir, cache or hub
    id) whose vocabulary is the model's (the engine checks), in the model's compute and weight dtypes."""
    from easympt.transform import mpt_from_pretrained
    from easympt.transform.hf_to_flax import resolve_checkpoint_dir

    params, config = mpt_from_pretrained(resolve_checkpoint_dir(source), dtype=weights, progress=False)
    return FlaxMptForCausalLM(config, dtype=compute, param_dtype=weights, _do_init=False), params


class Generator:
    """`generate` (a prompt or a batch) and `stream` (one prompt) over a GenerationEngine."""

    def __init__(self, model: FlaxMptForCausalLM, params, tokenizer, max_length: int = 2048,
                 max_compile_tokens: int = 64, cpu_kernels: bool | None = None, kv_dtype=None,
                 consume_params: bool = False, **engine_options):
        """engine_options: the GenerationEngine's other options (max_loras, max_lora_rank, ...)."""
        self.tokenizer = tokenizer
        self.engine = GenerationEngine(model, params, max_length=max_length, max_compile_tokens=max_compile_tokens,
                                       cpu_kernels=cpu_kernels, kv_dtype=kv_dtype, consume_params=consume_params,
                                       **engine_options)
        eos = {model.config.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
        self.eos_ids = tuple(sorted(i for i in eos if i is not None))

    @classmethod
    def from_pretrained(cls, source: str, dtype=None, max_length: int = 2048, max_compile_tokens: int = 64,
                        tokenizer=None, cpu_kernels: bool | None = None, kv_dtype=None, quantize: str | None = None,
                        max_loras: int = 0, max_lora_rank: int = 16, num_speculative_tokens: int = 0,
                        draft_model: str | None = None, **load_kwargs) -> Generator:
        """A Generator on a checkpoint; `quantize` ("int8", "int4"): weights quantized as they load
        (a quantized easympt checkpoint loads in its own format)."""
        from easympt.transform import mpt_from_pretrained
        from easympt.transform.hf_to_flax import load_tokenizer, resolve_checkpoint_dir
        from easympt.transform.quantized import params_format

        ckpt = resolve_checkpoint_dir(source, local_files_only=load_kwargs.pop("local_files_only", False))
        compute, weights = inference_dtypes(dtype)  # on CPU, bf16 weights under float32 compute
        params, config = mpt_from_pretrained(ckpt, dtype=weights, quantize=quantize, **load_kwargs)
        model = FlaxMptForCausalLM(config, dtype=compute, param_dtype=weights, _do_init=False,
                                   quantize=params_format(params))
        tokenizer = tokenizer or load_tokenizer(ckpt)
        draft = {}
        if draft_model:
            draft = dict(zip(("draft_model", "draft_params"), load_draft_model(draft_model, compute, weights)))
        return cls(model, params, tokenizer, max_length=max_length, max_compile_tokens=max_compile_tokens,
                   cpu_kernels=cpu_kernels, kv_dtype=kv_dtype, consume_params=True, max_loras=max_loras,
                   max_lora_rank=max_lora_rank, num_speculative_tokens=num_speculative_tokens, **draft)

    # ---------------------------------------------------------------- helpers
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"]) or [self._bos()]
        ids = [int(t) for t in prompt]
        vocab = self.engine.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _bos(self) -> int:
        for t in (getattr(self.tokenizer, "bos_token_id", None), *self.eos_ids):
            if t is not None:
                return t
        return 0

    def _run(self, prompts: list[list[int]], configs: list[SamplingConfig]) -> Iterator[tuple[int, list[int], bool]]:
        """Yields (row, new token ids, row finished) as chunks come off the device."""
        eng = self.engine
        longest = max(len(p) for p in prompts)
        P = eng.padded_length(longest) if longest < eng.max_length else 0
        S = eng.decode_cache_len(P, max(c.max_new_tokens for c in configs))
        prefix = eng.prefill_batch(prompts, configs, self.eos_ids, cache_len=S)
        state = eng.start(prefix)
        first = np.asarray(state.token)
        active = np.asarray(state.active)
        n_new = np.asarray(state.n_new)
        cancelled = np.zeros(len(prompts), bool)
        for r in range(len(prompts)):
            cancelled[r] = bool((yield r, [int(first[r])] if n_new[r] else [], not active[r]))
        active = active & ~cancelled
        while active.any():
            if cancelled.any():  # a stop string ended these rows on the host
                state = state.replace(active=jnp.asarray(active))
            state, out = eng.generate(eng.params, state, n_steps=eng.max_compile_tokens)
            out, now_active = np.asarray(out), np.asarray(state.active)
            for r in np.flatnonzero(active):
                ids = [int(t) for t in out[r] if t >= 0]
                cancelled[r] = bool((yield r, ids, not now_active[r]))
            active = now_active & ~cancelled

    def generate(self, prompt, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
                 stop=(), stop_token_ids=()):
        """One prompt (str or token ids) -> GenerationResult; a list of prompts -> a list.

        temperature 0 is greedy. Rows of a batch share the settings; the
        engine itself takes per-row settings (see SamplingConfig).
        """
        single = isinstance(prompt, str) or (len(prompt) > 0 and isinstance(prompt[0], (int, np.integer)))
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            return []
        cfg = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
                        stop_token_ids)
        results = self.generate_batch(prompts, [cfg] * len(prompts))
        return results[0] if single else results

    def generate_batch(self, prompts, configs: list[SamplingConfig]) -> list[GenerationResult]:
        t0 = time.perf_counter()
        ids = [self.encode(p) for p in prompts]
        texts = [IncrementalText(self.tokenizer, c.stop) for c in configs]
        finish = [None] * len(ids)
        ttft = None
        run = self._run(ids, configs)
        msg = None
        while True:
            try:
                r, new, done = run.send(msg)
            except StopIteration:
                break
            ttft = ttft or time.perf_counter() - t0
            for t in new:
                texts[r].push(t)
                if texts[r].stopped:
                    break
            msg = texts[r].stopped
            if texts[r].stopped:
                finish[r] = "stop"
            elif done and finish[r] is None:
                finish[r] = self.engine.finish_reason(len(ids[r]), len(texts[r].token_ids),
                                                      configs[r].max_new_tokens)
        total = time.perf_counter() - t0
        out = []
        for r, tx in enumerate(texts):
            tx.finish()
            out.append(GenerationResult(tx.text, tx.token_ids, finish[r] or "length", len(ids[r]),
                                        {"ttft_s": ttft, "total_s": total}))
        return out

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
               top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0,
               stop=(), stop_token_ids=()) -> Iterator[StreamChunk]:
        """Chunks of new text as they are generated (one dispatch of max_compile_tokens at a time)."""
        cfg = _sampling(max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop,
                        stop_token_ids)
        ids = self.encode(prompt)
        text = IncrementalText(self.tokenizer, cfg.stop)
        run = self._run([ids], [cfg])
        msg = None
        while True:
            try:
                _, new, done = run.send(msg)
            except StopIteration:
                return
            start = len(text.token_ids)
            delta = "".join(text.push(t) for t in new)
            msg = text.stopped
            if text.stopped:
                yield StreamChunk(delta, text.token_ids[start:], "stop")
                run.close()
                return
            if done:
                delta += text.finish()
                reason = self.engine.finish_reason(len(ids), len(text.token_ids), cfg.max_new_tokens)
                yield StreamChunk(delta, text.token_ids[start:], reason)
                return
            if delta or new:
                yield StreamChunk(delta, text.token_ids[start:])
