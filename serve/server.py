"""JAXServer: a model, its engine thread, and the HTTP app in front of it."""

from __future__ import annotations

import logging
import socket
import threading
import time

import jax
import jax.numpy as jnp

from easympt.kernels import linear
from easympt.distributed import is_leader
from easympt.dtypes import inference_dtypes
from easympt.generation.engine import GenerationEngine
from easympt.generation.prefix_cache import PrefixIndex, pool_blocks
from easympt.generation.sampling import SamplingConfig
from easympt.model import FlaxMptForCausalLM, unwrap_params
from easympt.serve.config import JaxServerConfig
from easympt.serve.device_batch import DeviceBatch
from easympt.serve.metrics import ServerMetrics
from easympt.serve.lockstep import Leader, follow
from easympt.serve.scheduler import Scheduler

log = logging.getLogger("easympt.serve")


def serving_mesh(cfg: JaxServerConfig):
    """The mesh over every device of every process, or None for one device."""
    if len(jax.devices()) == 1:
        return None
    from easympt.sharding import create_mesh

    return create_mesh(cfg.mesh_axes_shape, cfg.mesh_axes_names)


class PromptError(ValueError):
    """A prompt the server cannot take (too long, empty): HTTP 400."""


class JAXServer:
    """Serves one causal LM. Subclasses override `format_chat` / `format_instruct`."""

    def __init__(self, config: JaxServerConfig | dict | None = None):
        self.config = config if isinstance(config, JaxServerConfig) else JaxServerConfig(**(config or {}))
        self.metrics = ServerMetrics()
        self.model = self.tokenizer = self.engine = self.scheduler = self.device_batch = None
        from easympt.serve.adapters import AdapterRegistry

        self.adapters = AdapterRegistry(self)
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self._app = None
        self._gradio_mounted = False
        self._share_warned = False
        self.started_at = time.time()

    # ----------------------------------------------------------------- loading
    @classmethod
    def load_from_params(cls, params, model: FlaxMptForCausalLM, config_model, add_params_field: bool = False,
                         tokenizer=None, verbose: bool = False, do_memory_log: bool = False,
                         config: JaxServerConfig | dict | None = None, consume_params: bool = False) -> JAXServer:
        """EasyDel's entry point. `add_params_field`: `params` is (True) or is not
        (False) wrapped as {"params": tree}; both forms are accepted either way. `consume_params`:
        the server may delete `params`' matrices as it packs them for the CPU kernels (one copy of
        the weights in memory at any time; from_pretrained's own params)."""
        if tokenizer is None:
            raise ValueError("load_from_params needs a tokenizer")
        server = cls(config)
        cfg = server.config
        if not cfg.use_prefix_tokenizer:
            raise ValueError("use_prefix_tokenizer=False (right padding) is not supported: "
                             "the engine left-pads every prompt")
        # a dtype in the config: (compute, weights) for it (on CPU, bf16 weights under float32 compute)
        compute, weights = (model.dtype, model.param_dtype) if cfg.dtype == "auto" else inference_dtypes(cfg.dtype)
        params = unwrap_params(params)
        from easympt.transform.quantized import params_format, quantize_params

        quantize = params_format(params)
        if cfg.quantize is not None and quantize is None:  # float params, a quantized server: quantize them here
            params, quantize = quantize_params(params, config_model, cfg.quantize), cfg.quantize
            consume_params = True  # the quantized copy is the server's own
        elif cfg.quantize not in (None, quantize):
            raise ValueError(f"the server config asks for {cfg.quantize} weights but the params are {quantize}")
        mesh = serving_mesh(cfg)
        if mesh is not None:
            from easympt.sharding import shardings_for

            params = jax.device_put(params, shardings_for(mesh, params, config_model.get_partition_rules()))
        same = (jnp.dtype(compute) == jnp.dtype(model.dtype) and jnp.dtype(weights) == jnp.dtype(model.param_dtype)
                and model.quantize == quantize)
        if not same or mesh is not None:
            model = FlaxMptForCausalLM(config_model, dtype=compute, param_dtype=weights, _do_init=False, mesh=mesh,
                                       quantize=quantize)
        server.model, server.tokenizer = model, tokenizer
        if cfg.max_loras and jax.process_count() > 1:
            raise ValueError("LoRA adapters are served by one process; a multi-process server has none")
        draft = {}
        if cfg.draft_model:
            from easympt.generation.generator import load_draft_model

            draft = dict(zip(("draft_model", "draft_params"), load_draft_model(cfg.draft_model, model.dtype,
                                                                               model.param_dtype)))
        server.engine = GenerationEngine(model, params, max_length=cfg.max_length,
                                         max_compile_tokens=cfg.max_compile_tokens, prefill_chunk=cfg.prefill_chunk,
                                         kv_dtype=None if cfg.kv_dtype == "auto" else cfg.kv_dtype,
                                         consume_params=consume_params, max_loras=cfg.max_loras,
                                         max_lora_rank=cfg.max_lora_rank,
                                         num_speculative_tokens=cfg.num_speculative_tokens, **draft)
        del params  # on CPU the engine holds a packed copy (easympt.kernels.cpu): keep only that one
        eos = {config_model.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
        eos = tuple(sorted(i for i in eos if i is not None))
        prefix_blocks = pool_blocks(server.engine, cfg.prefix_cache_bytes, cfg.batch_size)
        server.device_batch = DeviceBatch(server.engine, cfg.batch_size, eos, prefix_blocks=prefix_blocks)
        # more than one process: this one's device calls are repeated by the others (serve/lockstep.py)
        device = Leader(server.device_batch) if jax.process_count() > 1 else server.device_batch
        server.scheduler = Scheduler(server.engine, tokenizer, cfg.batch_size, eos, max_queue=cfg.max_queue,
                                     request_timeout_s=cfg.request_timeout_s, metrics=server.metrics,
                                     decode_steps=cfg.decode_steps, device=device,
                                     prefix=PrefixIndex(prefix_blocks, server.engine.max_compile_tokens) if prefix_blocks
                                     else None)
        if verbose or cfg.verbose:
            logging.getLogger("easympt").setLevel(logging.INFO)
        for name, path in cfg.lora_modules.items():
            server.adapters.load(name, path)
        if cfg.pre_compile:
            server.compile()  # every process compiles the same programs in the same order
        if do_memory_log:
            server.log_memory()
        if is_leader():
            server.scheduler.start()
        return server

    def follow(self) -> None:
        """On a process other than 0: repeat process 0's engine calls until it shuts down."""
        if is_leader():
            raise RuntimeError("process 0 serves; follow() is for the other processes")
        follow(self.device_batch)

    @classmethod
    def from_pretrained(cls, source: str, tokenizer=None, config: JaxServerConfig | dict | None = None,
                        dtype=None, **load_kwargs) -> JAXServer:
        """Convert a Hugging Face checkpoint (dir, cache or hub id) and serve it."""
        from easympt.transform import mpt_from_pretrained
        from easympt.transform.hf_to_flax import load_tokenizer, resolve_checkpoint_dir

        cfg = config if isinstance(config, JaxServerConfig) else JaxServerConfig(**(config or {}))
        ckpt = resolve_checkpoint_dir(source)
        dtype = dtype or (None if cfg.dtype == "auto" else cfg.dtype)
        if "device" not in load_kwargs and "mesh" not in load_kwargs:
            # each process reads only the slices its own devices hold
            load_kwargs["mesh"] = serving_mesh(cfg)
        compute, weights = inference_dtypes(dtype)
        params, model_config = mpt_from_pretrained(ckpt, dtype=weights, quantize=cfg.quantize, **load_kwargs)
        from easympt.transform.quantized import params_format

        model = FlaxMptForCausalLM(model_config, dtype=compute, param_dtype=weights, _do_init=False,
                                   quantize=params_format(params))
        tokenizer = tokenizer or load_tokenizer(ckpt)
        if cfg.model_name == JaxServerConfig().model_name:
            cfg = cfg.model_copy(update={"model_name": source.rstrip("/").split("/")[-1]})
        return cls.load_from_params(params, model, model_config, tokenizer=tokenizer, config=cfg, consume_params=True)

    def compile(self) -> float:
        """Compile what serving runs before traffic: every prefill bucket and its insert (one request,
        or a burst padded to the batch size), and the decode step over every cache window the
        scheduler may choose (log-probability decodes compile when first asked for)."""
        t0 = time.perf_counter()
        eng = self.engine
        warm = SamplingConfig(temperature=0.0, max_new_tokens=1)
        B = self.config.batch_size
        windows = eng.decode_windows(eng.max_length)
        state = eng.empty_state(B)
        # twice: XLA compiles an insert into the fresh state and one into a state decode steps
        # produced as two programs (measured: the second request after start-up paid 0.23 s)
        for _ in range(2):
            for n in sorted({1, B}):
                for bucket in eng.buckets:
                    prefix = eng.prefill_batch([[0] * min(bucket, eng.max_length - 1)] * n, [warm] * n)
                    state = eng.insert(prefix, state, jax.numpy.asarray([B] * n, jax.numpy.int32))  # rows dropped
            for window in windows:
                state, _ = eng.generate(eng.params, state, n_steps=self.config.decode_steps, window=window)
        if self.device_batch.pool is not None:
            self._compile_prefix_cache(warm)
        if eng.lora is not None and len(self.adapters.loaded) < eng.lora.slots:  # the adapter update's program
            free = sorted(set(range(eng.lora.slots)) - {a.slot for a in self.adapters.loaded.values()})[0]
            eng.clear_adapter(free)
        jax.block_until_ready(jax.numpy.copy(state.active))  # DeviceBatch keeps a copy of each dispatch's rows
        took = time.perf_counter() - t0
        log.warning("precompiled %d prompt buckets %s and the decode step over %d cache windows in %.1fs",
                    len(eng.buckets), list(eng.buckets), len(windows), took)
        return took

    def _compile_prefix_cache(self, warm: SamplingConfig) -> None:
        """The prefix cache's programs: a block saved and loaded, and the rest of a prompt after a cached
        prefix prefilled in every bucket shape and inserted (into a dropped row)."""
        eng, batch = self.engine, self.device_batch
        state = eng.empty_state(self.config.batch_size)
        for bucket in eng.buckets:
            if bucket + 1 >= eng.max_length:
                continue
            cached = batch.pool.load([0], 1, batch.cache_len)
            draft = batch.draft_pool.load([0], 1, batch.cache_len) if batch.draft_pool else None
            job = eng.start_prefill([[0] * (bucket + 1)], [warm], cache_len=batch.cache_len, cached=cached,
                                    draft_cached=draft)
            while not job.done:
                job.step()
            state = eng.insert(job.prefix, state, jax.numpy.asarray([self.config.batch_size], jax.numpy.int32))
        # as for inserts: a fresh pool and one a save produced are two programs
        for _ in range(2):
            batch.save_prefix_of(state, 0, 0, [(0, batch.pool.n_blocks)])  # a pool id past the pool: dropped
        for pool in (batch.pool, batch.draft_pool):
            if pool is not None:
                jax.block_until_ready(pool.load([0], 1, batch.cache_len).index)
                pool.clear()

    def log_memory(self) -> None:
        for d in jax.local_devices():
            try:
                stats = d.memory_stats() or {}
            except Exception:
                stats = {}
            used = stats.get("bytes_in_use")
            log.warning("device %s: %s", d, f"{used / 2**30:.2f} GiB in use" if used else "no memory stats")
        n = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(self.engine.params))
        log.warning("parameters: %.1f MiB", n / 2**20)

    # ---------------------------------------------------------------- prompts
    def format_chat(self, history: list, prompt: str, system: str | None) -> str:
        """history: [[user, assistant], ...]. Plain-text turns; MPTJaxServer uses ChatML."""
        parts = [system.strip() + "\n\n"] if system else []
        for user, assistant in history:
            parts.append(f"User: {user}\nAssistant: {assistant}\n")
        parts.append(f"User: {prompt}\nAssistant:")
        return "".join(parts)

    def format_instruct(self, system: str | None, instruction: str) -> str:
        return (system.strip() + "\n\n" if system else "") + f"{instruction}\n"

    def format_messages(self, messages: list[dict]) -> str:
        """OpenAI messages -> prompt, through format_chat (system, history pairs, last user turn)."""
        system = "\n".join(m["content"] for m in messages if m["role"] in ("system", "developer")) or None
        turns = [m for m in messages if m["role"] in ("user", "assistant")]
        history, pending = [], None
        for m in turns[:-1]:
            if m["role"] == "user":
                if pending is not None:
                    history.append((pending, ""))
                pending = m["content"]
            else:
                history.append((pending or "", m["content"]))
                pending = None
        if pending is not None:
            history.append((pending, ""))
        return self.format_chat(history, turns[-1]["content"], system)

    def chat_stop_strings(self) -> tuple[str, ...]:
        """Where a chat reply ends: the start of the next user turn."""
        return ("\nUser:",)

    def instruct_stop_strings(self) -> tuple[str, ...]:
        return ()

    @property
    def params(self):
        """The model's parameters, as `self.model` takes them. On CPU the engine runs a packed copy
        (easympt.kernels.cpu); this then builds a plain one on each access."""
        if self.engine is None:
            return None
        if not self.engine.module.cpu_kernels:
            return self.engine.params
        return linear.unpack_params(self.engine.params, self.model.params_shape())

    def params_devices(self):
        return sorted({d for x in jax.tree_util.tree_leaves(self.engine.params) for d in x.devices()}, key=str)

    def encode_prompt(self, prompt: str | list[int], max_new_tokens: int, truncate: bool = False) -> list[int]:
        """Token ids of a text prompt, or a token-id prompt (OpenAI allows both) checked against the
        vocabulary; either must leave room in max_length."""
        if isinstance(prompt, str):
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise PromptError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if not ids:
            raise PromptError("the prompt is empty after tokenization")
        limit = self.config.max_length - 1
        if len(ids) > limit:
            if not truncate:
                raise PromptError(f"prompt has {len(ids)} tokens; max_length is {self.config.max_length} "
                                  "(ask with \"truncate\": true to keep the end of the prompt)")
            ids = ids[-limit:]
        padded = self.engine.padded_length(len(ids))
        if padded > self.config.max_length:  # a long prompt's last chunk is padded to a prompt bucket
            raise PromptError(f"prompt has {len(ids)} tokens, which take {padded} cache slots once padded to "
                              f"the prefill shapes; max_length is {self.config.max_length}")
        return ids

    def sampling(self, temperature=None, top_p=None, top_k=None, max_new_tokens=None, seed=None, stop=(),
                 greedy: bool = False, **extra) -> SamplingConfig:
        c = self.config
        max_new = c.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new > c.max_new_tokens:
            raise PromptError(f"max tokens {max_new} exceeds this server's limit {c.max_new_tokens}")
        return SamplingConfig(
            temperature=0.0 if greedy else (c.temperature if temperature is None else temperature),
            top_p=c.top_p if top_p is None else top_p, top_k=c.top_k if top_k is None else top_k,
            seed=seed if seed is not None else int.from_bytes(__import__("os").urandom(4), "little"),
            max_new_tokens=max_new, stop=tuple(stop or ()), **extra)

    def generate_text(self, prompt: str, sampling: SamplingConfig, truncate: bool = False):
        """Blocking generation from any thread: (text, prompt_tokens, completion_tokens, finish_reason)."""
        ids = self.encode_prompt(prompt, sampling.max_new_tokens, truncate)
        handle = self.scheduler.submit(ids, sampling)
        text, reason = [], None
        for ev in handle.iter_events(timeout=self.config.request_timeout_s + 30):
            text.append(ev.text)
            reason = ev.finish_reason
        return "".join(text), len(ids), handle.completion_tokens, reason

    # ------------------------------------------------------------------- http
    @property
    def app(self):
        if self._app is None:
            from easympt.serve.routes import build_app

            self._app = build_app(self)
        return self._app

    def fire(self) -> JAXServer:
        """Start uvicorn in a background thread; return once the port accepts connections."""
        import uvicorn

        if self._thread is not None:
            return self
        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot serve on {self.config.host}:{self.config.port}: {e.strerror}") from None
        self.config.port = sock.getsockname()[1]  # the real one when 0 asked the OS to choose
        cfg = uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="warning",
                             lifespan="off", timeout_graceful_shutdown=2)
        self._uvicorn = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="easympt-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._thread = None
                sock.close()
                raise OSError(f"uvicorn did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        log.warning("easympt serving %s on http://%s:%d", self.config.model_name, self.config.host,
                    self.config.port)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def launch(self, share_chat: bool = False, share_inst: bool = False) -> dict:
        """Mount the Gradio chat and instruct pages; returns {"chat": url, "inst": url}.

        A share link needs the internet; where it cannot be made the local
        URL is returned and the reason logged once.
        """
        from easympt.serve.gradio_ui import build_chat_ui, build_instruct_ui, mount, try_share

        if self._thread is None:
            self.fire()
        chat, inst = build_chat_ui(self), build_instruct_ui(self)
        if not self._gradio_mounted:
            mount(self.app, chat, "/gradio_chat")
            mount(self.app, inst, "/gradio_instruct")
            self._gradio_mounted = True
        urls = {"chat": f"{self.url}/gradio_chat/", "inst": f"{self.url}/gradio_instruct/"}
        import httpx

        for url in urls.values():  # uvicorn's lifespan already ran: start the pages' queues by hand
            httpx.get(url + "gradio_api/startup-events", timeout=30, headers=self._auth_header())
        for key, builder, wanted in (("chat", build_chat_ui, share_chat), ("inst", build_instruct_ui, share_inst)):
            if wanted:
                link, why = try_share(builder, self)
                if link:
                    urls[key] = link
                elif not self._share_warned:
                    log.warning("no Gradio share link (%s); the local pages still work: %s", why, urls)
                    self._share_warned = True
        return urls

    def _auth_header(self) -> dict:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def shutdown(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.scheduler is not None:
            self.scheduler.stop()

    def port_is_free(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex((self.config.host, self.config.port)) != 0
