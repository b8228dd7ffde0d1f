"""JaxServerConfig: EasyDel's server keys plus easympt's limits, validated by pydantic."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class JaxServerConfig(BaseModel):
    """Unknown keys are an error that names them (pydantic `extra="forbid"`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(2059, ge=0, le=65535)
    batch_size: int = Field(8, ge=1, le=512, description="decode slots served at once")
    max_length: int = Field(2048, ge=2, description="prompt + generated tokens per request")
    max_new_tokens: int = Field(2048, ge=1)
    max_compile_tokens: int = Field(64, ge=1, description="the smallest prompt bucket (EasyDel's meaning)")
    decode_steps: int = Field(1, ge=1, description="decode steps per engine dispatch: 1 streams every token as it "
                                                   "is made (dispatches overlap with delivery, so it costs little)")
    prefill_chunk: int = Field(2048, ge=1, description="longer prompts are prefilled this many tokens at a time, "
                                                      "between decode dispatches of the other requests")
    temperature: float = Field(0.8, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    mesh_axes_names: tuple[str, ...] = ("dp", "fsdp", "tp", "sp")
    mesh_axes_shape: tuple[int, ...] = (1, -1, 1, 1)
    dtype: str = "auto"
    kv_dtype: str = Field("auto", description="KV-cache dtype (float32, bfloat16, float16 or int8: a scale per "
                                               "token and KV head); auto: the compute dtype")
    quantize: str | None = Field(None, description="weight format: int8 or int4 (weight-only; None: float)")
    max_loras: int = Field(0, ge=0, le=64, description="LoRA adapter slots (one batch mixes adapters); 0: none, "
                                                       "unless lora_modules names some")
    max_lora_rank: int = Field(16, ge=1, le=256, description="the largest adapter rank the slots hold")
    lora_modules: dict[str, str] = Field(default_factory=dict, description="LoRA adapters to load at start-up: "
                                                                           "name -> PEFT adapter directory")
    prefix_cache_bytes: int = Field(512 * 2**20, ge=0, description="automatic prefix cache: bytes of KV kept "
                                    "from earlier prompts and replies for requests that start the same (at most "
                                    "4 full contexts per decode slot); 0 turns it off")
    num_speculative_tokens: int = Field(0, ge=0, le=16, description="prompt-lookup speculative decoding: draft "
                                        "tokens copied from each request's own text and checked per step (0: off); "
                                        "a request opts out with \"speculative\": false")
    draft_model: str | None = Field(None, description="speculative decoding with a draft model: a small MPT checkpoint "
                                                      "(dir, cache or hub id) of the same vocabulary; its greedy "
                                                      "drafts replace prompt lookup (num_speculative_tokens: 4 if 0)")
    use_prefix_tokenizer: bool = True
    pre_compile: bool = True
    stream_tokens_for_gradio: bool = True
    logging: bool = True
    verbose: bool = False
    api_key: str | None = Field(default_factory=lambda: os.environ.get("EASYMPT_API_KEY") or None)
    model_name: str = "easympt-mpt"
    max_queue: int = Field(64, ge=1, description="requests waiting for a slot before 429")
    request_timeout_s: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_n: int = Field(8, ge=1, description="largest `n` accepted by the OpenAI routes")

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v):
        from easympt.kernels.quant import check_format

        return check_format(v)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str, info) -> str:
        from easympt.dtypes import resolve_dtype

        if v != "auto":
            resolve_dtype(v, info.field_name)
        return v

    @field_validator("kv_dtype")
    @classmethod
    def _kv_dtype(cls, v: str) -> str:
        from easympt.cache import resolve_kv_dtype

        if v != "auto":
            resolve_kv_dtype(v)
        return v

    @model_validator(mode="after")
    def _limits(self):
        if len(self.mesh_axes_names) != len(self.mesh_axes_shape):
            raise ValueError(f"mesh_axes_names {self.mesh_axes_names} and mesh_axes_shape "
                             f"{self.mesh_axes_shape} differ in length")
        if self.max_compile_tokens > self.max_length:
            raise ValueError("max_compile_tokens must not exceed max_length")
        if self.lora_modules and self.max_loras < len(self.lora_modules):
            self.max_loras = max(4, len(self.lora_modules))  # room for a few loaded later
        if self.prefill_chunk < self.max_compile_tokens:
            raise ValueError("prefill_chunk must be at least max_compile_tokens (the smallest prompt bucket)")
        return self
