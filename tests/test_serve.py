"""The server over real uvicorn on 127.0.0.1: REST, OpenAI client, bad input,
concurrency, disconnects, shutdown. Random-weight model, local tokenizer."""

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from easympt.kernels import cpu
from easympt.serve import JAXServer, JaxServerConfig

from conftest import SERVER_CONFIG as CONFIG


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def wait_idle(server, timeout=30):
    deadline = time.monotonic() + timeout
    while server.scheduler.active_slots and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.scheduler.active_slots == 0


def test_config_rejects_unknown_and_bad_keys():
    with pytest.raises(ValueError, match="max_lenght"):
        JaxServerConfig(max_lenght=10)
    with pytest.raises(ValueError, match="temperature"):
        JaxServerConfig(temperature=-1)
    with pytest.raises(ValueError, match="dtype"):
        JaxServerConfig(dtype="int4")
    with pytest.raises(ValueError, match="kv_dtype 'int4' is not one of"):
        JaxServerConfig(kv_dtype="int4")
    assert JaxServerConfig(kv_dtype="int8").kv_dtype == "int8"
    assert JaxServerConfig().host == "127.0.0.1" and JaxServerConfig().port == 2059


def test_easydel_routes(client):
    r = client.post("/chat", json={"prompt": "hello", "history": [["hi", "hey"]], "system": "be brief",
                                   "temperature": 0.5, "greedy": True, "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"input", "response", "tokens_used"}
    assert "<|im_start|>system\nbe brief<|im_end|>" in body["input"]  # MPT chat = ChatML
    assert body["tokens_used"] > 12 - 1
    r = client.post("/instruct", json={"instruction": "write a loop", "greedy": True, "max_new_tokens": 5})
    assert r.status_code == 200 and "### Instruction:\nwrite a loop" in r.json()["input"]
    s = client.get("/status").json()
    assert s["status"] == "ready" and s["batch_size"] == 4 and s["prompt_buckets"][-1] == 256
    assert s["backend"] == "cpu" and s["cpu_kernels"] == cpu.active_isa()  # the instruction set; null: XLA
    assert s["dtype"] == s["kv_dtype"] == "float32"
    assert s["prefix_cache"]["block_tokens"] == 16 and s["prefix_cache"]["blocks"] > 0
    assert client.get("/health").json() == {"status": "ok"}


def test_greedy_chat_is_deterministic(client):
    body = {"prompt": "same", "greedy": True, "max_new_tokens": 16}
    assert client.post("/chat", json=body).json()["response"] == client.post("/chat", json=body).json()["response"]


def test_openai_client(server):
    from openai import OpenAI

    oa = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in oa.models.list().data] == [server.config.model_name]
    c = oa.completions.create(model=server.config.model_name, prompt=["def f(", "import"], max_tokens=6, n=2,
                              seed=3, temperature=0.9)
    assert len(c.choices) == 4 and c.usage.completion_tokens <= 24
    assert all(ch.finish_reason in ("length", "stop") for ch in c.choices)
    again = oa.completions.create(model=server.config.model_name, prompt=["def f(", "import"], max_tokens=6, n=2,
                                  seed=3, temperature=0.9)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]  # seed honoured
    chat = oa.chat.completions.create(model=server.config.model_name, max_tokens=8, temperature=0,
                                      messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 0
    stream = oa.chat.completions.create(model=server.config.model_name, max_tokens=8, temperature=0, stream=True,
                                        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}])
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    s = oa.completions.create(model=server.config.model_name, prompt="x = ", max_tokens=10, temperature=0,
                              stream=True)
    assert sum(1 for _ in s) >= 2


