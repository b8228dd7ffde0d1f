"""The LoRA adapters a server holds: names -> the engine's adapter slots (vLLM's `--lora-modules`,
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter`).

An adapter's files are read and checked on the caller's thread (a bad adapter is the caller's error,
not the engine's); writing it into its slot runs on the engine thread between dispatches, so no
decode step ever sees half an adapter. A slot is reused only once no running or waiting request
names it: unloading takes the name away at once, and requests already running keep their adapter
to the end.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


class AdapterError(ValueError):
    """A load or unload the server refuses (HTTP 400; an unknown name is a LookupError, 404)."""


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str
    slot: int
    rank: int
    targets: tuple[str, ...]
    created: int


class AdapterRegistry:
    def __init__(self, server):
        self.server = server
        self.loaded: dict[str, LoadedAdapter] = {}
        self._lock = threading.Lock()

    @property
    def slots(self) -> int:
        spec = self.server.engine.lora
        return 0 if spec is None else spec.slots

    def slot_for(self, model: str | None) -> int:
        """The adapter slot a request's "model" names: -1 for the base model (or none given)."""
        if model is None or model == self.server.config.model_name:
            return -1
        found = self.loaded.get(model)
        if found is None:
            names = [self.server.config.model_name, *self.loaded]
            raise LookupError(f"model {model!r} does not exist; this server serves {', '.join(map(repr, names))}")
        return found.slot

    def load(self, name: str, path: str) -> LoadedAdapter:
        from easympt.adapters import load_adapter

        if self.slots == 0:
            raise AdapterError("this server has no LoRA adapter slots: start it with --max-loras N (or --lora)")
        if not name or name == self.server.config.model_name:
            raise AdapterError(f"lora_name {name!r} must be non-empty and differ from the base model's name")
        tree, spec = load_adapter(path, self.server.model.config)  # ValueError naming the problem
        rank = self.server.engine.lora.rank
        if spec.rank > rank:
            raise AdapterError(f"{path}: adapter rank {spec.rank} exceeds this server's max_lora_rank {rank}")
        with self._lock:
            if name in self.loaded:
                raise AdapterError(f"a LoRA adapter named {name!r} is already loaded; unload it first")
            slot = self._free_slot()
            entry = LoadedAdapter(name, path, slot, spec.rank, spec.targets, int(time.time()))
            scheduler = self.server.scheduler

            def put():  # the slot's new weights: KV cached under its old ones no longer applies
                self.server.engine.set_adapter(slot, tree, spec)
                scheduler.forget_prefixes(slot)

            scheduler.on_engine(put)
            self.loaded[name] = entry
        return entry

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self.loaded:
                raise LookupError(f"no LoRA adapter named {name!r} is loaded")
            del self.loaded[name]

    def _free_slot(self) -> int:
        named = {a.slot for a in self.loaded.values()}
        busy = self.server.scheduler.adapters_in_use()
        for slot in range(self.slots):
            if slot not in named and slot not in busy:
                return slot
        why = "hold loaded adapters" if len(named) == self.slots else "hold adapters or serve requests still using one"
        raise AdapterError(f"all {self.slots} LoRA adapter slots {why}: unload one (or start the server with a "
                           "larger --max-loras)")
