"""The FastAPI app: EasyDel-style /chat, /instruct, /status, plus /health,
/metrics, auth, body limits and JSON errors. OpenAI routes live in openai_api."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from easympt.serve.scheduler import EngineUnavailable, QueueFull
from easympt.serve.server import PromptError


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SamplingFields(StrictBody):
    system: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    greedy: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0)
    truncate: bool = False
    model: str | None = None  # a loaded LoRA adapter's name (GET /v1/models); none: the base model
    speculative: bool = True  # false: no speculative decoding for this request (when the server has it)


class ChatRequest(_SamplingFields):
    prompt: str
    history: list[tuple[str, str]] = Field(default_factory=list)


class InstructRequest(_SamplingFields):
    instruction: str


class GenerationReply(BaseModel):
    input: str
    response: str
    tokens_used: int
    finish_reason: str | None = None


def error_body(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error shape; `detail` too, for FastAPI-style clients."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}, "detail": message}


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes is a 413 before any route reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await JSONResponse(error_body(413, f"request body over {self.limit} bytes"), 413)(
                scope, receive, send)
        if length is not None:  # uvicorn holds the body to its declared length
            return await self.app(scope, receive, send)
        body, more = b"", True  # chunked: read it (bounded) first, then replay it
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.limit:
                return await JSONResponse(error_body(413, f"request body over {self.limit} bytes"), 413)(
                    scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list | None = None  # TokenScores of token_ids, when the sampling asked
    prompt_logprobs: list | None = None  # TokenScores of prompt_ids, when the sampling asked (echo)


async def run_to_completion(server, prompt: str | list[int], sampling, truncate: bool,
                            request: Request | None = None) -> Completion:
    """Submit, wait, and cancel the slot if the client goes away."""
    ids = server.encode_prompt(prompt, sampling.max_new_tokens, truncate)
    handle = server.scheduler.submit(ids, sampling, loop=asyncio.get_running_loop())
    parts, reason, error, token_ids, scores, prompt_scores = [], None, None, [], [], None
    try:
        async for ev in handle.events():
            parts.append(ev.text)
            token_ids += ev.token_ids
            scores += ev.logprobs or []
            prompt_scores = prompt_scores or ev.prompt_logprobs
            reason, error = ev.finish_reason, ev.error
    finally:
        if reason is None:
            handle.cancel()
    if reason == "error":
        unavailable = server.scheduler.unavailable
        raise HTTPException(503 if unavailable else 500, unavailable or error or "generation failed")
    return Completion("".join(parts), len(ids), handle.completion_tokens, reason, ids, token_ids,
                      scores if sampling.logprobs is not None else None, prompt_scores)


def build_app(server) -> FastAPI:
    from easympt.serve.openai_api import build_router

    cfg = server.config
    app = FastAPI(title="easympt", version="0.1.0")

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if cfg.api_key and path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
                server.metrics.http.labels(path, "401").inc()
                return JSONResponse(error_body(401, "missing or wrong API key (Authorization: Bearer <key>)",
                                               "authentication_error"), 401)
        response = await call_next(request)
        route = request.scope.get("route")
        server.metrics.http.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{loc or 'body'}: {err.get('msg')}")
        first = exc.errors()[0].get("loc", ()) if exc.errors() else ()
        param = ".".join(str(p) for p in first if p != "body") or None
        return JSONResponse(error_body(400, "; ".join(problems), param=param), 400)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(PromptError)
    async def on_prompt(request: Request, exc: PromptError):
        return JSONResponse(error_body(400, str(exc)), 400)

    @app.exception_handler(ValueError)
    async def on_value(request: Request, exc: ValueError):
        return JSONResponse(error_body(400, str(exc)), 400)

    @app.exception_handler(LookupError)
    async def on_unknown(request: Request, exc: LookupError):  # an adapter name that is not loaded
        return JSONResponse(error_body(404, str(exc.args[0] if exc.args else exc), "not_found_error"), 404)

    @app.exception_handler(QueueFull)
    async def on_full(request: Request, exc: QueueFull):
        return JSONResponse(error_body(429, str(exc), "rate_limit_error"), 429, headers={"Retry-After": "1"})

    @app.exception_handler(EngineUnavailable)
    async def on_unavailable(request: Request, exc: EngineUnavailable):
        return JSONResponse(error_body(503, f"the server cannot generate: {exc}", "server_error"), 503)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception):
        import logging

        logging.getLogger("easympt.serve").exception("request to %s failed", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}", "server_error"), 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home(request: Request):
        from easympt.serve.home import home_page

        return HTMLResponse(home_page(server, str(request.base_url).rstrip("/")))

    @app.get("/health")
    async def health():
        if server.scheduler.unavailable:
            return JSONResponse({"status": "unavailable", "reason": server.scheduler.unavailable}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        server.metrics.queue_depth.set(server.scheduler.waiting.qsize())
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/status")
    async def status():
        m = server.model.config
        return {
            "model": cfg.model_name, "status": "ready", "uptime_s": round(time.time() - server.started_at, 1),
            "devices": [str(d) for d in server.params_devices()], "processes": jax.process_count(),
            "active_slots": server.scheduler.active_slots, "batch_size": cfg.batch_size,
            "queue": server.scheduler.waiting.qsize(), "max_length": cfg.max_length,
            "max_new_tokens": cfg.max_new_tokens, "max_compile_tokens": cfg.max_compile_tokens,
            "prompt_buckets": list(server.engine.buckets), "dtype": str(server.model.dtype.__name__),
            "weights_dtype": jnp.dtype(server.model.param_dtype).name,
            "weights_format": server.model.weights_format,
            "kv_dtype": jnp.dtype(server.engine.kv_dtype).name, "backend": jax.default_backend(),
            "cpu_kernels": server.engine.cpu_isa,  # the instruction set easympt's CPU kernels run, null: XLA
            "lora_adapters": {a.name: {"path": a.path, "rank": a.rank, "targets": list(a.targets)}
                              for a in server.adapters.loaded.values()},
            "max_loras": cfg.max_loras, "max_lora_rank": cfg.max_lora_rank if cfg.max_loras else None,
            "prefix_cache": server.scheduler.prefix.stats() if server.scheduler.prefix else None,
            "num_speculative_tokens": server.engine.spec_k, "draft_model": cfg.draft_model,
            "model_config": {"d_model": m.d_model, "n_heads": m.n_heads, "n_layers": m.n_layers,
                             "vocab_size": m.vocab_size, "max_seq_len": m.max_seq_len},
        }

    async def reply(prompt: str, sampling, truncate: bool, request: Request) -> GenerationReply:
        done = await run_to_completion(server, prompt, sampling, truncate, request)
        return GenerationReply(input=prompt, response=done.text, finish_reason=done.finish_reason,
                               tokens_used=done.prompt_tokens + done.completion_tokens)

    @app.post("/chat", response_model=GenerationReply)
    async def chat(body: ChatRequest, request: Request):
        prompt = server.format_chat(body.history, body.prompt, body.system)
        sampling = server.sampling(body.temperature, body.top_p, body.top_k, body.max_new_tokens, body.seed,
                                   stop=server.chat_stop_strings(), greedy=body.greedy,
                                   adapter=server.adapters.slot_for(body.model), speculate=body.speculative)
        return await reply(prompt, sampling, body.truncate, request)

    @app.post("/instruct", response_model=GenerationReply)
    async def instruct(body: InstructRequest, request: Request):
        prompt = server.format_instruct(body.system, body.instruction)
        sampling = server.sampling(body.temperature, body.top_p, body.top_k, body.max_new_tokens, body.seed,
                                   stop=server.instruct_stop_strings(), greedy=body.greedy,
                                   adapter=server.adapters.slot_for(body.model), speculate=body.speculative)
        return await reply(prompt, sampling, body.truncate, request)

    app.include_router(build_router(server))
    return app