def test_sse_ends_with_done(client):
    with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 5, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("path, body, status, needle", [
    ("/chat", {}, 400, "prompt"),
    ("/chat", {"prompt": 5}, 400, "prompt"),
    ("/chat", {"prompt": "x", "temperature": -0.1}, 400, "temperature"),
    ("/chat", {"prompt": "x", "surprise": 1}, 400, "surprise"),
    ("/instruct", {"instruction": "x", "max_new_tokens": 10_000}, 400, "exceeds this server's limit"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, "limit 64"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ("/v1/completions", {"prompt": "x", "n": 99}, 400, "n=99"),
    ("/v1/completions", {"prompt": []}, 400, "empty"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "max_length is 256"),
])
def test_bad_input_is_a_named_4xx(client, path, body, status, needle):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_truncate_keeps_the_end_of_a_long_prompt(client):
    r = client.post("/v1/completions", json={"prompt": "word " * 400, "max_tokens": 3, "truncate": True})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 255


def test_malformed_bodies(client):
    r = client.post("/chat", content=b'{"prompt": "\xff\xfe"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = client.post("/chat", content=b'{"prompt": ', headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r = client.post("/chat", content=b"x" * 50_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "20000 bytes" in r.json()["error"]["message"]

    def chunks():
        for _ in range(30):
            yield b" " * 1000
    r = client.post("/chat", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert client.post("/chat", json={"prompt": "still alive", "max_new_tokens": 2}).status_code == 200


def test_api_key(server, client):
    server.config.api_key = "sekrit"
    try:
        assert client.post("/chat", json={"prompt": "x"}).status_code == 401
        r = client.get("/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200
        ok = client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200
    finally:
        server.config.api_key = None


def test_sixteen_concurrent_clients(server):
    results, errors = [], []

    def one(i):
        try:
            with httpx.Client(base_url=server.url, timeout=300) as c:
                r = c.post("/v1/completions", json={"prompt": f"item {i}", "max_tokens": 12, "seed": i,
                                                    "temperature": 0.8})
                results.append((i, r.status_code, r.json()["usage"]["completion_tokens"]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 16 and all(code == 200 and 1 <= n <= 12 for _, code, n in results)
    assert wait_idle(server)


def test_disconnect_mid_stream_frees_the_slot(server, monkeypatch):
    original = server.engine.generate

    def slow_generate(*args, **kwargs):  # a tiny model finishes 64 tokens before a client can leave
        out = original(*args, **kwargs)
        time.sleep(0.3)
        return out
    monkeypatch.setattr(server.engine, "generate", slow_generate)
    monkeypatch.setattr(server.device_batch, "eos_ids", ())  # the random model must not end on its own
    cancelled = server.metrics.requests.labels("cancelled")._value.get()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"prompt": "go", "max_tokens": 64, "stream": True,
                                                       "temperature": 0.9}) as r:
            it = (ln for ln in r.iter_lines() if ln)
            next(it)
            next(it)  # a token chunk: the request holds a slot now
            assert server.scheduler.active_slots == 1
    assert wait_idle(server, timeout=30)
    assert server.metrics.requests.labels("cancelled")._value.get() == cancelled + 1
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.post("/chat", json={"prompt": "after", "max_new_tokens": 2}).status_code == 200


def test_metrics(client):
    client.post("/chat", json={"prompt": "m", "max_new_tokens": 3})
    text = client.get("/metrics").text
    for name in ("easympt_generated_tokens_total", "easympt_queue_depth", "easympt_time_to_first_token_seconds",
                 "easympt_inter_token_latency_seconds", "easympt_http_requests_total"):
        assert name in text


def test_shutdown_frees_the_port(lm_checkpoint):
    srv = JAXServer.from_pretrained(lm_checkpoint, config={**CONFIG, "pre_compile": False}, progress=False)
    srv.fire()
    port = srv.config.port
    assert httpx.get(f"{srv.url}/health").status_code == 200
    srv.shutdown()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # would raise if still held


def test_port_in_use_is_a_clear_error(server, lm_checkpoint):
    srv = JAXServer.from_pretrained(lm_checkpoint, config={**CONFIG, "pre_compile": False,
                                                            "port": server.config.port}, progress=False)
    with pytest.raises(OSError, match=str(server.config.port)):
        srv.fire()
    srv.shutdown()


def test_stream_delivers_each_token_as_it_is_made(server, client):
    """decode_steps 1 (the default): one engine step per dispatch, so the SSE stream carries one
    token per chunk, not bursts of max_compile_tokens."""
    events = []
    with client.stream("POST", "/v1/completions", json={"prompt": "def f(x):", "max_tokens": 12, "temperature": 0,
                                                       "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice["text"]:
                    events.append(choice["text"])
    done = client.post("/v1/completions", json={"prompt": "def f(x):", "max_tokens": 12, "temperature": 0}).json()
    n = done["usage"]["completion_tokens"]
    assert "".join(events) == done["choices"][0]["text"]
    assert len(events) >= n - 2, (len(events), n)  # a chunk per token (a partial character may wait for the next)


def test_a_burst_of_requests_is_prefilled_in_one_pass(server):
    """Requests waiting together share one prefill (padded to the batch size with filler rows that
    are inserted nowhere), and each gets what it would get alone, prompt scores included."""
    from easympt.serve.scheduler import Scheduler

    eng = server.engine
    calls = []
    real = eng.prefill_batch

    def counting(prompts, *a, **kw):
        calls.append(len(prompts))
        return real(prompts, *a, **kw)

    def run(prompts):
        sched = Scheduler(eng, server.tokenizer, batch_size=4, eos_ids=())
        sched.device.reset()
        handles = [sched.submit(server.encode_prompt(p, 8), server.sampling(0.0, None, None, 8, 0, logprobs=1,
                                                                            prompt_logprobs=True))
                   for p in prompts]
        sched._admit()
        while sched.active_slots:
            sched._decode()
        sched._flush()
        out = []
        for h in handles:
            events = list(h.iter_events(timeout=5))
            out.append(("".join(e.text for e in events), [s.logprob for e in events for s in e.prompt_logprobs or []]))
        return out

    prompts = ["def f(x):", "import os", "class A:"]
    eng.prefill_batch = counting
    try:
        together = run(prompts)
        assert calls == [4]  # three requests, one pass, padded to the batch size
        alone = [run([p])[0] for p in prompts]
    finally:
        eng.prefill_batch = real
    for (t, lp), (t1, lp1) in zip(together, alone):
        assert t == t1
        assert lp[0] is None and np.allclose(lp[1:], lp1[1:], atol=1e-4)


def test_decode_attends_over_a_window_that_grows_with_the_rows(lm_checkpoint, monkeypatch):
    """Without the CPU kernels (XLA's attention, as on accelerators) the server decodes with the cache
    window its rows need (16, 32 slots here, then the whole cache); with them, over the slots rows
    hold and no windows. Both give the tokens of XLA's engine over the whole cache."""
    from easympt.generation import Generator
    from easympt.serve import MPTJaxServer

    gen = Generator.from_pretrained(lm_checkpoint, max_length=256, max_compile_tokens=16, dtype="fp32",
                                    progress=False, cpu_kernels=False)
    gen.eos_ids = ()
    prompt = "import os\nimport sys\n"
    want = gen.generate(prompt, max_new_tokens=60, temperature=0).token_ids
    for kernels in ("0", "1"):
        monkeypatch.setenv("EASYMPT_CPU_KERNELS", kernels)
        srv = MPTJaxServer.from_pretrained(lm_checkpoint, config={**CONFIG, "pre_compile": False}, progress=False)
        srv.device_batch.eos_ids = ()
        srv.fire()
        try:
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 60, "temperature": 0,
                                                    "logprobs": 0})
        finally:
            srv.shutdown()
        got = r.json()["choices"][0]["logprobs"]["tokens"]
        assert got == [srv.tokenizer.decode([t]) for t in want]
        eng = srv.engine
        if eng.module.cpu_kernels:
            assert eng.decode_windows(256) == (None,)
        else:
            assert eng.decode_window(20, 256) == 32 and eng.decode_window(40, 256) is None


def test_after_precompile_requests_compile_nothing(lm_checkpoint):
    """The first requests after start-up run precompiled programs only: single requests one after
    another (the decode window grows with each row) and a burst. Before, the first decode compiled
    its cache window (~1 s) and the second request's insert compiled again (~0.2 s)."""
    import jax.monitoring

    from easympt.serve import MPTJaxServer

    # rows start past 16 slots: they decode in the 32-slot window, then the whole 256-slot cache
    srv = MPTJaxServer.from_pretrained(lm_checkpoint, config={**CONFIG, "max_new_tokens": 64},
                                       progress=False)
    srv.fire()
    compiled = []
    listener = lambda event, duration, **kw: compiled.append(event) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            for i in range(3):
                r = c.post("/v1/completions", json={"prompt": f"def f{i}(x):", "max_tokens": 40, "temperature": 0.7,
                                                    "seed": i, "stream": i == 1})
                assert r.status_code == 200
            burst = [threading.Thread(target=c.post, args=("/v1/completions",),
                                      kwargs={"json": {"prompt": f"x = {i}", "max_tokens": 8}}) for i in range(4)]
            for t in burst:
                t.start()
            for t in burst:
                t.join()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        srv.shutdown()
    assert compiled == []


def test_the_page_at_root_names_the_model_and_its_examples_work_as_printed(client, server):
    """GET / is an HTML page (not a JSON 404): the model, its format and context, links to the docs,
    metrics and status, and a curl example whose request, sent as printed, is answered."""
    import html
    import re

    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert f"<h1>{server.config.model_name}</h1>" in page
    assert f"{server.config.max_length} tokens per request" in page and "KV cache" in page
    for href in ("/docs", "/metrics", "/status"):
        assert f'href="{href}"' in page
    curl = html.unescape(re.search(r'<pre id="curl">(.*?)</pre>', page, re.S).group(1))
    assert curl.startswith(f"curl {server.url}/v1/chat/completions")
    body = json.loads(re.search(r"-d '(.*)'", curl).group(1))
    answer = client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
    openai = html.unescape(re.search(r'<pre id="openai">(.*?)</pre>', page, re.S).group(1))
    assert f'OpenAI(base_url="{server.url}/v1"' in openai
    compile(openai, "example.py", "exec")  # valid Python as printed
