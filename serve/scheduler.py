"""One engine thread owns the devices and continuously batches requests.

Requests wait in a bounded queue. Whenever a decode slot is free the thread
prefills the next request and inserts it into the running batch (JetStream's
prefill / insert / generate); every dispatch then advances all active slots
by `decode_steps` tokens (1: every token streams as it is made; the next
dispatch is queued before the previous one's tokens are read, so the device
does not wait on the host). Text, stop strings and cancellation are
handled here too, so callers only read events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from easympt.generation.engine import GenerationEngine
from easympt.generation.prefix_cache import PrefixIndex
from easympt.generation.sampling import SamplingConfig
from easympt.generation.text import IncrementalText
from easympt.serve.device_batch import Admitted, DeviceBatch
from easympt.serve.lockstep import Leader

log = logging.getLogger("easympt.serve")


class QueueFull(Exception):
    """The waiting queue is at its limit (HTTP 429)."""


class EngineUnavailable(Exception):
    """The engine cannot run any more (a process of a multi-process server is gone): HTTP 503."""


@dataclass
class TokenScore:
    """One token's log-probability under the model and its `logprobs` likeliest alternatives."""

    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: list[tuple[int, float]] = field(default_factory=list)


def token_scores(lp, row: int, positions, n_top: int) -> list[TokenScore]:
    """TokenScores of host-side TokenLogprobs `lp` at lp[row, positions]."""
    return [TokenScore(int(lp.token_ids[row, p]), float(lp.chosen[row, p]),
                       [(int(i), float(v)) for i, v in zip(lp.top_ids[row, p, :n_top], lp.top[row, p, :n_top])])
            for p in positions]


@dataclass
class Event:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "timeout", "error"
    error: str | None = None
    logprobs: list[TokenScore] | None = None  # one per token_ids entry, when the request asked
    prompt_logprobs: list[TokenScore] | None = None  # first event only, when the request asked (echo)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    """What a caller holds: events arrive on an asyncio queue (from a route) or a
    plain queue (from a thread such as Gradio's)."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], sampling: SamplingConfig, loop: asyncio.AbstractEventLoop | None):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.created = time.monotonic()
        self.cancelled = threading.Event()
        self.loop = loop
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop else None
        self._q: queue.Queue | None = None if loop else queue.Queue()
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    def put(self, ev: Event) -> None:
        if self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._aq.put_nowait, ev)
            except RuntimeError:  # the route's loop is gone: the client left
                self.cancelled.set()
        else:
            self._q.put(ev)

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self):
        while True:
            ev = await self._aq.get()
            yield ev
            if ev.final:
                return

    def iter_events(self, timeout: float | None = None):
        while True:
            ev = self._q.get(timeout=timeout)
            yield ev
            if ev.final:
                return


@dataclass
class _Slot:
    handle: RequestHandle
    text: IncrementalText
    prefilling: bool = False  # a long prompt still being prefilled, one chunk per engine step
    start: int = 0  # the cache slot of the prompt's first token (prompts are left padded to their shapes)
    completion: list[int] = field(default_factory=list)  # token ids delivered so far


