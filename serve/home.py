"""The page at `/`: what a person who opens the server's URL sees — the model, its format and context,
links to the Gradio pages, the API docs and metrics, and a `curl` and an `openai` example to copy.

Plain HTML with a few lines of script for the copy buttons: no template engine, nothing fetched from
elsewhere (the page works offline, as the server does)."""

from __future__ import annotations

import html
import json

import jax
import jax.numpy as jnp

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1d2330; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } .sub { color: #5a6375; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; } td { padding: .25rem 1rem .25rem 0; vertical-align: top; }
td:first-child { color: #5a6375; } a { color: #1f5fbf; } ul.links { padding-left: 1.2rem; line-height: 1.7; }
pre { background: #f3f5f9; border: 1px solid #d9dee8; border-radius: 6px; padding: .8rem; overflow-x: auto; }
.example { position: relative; } button.copy { position: absolute; top: .4rem; right: .4rem; font-size: .8rem; }
.off { color: #8a91a0; }
"""

COPY_SCRIPT = """
for (const b of document.querySelectorAll("button.copy")) {
  b.addEventListener("click", async () => {
    const text = document.getElementById(b.dataset.target).innerText;
    try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
    catch (e) { b.textContent = "Select and copy"; }
    setTimeout(() => { b.textContent = "Copy"; }, 1500);
  });
}
"""


def examples(base_url: str, model: str, api_key: bool) -> dict[str, str]:
    """A curl and an openai-client example against this server (the key as a placeholder when one is set)."""
    key_header = ' \\\n  -H "Authorization: Bearer $EASYMPT_API_KEY"' if api_key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    curl = (f"curl {base_url}/v1/chat/completions{key_header} \\\n  -H 'Content-Type: application/json' \\\n"
            f"  -d '{body}'")
    key = 'os.environ["EASYMPT_API_KEY"]' if api_key else '"none"'
    openai = ("import os\n" if api_key else "") + "\n".join([
        "from openai import OpenAI", "",
        f'client = OpenAI(base_url="{base_url}/v1", api_key={key})',
        f"reply = client.chat.completions.create(model={model!r}, max_tokens=64,",
        '    messages=[{"role": "user", "content": "Hello!"}])',
        "print(reply.choices[0].message.content)"])
    return {"curl": curl, "openai": openai}


def home_page(server, base_url: str) -> str:
    """The HTML of `/` for `server`, its links and examples addressed to `base_url` (what the browser used)."""
    cfg, model, engine = server.config, server.model, server.engine
    c = model.config
    kernels = f"easympt's CPU kernels ({engine.cpu_isa})" if engine.cpu_isa else "XLA"
    facts = [
        ("weights", f"{model.weights_format} ({c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, vocabulary {c.vocab_size})"),
        ("compute", f"{jnp.dtype(model.dtype).name} on {jax.default_backend()}, weight products by {kernels}"),
        ("KV cache", jnp.dtype(engine.kv_dtype).name),
        ("context", f"{cfg.max_length} tokens per request (prompt + reply; trained at {c.max_seq_len}), "
                    f"up to {cfg.max_new_tokens} new"),
        ("batch", f"{cfg.batch_size} requests decode together"),
    ]
    gradio = server._gradio_mounted
    links = [
        ("/gradio_chat/", "Chat", "the Gradio chat page", gradio),
        ("/gradio_instruct/", "Instruct", "the Gradio instruction page", gradio),
        ("/docs", "API docs", "every route, try them in the browser", True),
        ("/metrics", "Metrics", "Prometheus", True),
        ("/status", "Status", "this server's settings as JSON", True),
    ]
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in facts)
    items = "".join(
        f'<li><a href="{e(href)}">{e(name)}</a> — {e(what)}</li>' if on else
        f'<li class="off">{e(name)} — {e(what)} (not mounted: the server runs without Gradio)</li>'
        for href, name, what, on in links)
    code = examples(base_url, cfg.model_name, bool(cfg.api_key))
    blocks = "".join(
        f'<h3>{e(title)}</h3><div class="example"><button class="copy" data-target="{key}">Copy</button>'
        f'<pre id="{key}">{e(code[key])}</pre></div>' for key, title in (("curl", "curl"), ("openai", "Python (openai)")))
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>easympt · {e(cfg.model_name)}"
            f"</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style>"
            f"</head><body><h1>{e(cfg.model_name)}</h1><p class=\"sub\">served by easympt — an MPT model in JAX</p>"
            f"<table>{rows}</table><h2>Pages</h2><ul class=\"links\">{items}</ul><h2>Use the API</h2>"
            f"<p>OpenAI-compatible (<code>/v1/completions</code>, <code>/v1/chat/completions</code>, "
            f"<code>/v1/models</code>) and EasyDel-style (<code>/chat</code>, <code>/instruct</code>).</p>{blocks}"
            f"<script>{COPY_SCRIPT}</script></body></html>")
