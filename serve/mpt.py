"""MPTJaxServer: MPT's own prompt formats.

mpt-7b-chat / mpt-30b-chat were tuned on ChatML; mpt-7b-instruct on the
Dolly-style "### Instruction / ### Response" template. A tokenizer that
carries its own `chat_template` wins over the built-in ChatML.
"""

from __future__ import annotations

from easympt.serve.server import JAXServer

INSTRUCT_PREAMBLE = ("Below is an instruction that describes a task. "
                     "Write a response that appropriately completes the request.")


def chatml(messages: list[dict]) -> str:
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(out) + "<|im_start|>assistant\n"


def dolly_instruct(system: str | None, instruction: str) -> str:
    """mpt-7b-instruct's prompt (also what the bundled demo model was tuned on)."""
    return f"{system or INSTRUCT_PREAMBLE}\n### Instruction:\n{instruction}\n### Response:\n"


class MPTJaxServer(JAXServer):
    def _messages(self, history, prompt, system) -> list[dict]:
        msgs = [{"role": "system", "content": system}] if system else []
        for user, assistant in history:
            msgs.append({"role": "user", "content": user})
            msgs.append({"role": "assistant", "content": assistant})
        msgs.append({"role": "user", "content": prompt})
        return msgs

    def format_messages(self, messages: list[dict]) -> str:
        msgs = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return chatml(msgs)

    def format_chat(self, history, prompt, system) -> str:
        return self.format_messages(self._messages(history, prompt, system))

    def format_instruct(self, system, instruction) -> str:
        return dolly_instruct(system, instruction)

    def chat_stop_strings(self) -> tuple[str, ...]:
        return ("<|im_end|>", "<|im_start|>")

    def instruct_stop_strings(self) -> tuple[str, ...]:
        return ("### Instruction:",)
