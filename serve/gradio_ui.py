"""Gradio chat and instruct pages over the same scheduler as the REST API."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _text(content) -> str:
    """Gradio message content may be a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


def _pairs(messages: list[dict]) -> list[tuple[str, str]]:
    pairs, user = [], None
    for m in messages:
        if m["role"] == "user":
            if user is not None:
                pairs.append((user, ""))
            user = _text(m["content"])
        elif m["role"] == "assistant":
            pairs.append((user or "", _text(m["content"])))
            user = None
    return pairs


def _stream(server, prompt: str, sampling):
    """Yield the growing reply; cancel the slot when Gradio stops the generator."""
    import gradio as gr

    from easympt.serve.scheduler import EngineUnavailable, QueueFull
    from easympt.serve.server import PromptError

    try:
        ids = server.encode_prompt(prompt, sampling.max_new_tokens, truncate=True)
        handle = server.scheduler.submit(ids, sampling)
    except (PromptError, QueueFull, EngineUnavailable, ValueError) as e:
        raise gr.Error(str(e)) from None
    text, final = "", False
    try:
        for ev in handle.iter_events(timeout=server.config.request_timeout_s + 30):
            if ev.finish_reason == "error":
                raise gr.Error(ev.error or "generation failed")
            text += ev.text
            final = ev.final
            if server.config.stream_tokens_for_gradio or final:
                yield text
    finally:
        if not final:
            handle.cancel()


def _model_choices(server) -> list[str]:
    """The base model and every loaded LoRA adapter, as a request's "model" names them."""
    return [server.config.model_name, *server.adapters.loaded]


def _adapter(server, model) -> int:
    import gradio as gr

    try:
        return server.adapters.slot_for(model or None)
    except LookupError as e:
        raise gr.Error(str(e.args[0])) from None


def _model_picker(gr, server, demo):
    """A dropdown of the base model and the loaded LoRA adapters (refreshed when the page loads: adapters
    come and go at run time); hidden on a server without adapter slots."""
    picker = gr.Dropdown(_model_choices(server), value=server.config.model_name, label="Model (base or LoRA adapter)",
                         visible=bool(server.config.max_loras), elem_id="model-picker")
    demo.load(lambda: gr.Dropdown(choices=_model_choices(server)), None, picker, api_name=False)
    return picker


def _settings(gr, cfg):
    with gr.Accordion("Settings", open=False):
        system = gr.Textbox(label="System prompt", lines=2)
        temperature = gr.Slider(0.0, 2.0, value=cfg.temperature, step=0.05, label="Temperature (0 = greedy)")
        top_p = gr.Slider(0.05, 1.0, value=cfg.top_p, step=0.05, label="Top-p")
        max_tokens = gr.Slider(1, cfg.max_new_tokens, value=min(256, cfg.max_new_tokens), step=1,
                               label="Max new tokens")
    return system, temperature, top_p, max_tokens


def build_chat_ui(server):
    import gradio as gr

    cfg = server.config
    with gr.Blocks(title=f"{cfg.model_name} chat") as demo:
        gr.Markdown(f"### {cfg.model_name} — chat (easympt)")
        chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
        msg = gr.Textbox(label="Message", placeholder="Type a message and press Enter", elem_id="chat-input")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            stop = gr.Button("Stop", elem_id="chat-stop")
            retry = gr.Button("Retry", elem_id="chat-retry")
            clear = gr.Button("Clear", elem_id="chat-clear")
        system, temperature, top_p, max_tokens = _settings(gr, cfg)
        model = _model_picker(gr, server, demo)

        def add_user(message, history):
            if not message or not message.strip():
                raise gr.Error("type a message first")
            return "", list(history or []) + [{"role": "user", "content": message}]

        def reply(history, system, temperature, top_p, max_tokens, model=None):
            history = list(history or [])
            if not history or history[-1]["role"] != "user":
                return
            prompt = server.format_chat(_pairs(history[:-1]), _text(history[-1]["content"]), system or None)
            sampling = server.sampling(temperature, top_p, None, int(max_tokens), None,
                                       stop=server.chat_stop_strings(), adapter=_adapter(server, model))
            history.append({"role": "assistant", "content": ""})
            for text in _stream(server, prompt, sampling):
                history[-1] = {"role": "assistant", "content": text}
                yield history

        def drop_reply(history):
            history = list(history or [])
            while history and history[-1]["role"] == "assistant":
                history.pop()
            return history

        inputs = [chatbot, system, temperature, top_p, max_tokens, model]
        e1 = msg.submit(add_user, [msg, chatbot], [msg, chatbot], api_name="add_message").then(
            reply, inputs, chatbot, api_name="chat")
        e2 = send.click(add_user, [msg, chatbot], [msg, chatbot], api_name=False).then(
            reply, inputs, chatbot, api_name=False)
        e3 = retry.click(drop_reply, chatbot, chatbot, api_name=False).then(reply, inputs, chatbot, api_name=False)
        stop.click(None, None, None, cancels=[e1, e2, e3], api_name=False)
        clear.click(lambda: [], None, chatbot, api_name=False)
    return demo


def build_instruct_ui(server):
    import gradio as gr

    cfg = server.config
    with gr.Blocks(title=f"{cfg.model_name} instruct") as demo:
        gr.Markdown(f"### {cfg.model_name} — instruct (easympt)")
        instruction = gr.Textbox(label="Instruction", lines=4, elem_id="inst-input")
        output = gr.Textbox(label="Response", lines=10, elem_id="inst-output")
        with gr.Row():
            run = gr.Button("Run", variant="primary", elem_id="inst-run")
            stop = gr.Button("Stop", elem_id="inst-stop")
        system, temperature, top_p, max_tokens = _settings(gr, cfg)
        model = _model_picker(gr, server, demo)

        def answer(instruction, system, temperature, top_p, max_tokens, model=None):
            if not instruction or not instruction.strip():
                raise gr.Error("write an instruction first")
            prompt = server.format_instruct(system or None, instruction)
            sampling = server.sampling(temperature, top_p, None, int(max_tokens), None,
                                       stop=server.instruct_stop_strings(), adapter=_adapter(server, model))
            yield from _stream(server, prompt, sampling)

        ev = run.click(answer, [instruction, system, temperature, top_p, max_tokens, model], output,
                       api_name="instruct")
        stop.click(None, None, None, cancels=[ev], api_name=False)
    return demo


def mount(app, blocks, path: str) -> None:
    import gradio as gr

    gr.mount_gradio_app(app, blocks, path=path)


def try_share(builder, server) -> tuple[str | None, str | None]:
    """A public share link for a fresh copy of a page, or (None, why)."""
    try:
        blocks = builder(server)
        blocks.queue()
        _, _, share_url = blocks.launch(share=True, prevent_thread_lock=True, server_name="127.0.0.1",
                                        quiet=True, show_error=False)
    except Exception as e:  # no internet, blocked tunnel, missing frpc binary
        return None, f"{type(e).__name__}: {e}"
    if not share_url:
        blocks.close()
        return None, "Gradio could not reach its share service (no internet?)"
    return share_url, None
