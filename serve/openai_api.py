"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from easympt.generation.sampling import MAX_LOGPROBS
from easympt.serve.routes import StrictBody, run_to_completion


class _Common(StrictBody):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    user: str | None = None
    truncate: bool = False  # easympt extension: keep the end of an over-long prompt
    speculative: bool = True  # easympt extension: false opts out of the server's speculative decoding
    # accepted for compatibility; they change nothing easympt computes
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream_options: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, 0, 0.0):
            raise ValueError(f"{info.field_name} is not supported; use repetition_penalty")
        return v


class CompletionRequest(_Common):
    # text, texts, token ids, or lists of token ids (as OpenAI and vLLM accept; evaluation harnesses send ids)
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt, generate nothing

    @model_validator(mode="after")
    def _scoring(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 generates nothing; it needs echo: true (to score the prompt)")
        if self.echo and self.stream:
            raise ValueError("echo: streaming does not echo the prompt; ask without stream")
        return self


class LoadLoraRequest(StrictBody):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(StrictBody):
    lora_name: str = Field(min_length=1)


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _alternatives(tokenizer, score) -> dict[str, float]:
    top: dict[str, float] = {}
    for i, lp in score.top:  # two ids may decode alike: keep the likelier
        key = _token_text(tokenizer, i)
        top[key] = max(top.get(key, float("-inf")), lp)
    return top


def completion_logprobs(tokenizer, scores, offset: int = 0) -> dict:
    """OpenAI's legacy completions shape; text_offset counts from the start of the choice's text
    (the prompt's when echoed), plus `offset` for a stream's later chunks."""
    tokens = [_token_text(tokenizer, s.token_id) for s in scores]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [s.logprob for s in scores],
            "top_logprobs": [None if s.logprob is None else _alternatives(tokenizer, s) for s in scores],
            "text_offset": offsets}


def chat_logprobs(tokenizer, scores, n_top: int) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token_id, lp):
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(s.token_id, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top[:n_top]]}
                        for s in scores]}


