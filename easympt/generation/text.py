"""Token ids -> text, incrementally, with exact stop-string cuts.

Streaming must never show text that a stop string later removes, nor half a
UTF-8 character: new text is released only once no stop string can still
begin inside it and the tokenizer no longer yields U+FFFD at the end.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""  # decoded so far (may run past a stop string until cut)
        self.released = 0  # chars of `text` handed out
        self.stopped = False
        self._prefix, self._read = 0, 0  # vLLM-style offsets: decode a short window, not everything

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to show."""
        if self.stopped:
            return ""
        self.token_ids.append(int(token_id))
        before = self._decode(self.token_ids[self._prefix:self._read])
        full = self._decode(self.token_ids[self._prefix:])
        if len(full) > len(before) and not full.endswith("\ufffd"):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += full[len(before):]
            self._prefix, self._read = self._read, len(self.token_ids)
            cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[:min(cuts)]
                self.stopped = True
        return self._release(final=self.stopped)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            for s in self.stop:  # hold back a tail that could still grow into a stop string
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        out = self.text[self.released:safe]
        self.released = max(self.released, safe)
        return out

    def finish(self) -> str:
        """The rest of the text once generation ended."""
        if not self.stopped and self._read < len(self.token_ids):
            self.text += self._decode(self.token_ids[self._prefix:])[len(
                self._decode(self.token_ids[self._prefix:self._read])):]
            self._read = len(self.token_ids)
        return self._release(final=True)
