"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator
from starlette.exceptions import HTTPException

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
    prompt: str | list[str]
    echo: bool = False
    logprobs: None = None


class ChatMessage(StrictBody):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


def build_router(server) -> APIRouter:
    cfg = server.config
    router = APIRouter(prefix="/v1")

    def check_model(name: str | None) -> None:
        if name is not None and name != cfg.model_name:
            raise HTTPException(404, f"model {name!r} does not exist; this server serves {cfg.model_name!r}")

    def sampling_for(body: _Common, extra_stop=(), index: int = 0):
        if body.n > cfg.max_n:
            raise HTTPException(400, f"n={body.n} exceeds this server's limit {cfg.max_n}")
        limit = body.max_completion_tokens or body.max_tokens
        seed = None if body.seed is None else (body.seed + index) % 2**63
        extra = {k: v for k, v in (("min_p", body.min_p), ("repetition_penalty", body.repetition_penalty))
                 if v is not None}
        return server.sampling(body.temperature, body.top_p, body.top_k, limit, seed,
                               stop=tuple(body.stop or ()) + tuple(extra_stop), **extra)

    def usage(n_in: int, n_out: int) -> dict:
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def reason_for(r: str | None) -> str:
        return "length" if r in ("length", "timeout") else "stop"

    @router.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": int(server.started_at),
                                            "owned_by": "easympt"}]}

    @router.get("/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return {"id": cfg.model_name, "object": "model", "created": int(server.started_at), "owned_by": "easympt"}

    async def stream_events(prompt: str, sampling, truncate: bool, make_chunk, request: Request):
        ids = server.encode_prompt(prompt, sampling.max_new_tokens, truncate)
        handle = server.scheduler.submit(ids, sampling, loop=asyncio.get_running_loop())

        async def gen():
            done = False
            try:
                yield f"data: {json.dumps(make_chunk(None, None, first=True))}\n\n"
                async for ev in handle.events():
                    if await request.is_disconnected():
                        break
                    if ev.finish_reason == "error":
                        yield f"data: {json.dumps({'error': {'message': ev.error, 'type': 'server_error'}})}\n\n"
                        done = True
                        break
                    if ev.text:
                        yield f"data: {json.dumps(make_chunk(ev.text, None))}\n\n"
                    if ev.final:
                        final = make_chunk(None, reason_for(ev.finish_reason))
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
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise HTTPException(400, "prompt must not be an empty list")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) * body.n != 1:
                raise HTTPException(400, "stream=true supports one prompt with n=1")

            def chunk(text, reason, first=False):
                return {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                        "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]}
            return await stream_events(prompts[0], sampling_for(body), body.truncate, chunk, request)
        jobs = [(p, sampling_for(body, index=i)) for p in prompts for i in range(body.n)]
        results = await asyncio.gather(*(run_to_completion(server, p, s, body.truncate, request) for p, s in jobs))
        choices, n_in, n_out = [], 0, 0
        for i, ((p, _), (text, ti, to, reason)) in enumerate(zip(jobs, results)):
            choices.append({"index": i, "text": (p + text) if body.echo else text, "logprobs": None,
                            "finish_reason": reason_for(reason)})
            n_in += ti if i % body.n == 0 else 0
            n_out += to
        return {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                "choices": choices, "usage": usage(n_in, n_out)}

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if body.messages[-1].role != "user":
            raise HTTPException(400, "the last message must come from the user")
        prompt = server.format_messages([m.model_dump() for m in body.messages])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stops = server.chat_stop_strings()
        if body.stream:
            if body.n != 1:
                raise HTTPException(400, "stream=true supports n=1")

            def chunk(text, reason, first=False):
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
            return await stream_events(prompt, sampling_for(body, stops), body.truncate, chunk, request)
        results = await asyncio.gather(*(run_to_completion(server, prompt, sampling_for(body, stops, i),
                                                           body.truncate, request) for i in range(body.n)))
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "finish_reason": reason_for(reason), "logprobs": None}
                   for i, (text, _, _, reason) in enumerate(results)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                "choices": choices, "usage": usage(results[0][1], sum(r[2] for r in results))}

    return router