def build_router(server) -> APIRouter:
    cfg = server.config
    router = APIRouter(prefix="/v1")

    def check_model(name: str | None) -> int:
        """The LoRA adapter slot `name` picks (-1: the base model); an unknown name is a 404 naming it."""
        try:
            return server.adapters.slot_for(name)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None

    def sampling_for(body: _Common, extra_stop=(), index: int = 0, logprobs: int | None = None,
                     echo: bool = False):
        if body.n > cfg.max_n:
            raise HTTPException(400, f"n={body.n} exceeds this server's limit {cfg.max_n}")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        seed = None if body.seed is None else (body.seed + index) % 2**63
        extra = {k: v for k, v in (("min_p", body.min_p), ("repetition_penalty", body.repetition_penalty))
                 if v is not None}
        extra.update(logprobs=logprobs, prompt_logprobs=echo, adapter=check_model(body.model),
                     speculate=body.speculative)
        return server.sampling(body.temperature, body.top_p, body.top_k, limit, seed,
                               stop=tuple(body.stop or ()) + tuple(extra_stop), **extra)

    def usage(n_in: int, n_out: int) -> dict:
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def reason_for(r: str | None) -> str:
        return "length" if r in ("length", "timeout") else "stop"

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": int(server.started_at), "owned_by": "easympt",
                "root": name, "parent": None}
        adapter = server.adapters.loaded.get(name)
        if adapter is not None:
            card.update(created=adapter.created, root=adapter.path, parent=cfg.model_name)
        return card

    @router.get("/models")
    async def models():
        """The base model and every loaded LoRA adapter (vLLM's shape: an adapter's parent is the base)."""
        return {"object": "list", "data": [model_card(n) for n in (cfg.model_name, *server.adapters.loaded)]}

    @router.get("/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card(name)

    @router.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        """vLLM's route: load a PEFT adapter directory under a name requests then pick with "model"."""
        try:
            entry = await asyncio.to_thread(server.adapters.load, body.lora_name, body.lora_path)
        except ValueError as e:  # a bad adapter, a duplicate name, no free slot: named in the message
            raise HTTPException(400, str(e)) from None
        return {"status": "loaded", "lora_name": entry.name, "lora_path": entry.path, "rank": entry.rank,
                "targets": list(entry.targets)}

    @router.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        try:
            server.adapters.unload(body.lora_name)
        except LookupError as e:
            raise HTTPException(404, str(e)) from None
        return {"status": "unloaded", "lora_name": body.lora_name}

    async def stream_events(prompt: str | list[int], sampling, truncate: bool, make_chunk):
        ids = server.encode_prompt(prompt, sampling.max_new_tokens, truncate)
        handle = server.scheduler.submit(ids, sampling, loop=asyncio.get_running_loop())

        async def gen():
            # A client that leaves cancels this generator (Starlette's StreamingResponse listens for
            # the disconnect beside the stream), and `finally` frees its slot; asking
            # request.is_disconnected() per event cost ~10% of the HTTP thread under 16 streams.
            done = False
            try:
                yield f"data: {json.dumps(make_chunk(None, None, None, first=True))}\n\n"
                async for ev in handle.events():
                    if ev.finish_reason == "error":
                        yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error'}})}\n\n"
                        done = True
                        break
                    if ev.text or ev.logprobs:
                        yield f"data: {json.dumps(make_chunk(ev.text, None, ev.logprobs))}\n\n"
                    if ev.final:
                        final = make_chunk(None, reason_for(ev.finish_reason), None)
                        final["usage"] = usage(len(ids), handle.completion_tokens)
                        yield f"data: {json.dumps(final)}\n\n"
                        done = True
                yield "data: [DONE]\n\n"
            finally:
                if not done:
                    handle.cancel()  # the client went away: free the slot

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        served = body.model or cfg.model_name
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
        if not prompts:
            raise HTTPException(400, "prompt must not be an empty list")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        tok = server.tokenizer
        if body.stream:
            if len(prompts) * body.n != 1:
                raise HTTPException(400, "stream=true supports one prompt with n=1")
            offset = 0

            def chunk(text, reason, scores, first=False):
                nonlocal offset
                lp = None
                if body.logprobs is not None and scores:
                    lp = completion_logprobs(tok, scores, offset)
                    offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                return {"id": cid, "object": "text_completion", "created": created, "model": served,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": lp}]}
            return await stream_events(prompts[0], sampling_for(body, logprobs=body.logprobs), body.truncate, chunk)
        jobs = [(p, sampling_for(body, index=i, logprobs=body.logprobs, echo=body.echo))
                for p in prompts for i in range(body.n)]
        results = await asyncio.gather(*(run_to_completion(server, p, s, body.truncate, request) for p, s in jobs))
        choices, n_in, n_out = [], 0, 0
        for i, ((p, _), done) in enumerate(zip(jobs, results)):
            text, scores = done.text, done.logprobs
            if body.echo:
                text = (p if isinstance(p, str) else tok.decode(done.prompt_ids)) + text
                scores = done.prompt_logprobs + (scores or [])
            choices.append({"index": i, "text": text, "finish_reason": reason_for(done.finish_reason),
                            "logprobs": None if body.logprobs is None else completion_logprobs(tok, scores)})
            n_in += done.prompt_tokens if i % body.n == 0 else 0
            n_out += done.completion_tokens
        return {"id": cid, "object": "text_completion", "created": created, "model": served,
                "choices": choices, "usage": usage(n_in, n_out)}

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        served = body.model or cfg.model_name
        if body.messages[-1].role != "user":
            raise HTTPException(400, "the last message must come from the user")
        prompt = server.format_messages([m.model_dump() for m in body.messages])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stops = server.chat_stop_strings()
        n_top = body.top_logprobs or 0
        want = n_top if body.logprobs else None
        if body.stream:
            if body.n != 1:
                raise HTTPException(400, "stream=true supports n=1")

            def chunk(text, reason, scores, first=False):
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
                if body.logprobs:
                    choice["logprobs"] = chat_logprobs(server.tokenizer, scores, n_top) if scores else None
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served,
                        "choices": [choice]}
            return await stream_events(prompt, sampling_for(body, stops, logprobs=want), body.truncate, chunk)
        results = await asyncio.gather(*(run_to_completion(server, prompt, sampling_for(body, stops, i, logprobs=want),
                                                           body.truncate, request) for i in range(body.n)))
        choices = [{"index": i, "message": {"role": "assistant", "content": done.text},
                    "finish_reason": reason_for(done.finish_reason),
                    "logprobs": chat_logprobs(server.tokenizer, done.logprobs, n_top) if body.logprobs else None}
                   for i, done in enumerate(results)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": served,
                "choices": choices, "usage": usage(results[0].prompt_tokens, sum(r.completion_tokens for r in results))}

    return router