class Scheduler:
    PING_INTERVAL_S = 1.0  # how often an idle multi-process server checks that its followers answer

    def __init__(self, engine: GenerationEngine, tokenizer, batch_size: int, eos_ids: tuple[int, ...],
                 max_queue: int = 64, request_timeout_s: float = 600.0, metrics=None, decode_steps: int = 1,
                 device=None, prefix: PrefixIndex | None = None):
        """device: the DeviceBatch to drive (default: a new one; a multi-process server passes the
        lockstep.Leader that also sends every call to the other processes). prefix: the prefix cache's
        index over the device's block pool (None: no prefix cache)."""
        self.engine, self.tokenizer = engine, tokenizer
        self.device = device if device is not None else DeviceBatch(engine, batch_size, eos_ids)
        self.lockstep = isinstance(self.device, Leader)
        self.prefix = prefix
        self.batch_size = batch_size
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.waiting: queue.Queue[RequestHandle] = queue.Queue(maxsize=max_queue)
        self.slots: list[_Slot | None] = [None] * batch_size
        self.unavailable: str | None = None  # why the engine cannot run any more
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.decode_steps = decode_steps
        self._pending = None  # who occupied each row when the dispatch in flight was made
        self._spec_seen = 0  # the speculative counts of the last dispatch read
        self._last_delivery: float | None = None
        self._last_ping = 0.0
        self._calls: queue.Queue = queue.Queue()  # work to run on the engine thread between dispatches

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.device.eos_ids

    # ------------------------------------------------------------ public side
    def submit(self, prompt_ids: list[int], sampling: SamplingConfig,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        if self.unavailable:
            raise EngineUnavailable(self.unavailable)
        handle = RequestHandle(prompt_ids, sampling, loop)
        try:
            self.waiting.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self.waiting.maxsize} requests are already waiting; retry later") from None
        if self.metrics:
            self.metrics.queue_depth.set(self.waiting.qsize())
        return handle

    def on_engine(self, fn, timeout_s: float = 600.0):
        """fn() run on the engine thread between dispatches (it may change the engine's params), and its
        result; directly while the thread is not running."""
        if self._thread is None or not self._thread.is_alive():
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, future))
        return future.result(timeout=timeout_s)

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            self._flush()  # the dispatch in flight read the params as they were
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - the caller gets it
                future.set_exception(e)

    def forget_prefixes(self, namespace: int) -> None:
        """Drop the prefix cache's blocks made under adapter slot `namespace` (engine thread)."""
        if self.prefix is not None:
            self.prefix.drop_namespace(namespace)

    def adapters_in_use(self) -> set[int]:
        """The LoRA adapter slots running or waiting requests use."""
        handles = [s.handle for s in self.slots if s is not None] + list(self.waiting.queue)
        return {h.sampling.adapter for h in handles if h.sampling.adapter >= 0}

    def start(self) -> None:
        if self._thread is None:
            self._reset_device()
            self._thread = threading.Thread(target=self._loop, name="easympt-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._end_all("cancelled", "server shutting down")
        if self.lockstep and not self.unavailable:
            try:
                self.device.stop_followers()
            except Exception as e:  # noqa: BLE001 - already gone: nothing left to stop
                log.warning("could not stop the follower processes: %s", e)

    def _end_all(self, reason: str, error: str | None, waiting: bool = True) -> None:
        """End every running request (and with `waiting` every waiting one) with `reason`."""
        for i, s in enumerate(self.slots):
            if s is not None:
                s.handle.put(Event(finish_reason=reason, error=error))
                self.slots[i] = None
        while waiting and not self.waiting.empty():
            self.waiting.get_nowait().put(Event(finish_reason=reason, error=error))

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self.slots)

    # ------------------------------------------------------------ engine side
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._run_calls()
                self._admit()
                if self.active_slots == 0:
                    self._flush()
                    try:
                        handle = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        if self.lockstep and time.monotonic() - self._last_ping > self.PING_INTERVAL_S:
                            self.device.ping()
                            self._last_ping = time.monotonic()
                        continue
                    self._admit(first=handle)
                    continue
                self._prefill_chunks()
                if any(s is not None and not s.prefilling for s in self.slots):
                    self._decode()
                else:
                    self._flush()
            except Exception as e:  # a failed step must not take the server down
                self._pending = None
                if self.lockstep:  # the processes may no longer be in step: nothing more can run
                    self.unavailable = f"the engine stopped: {e}"
                    log.error("multi-process engine stopped; the server now answers 503: %s", e)
                    self._end_all("error", self.unavailable)
                    return
                log.exception("engine step failed")
                self._end_all("error", f"generation failed: {e}", waiting=False)
                self._reset_device()

    def _reset_device(self) -> None:
        self.device.reset()
        self._spec_seen = 0
        if self.prefix is not None:  # the pool is new and empty
            self.prefix.clear()

    def _admit(self, first: RequestHandle | None = None) -> None:
        """Start waiting requests while decode slots are free: long prompts as chunked prefills, the
        others prefilled together in one batch. If starting them fails, each request taken off the
        queue and not yet in a slot gets the error (none is left waiting for ever); the engine loop
        then handles the failure as any failed step."""
        taken: list[RequestHandle] = []
        try:
            self._admit_into(taken, first)
        except Exception as e:
            placed = {id(s.handle) for s in self.slots if s is not None}
            for handle in taken:
                if id(handle) not in placed:
                    handle.put(Event(finish_reason="error", error=f"generation failed: {e}"))
            raise

    def _admit_into(self, taken: list[RequestHandle], first: RequestHandle | None) -> None:
        batch = []
        while len(batch) < self.slots.count(None):
            if first is not None:
                handle, first = first, None
            else:
                try:
                    handle = self.waiting.get_nowait()
                except queue.Empty:
                    break
            taken.append(handle)
            if self.metrics:
                self.metrics.queue_depth.set(self.waiting.qsize())
            if handle.cancelled.is_set():
                handle.put(Event(finish_reason="cancelled"))
            elif self._start_cached(handle):
                pass
            elif len(self.engine.prefill_plan(len(handle.prompt_ids))) > 1:  # chunk by chunk, between decode steps
                slot = self.slots.index(None)
                self.device.start_long(slot, handle.prompt_ids, handle.sampling)
                self.slots[slot] = _Slot(handle, IncrementalText(self.tokenizer, handle.sampling.stop),
                                         prefilling=True, start=self._padding(len(handle.prompt_ids)))
            else:
                batch.append(handle)
        if batch:
            self._start_batch(batch)

    def _padding(self, n_prompt: int, longest: int | None = None) -> int:
        """Pad slots before a prompt of n_prompt tokens prefilled with prompts up to `longest` long."""
        return self.engine.padded_length(longest or n_prompt) - n_prompt

    def _start_cached(self, handle: RequestHandle) -> bool:
        """Start `handle` from the KV of its prompt's longest cached prefix, if the prefix cache holds
        one worth using; the rest prefills as a long prompt's chunks do. Prompts whose own scores
        are asked for (echo) prefill whole: their scores come from the prefill pass."""
        prefix = self.prefix
        if prefix is None or handle.sampling.prompt_logprobs:
            return False
        ids, namespace = handle.prompt_ids, handle.sampling.adapter
        blocks = prefix.lookup(ids, namespace)
        reused = self.engine.prefix_reuse(len(ids), len(blocks) * prefix.block_tokens)
        prefix.count(reused > 0, reused)
        if self.metrics:
            self.metrics.prefix_lookup(reused)
        if not reused:
            return False
        slot = self.slots.index(None)
        self.device.start_cached(slot, ids, handle.sampling, blocks[:-(-reused // prefix.block_tokens)], reused)
        self.slots[slot] = _Slot(handle, IncrementalText(self.tokenizer, handle.sampling.stop), prefilling=True)
        return True

    def _remember(self, slot: int, tokens: list[int], namespace: int, start: int) -> None:
        """Put the whole token blocks of decode row `slot` (`tokens` from cache slot `start` on) that the
        prefix cache lacks into it."""
        prefix = self.prefix
        if prefix is None:
            return
        evicted = prefix.evictions
        blocks = prefix.insert(tokens, namespace)
        if blocks:
            self.device.save_prefix(slot, start, blocks)
        if self.metrics:
            self.metrics.prefix_stored(prefix.evictions - evicted, prefix.used_blocks)

    def _start_batch(self, handles: list[RequestHandle]) -> None:
        """One prefill for several requests. Its row count is 1 or the batch size (dummy rows fill
        the rest and are inserted nowhere), so a burst costs one pass and two compiled shapes."""
        free = [i for i, s in enumerate(self.slots) if s is None][:len(handles)]
        rows, configs = [h.prompt_ids for h in handles], [h.sampling for h in handles]
        n = 1 if len(handles) == 1 else self.batch_size
        filler = SamplingConfig(temperature=0.0, max_new_tokens=1)
        rows += [[0]] * (n - len(handles))
        configs += [filler] * (n - len(handles))
        slots = free + [self.batch_size] * (n - len(handles))  # an out-of-range slot: the row is dropped
        admitted = self.device.admit(slots, rows, configs)
        texts = [IncrementalText(self.tokenizer, h.sampling.stop) for h in handles]
        longest = max(len(r) for r in rows)
        self._begin(slots, handles, texts, admitted, [self._padding(len(h.prompt_ids), longest) for h in handles])

    def _prefill_chunks(self) -> None:
        """One chunk of each long prompt being prefilled; a finished one joins the decode batch."""
        for slot, s in enumerate(self.slots):
            if s is None or not s.prefilling:
                continue
            if s.handle.cancelled.is_set():
                s.handle.put(Event(finish_reason="cancelled"))
                self.slots[slot] = None
                self.device.drop_long(slot)
                continue
            admitted = self.device.chunk(slot)
            if admitted is not None:
                s.prefilling = False
                self._begin([slot], [s.handle], [s.text], admitted, [s.start])

    def _begin(self, slots: list[int], handles: list[RequestHandle], texts: list[IncrementalText],
               admitted: Admitted, starts: list[int]) -> None:
        """Requests now in their decode slots (prefix row r is handles[r], its first token at cache slot
        starts[r]): report each first token, with its scores when asked (from this same prefill pass);
        the prompts' KV goes to the prefix cache."""
        firsts, active, n_new = admitted.firsts, admitted.active, admitted.n_new
        lp, plp = admitted.logprobs, admitted.prompt_logprobs
        now = time.monotonic()
        for r, (slot, handle, text) in enumerate(zip(slots, handles, texts)):
            sampling, ids = handle.sampling, handle.prompt_ids
            n_top = sampling.logprobs or 0
            first_score = prompt_scores = None
            if sampling.wants_logprobs:
                first_score = token_scores(lp, r, [0], n_top)[0]
                if sampling.prompt_logprobs:
                    P = plp.chosen.shape[1]
                    prompt_scores = [TokenScore(ids[0], None)] + token_scores(plp, r, range(P - len(ids) + 1, P), n_top)
            handle.first_token_at = now
            if self.metrics:
                self.metrics.ttft.observe(now - handle.created)
            if sampling.max_new_tokens == 0:  # scoring only (echo with max_tokens 0): the row never decodes
                self.slots[slot] = None
                handle.put(Event(finish_reason="length", logprobs=[], prompt_logprobs=prompt_scores))
                continue
            self.slots[slot] = _Slot(handle, text, start=starts[r])
            self._remember(slot, ids, sampling.adapter, starts[r])
            scores = None if sampling.logprobs is None else [first_score]
            self._deliver(slot, [int(firsts[r])] if n_new[slot] else [], finished=not active[slot], scores=scores,
                          prompt_scores=prompt_scores)

    def _decode(self) -> None:
        """Dispatch the next `decode_steps` steps of every decoding row, then deliver the previous
        dispatch's tokens while this one runs (JetStream's async dispatch): the device never waits
        for the host to detokenize, and a client hears of each token one dispatch after it is made."""
        eng = self.engine
        occupants = [s.handle if s is not None and not s.prefilling else None for s in self.slots]
        # attend over the slots rows can hold after this dispatch (prompt, tokens delivered, the
        # dispatch in flight and this one), not over the whole cache
        per_dispatch = self.decode_steps * (eng.spec_k + 1)  # speculation may take k + 1 slots a step
        need = max(eng.padded_length(len(h.prompt_ids)) + h.completion_tokens + 2 * per_dispatch + 2
                   for h in occupants if h is not None)
        window = eng.decode_window(need, self.device.cache_len)
        with_logprobs = any(h is not None and h.sampling.logprobs is not None for h in occupants)
        self.device.decode(self.decode_steps, window, with_logprobs)
        self.steps += 1
        previous, self._pending = self._pending, occupants
        if previous is not None:
            self._deliver_dispatch(previous)

    def _flush(self) -> None:
        """Deliver the dispatch still in flight (nothing else will run after it)."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            self._deliver_dispatch(previous)

    def _deliver_dispatch(self, occupants) -> None:
        done = self.device.collect()  # waits for that dispatch only
        out, lps, active = done.tokens, done.logprobs, done.active
        if self.metrics and self.engine.spec_k:
            drafted, accepted = (int(x) for x in done.spec_counts - self._spec_seen)
            self.metrics.speculated(drafted, accepted)
        self._spec_seen = done.spec_counts
        now, n_tokens = time.monotonic(), 0
        for i, s in enumerate(self.slots):
            if s is None or s.handle is not occupants[i]:  # freed, or refilled since that dispatch
                continue
            steps = [j for j, t in enumerate(out[i]) if t >= 0]
            ids = [int(out[i, j]) for j in steps]
            n_tokens += len(ids)
            n_top = s.handle.sampling.logprobs
            scores = None
            if n_top is not None:  # one step past the emitted ones: the stop token, if the row stopped on one
                scores = token_scores(lps, i, range(min(len(steps) + 1, out.shape[1])), n_top)
            self._deliver(i, ids, finished=not active[i], scores=scores)
        if self.metrics and n_tokens and self._last_delivery is not None:
            self.metrics.inter_token.observe((now - self._last_delivery) / self.decode_steps)
        self._last_delivery = now
        # rows whose request ended on the host (stop string, disconnect, timeout) stop on the device too
        stale = [i for i, s in enumerate(self.slots) if s is None and active[i]]
        if stale:
            self.device.deactivate(stale)

    def _deliver(self, slot: int, ids: list[int], finished: bool, scores: list[TokenScore] | None = None,
                 prompt_scores: list[TokenScore] | None = None) -> None:
        s = self.slots[slot]
        h = s.handle
        delta = []
        for t in ids:
            delta.append(s.text.push(t))
            s.completion.append(t)
            h.completion_tokens += 1
            if s.text.stopped:
                break
        if scores is not None:
            # the tokens shown, and a stop token that ended the row (OpenAI and vLLM report it, and
            # evaluation harnesses count on one scored token per generated one)
            stop_ids = set(self.eos_ids) | set(h.sampling.stop_token_ids)
            ended_on_stop = (finished and not s.text.stopped and len(scores) > len(delta)
                             and scores[len(delta)].token_id in stop_ids
                             and self.engine.finish_reason(len(h.prompt_ids), h.completion_tokens,
                                                           h.sampling.max_new_tokens) == "stop")
            scores = scores[:len(delta) + ended_on_stop]
        text = "".join(delta)
        if self.metrics:
            self.metrics.tokens.inc(len(ids))
        reason = None
        if s.text.stopped:
            reason = "stop"
        elif h.cancelled.is_set():
            reason = "cancelled"
        elif time.monotonic() - h.created > self.request_timeout_s:
            reason = "timeout"
        elif finished:
            text += s.text.finish()
            reason = self.engine.finish_reason(len(h.prompt_ids), h.completion_tokens, h.sampling.max_new_tokens)
        h.put(Event(text=text, token_ids=ids[:len(delta)], finish_reason=reason, logprobs=scores,
                    prompt_logprobs=prompt_scores))
        if reason is not None:
            # the reply's KV too (a chat's next turn starts with it); the last token may not be fed yet,
            # and a row that filled its cache finds its last slot rewritten by the dispatches after it
            tokens = (h.prompt_ids + s.completion[:-1])[:self.device.cache_len - 1 - s.start]
            self._remember(slot, tokens, h.sampling.adapter, s.start)
            self.slots[slot] = None
            if self.metrics:
                self.metrics.requests.labels(reason).inc()
