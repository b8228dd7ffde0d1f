"""`easympt ...` subcommands: parse, call the library, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_quantize(p: argparse.ArgumentParser, what: str = "weights quantized as they load") -> None:
    p.add_argument("--quantize", default=None, choices=("int8", "int4"),
                   help=f"8- or 4-bit weight-only format ({what}; int8: a scale per output channel, int4: "
                        "llama.cpp Q4_0-style groups of 32)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: fp32 on CPU, bf16 on GPU/TPU)")
    p.add_argument("--kv-dtype", dest="kv_dtype", default=None,
                   help="KV-cache dtype (default: --dtype): bf16 under fp32 halves what a long-context step "
                        "reads, int8 (a scale per token and KV head) quarters it")
    _add_quantize(p)
    p.add_argument("--max-length", type=int, default=2048, help="prompt + generated tokens per request")
    p.add_argument("--max-compile-tokens", type=int, default=64,
                   help="the smallest prompt bucket (for generate also the decode steps per dispatch)")


def cmd_generate(args) -> int:
    from easympt.generation import Generator

    if len(args.model_prompt) > 2:
        raise ValueError("expected MODEL PROMPT or just PROMPT (quote a prompt that has spaces)")
    if len(args.model_prompt) == 1:
        from easympt.demo import demo_checkpoint

        model, prompt = demo_checkpoint(), args.model_prompt[0]
    else:
        model, prompt = args.model_prompt
    gen = Generator.from_pretrained(model, dtype=args.dtype, max_length=args.max_length,
                                    max_compile_tokens=args.max_compile_tokens, kv_dtype=args.kv_dtype,
                                    quantize=args.quantize)
    if args.verbose:
        print(f"[{gen.engine.describe()}]", file=sys.stderr)
    reason = None
    for chunk in gen.stream(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        reason = chunk.finish_reason or reason
    sys.stdout.write("\n")
    print(f"[finish_reason: {reason}]", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    """Hugging Face checkpoint <-> easympt checkpoint (orbax), or HF -> HF
    (re-shard, re-type, .bin -> safetensors). The source format is detected."""
    import jax

    from easympt.checkpoint import is_easympt_checkpoint, load_params, save_params
    from easympt.transform import mpt_from_pretrained, mpt_to_pretrained
    from easympt.transform.hf_to_flax import resolve_checkpoint_dir
    from easympt.transform.quantized import params_format, save_quantized

    src_is_easympt = is_easympt_checkpoint(args.src)
    to = args.to or ("hf" if src_is_easympt else "easympt" if args.dst.endswith(".easympt") else "hf")
    if args.quantize and (src_is_easympt or to != "easympt"):
        raise ValueError("--quantize converts a Hugging Face checkpoint into a quantized easympt one: give an HF "
                         "source and a DST ending in .easympt (or --to easympt); Hugging Face's MptForCausalLM "
                         "has no 8- or 4-bit weights")
    mesh = None
    if jax.process_count() > 1:  # each process reads and writes only the slices its devices hold
        from easympt.sharding import create_mesh

        mesh = create_mesh()
    if src_is_easympt:
        params, config = load_params(args.src, dtype=args.dtype or "fp32", mesh=mesh)
        src = None
    else:
        src = resolve_checkpoint_dir(args.src)
        params, config = mpt_from_pretrained(src, dtype=args.dtype or "fp32", mesh=mesh, quantize=args.quantize)
    if args.merge_lora:
        if params_format(params):
            raise ValueError("--merge-lora merges an adapter into float weights: give a float source, without "
                             "--quantize")
        from easympt.adapters import load_adapter, lora

        adapter, spec = load_adapter(args.merge_lora, config)
        params = lora.merged_kernels(lora.merge(params, adapter), spec)
    if params_format(params) and to == "easympt":  # 8 or 4 bits: the quantized checkpoint, which loads as is
        out = save_quantized(params, config, args.dst, tokenizer=_tokenizer_or_none(src))
    elif to == "easympt":
        out = save_params(params, config, args.dst)
    else:
        out = mpt_to_pretrained(params, config, args.dst, max_shard_size=args.max_shard_size,
                                tokenizer=_tokenizer_or_none(src), dtype=args.dtype, dequantize=args.dequantize)
    print(f"wrote {to} checkpoint {out}")
    return 0


def _tokenizer_or_none(src):
    if src is None:
        return None
    try:
        from easympt.transform.hf_to_flax import load_tokenizer

        return load_tokenizer(src)
    except Exception as e:  # a weights-only checkpoint is fine to convert
        print(f"note: no tokenizer copied ({type(e).__name__})", file=sys.stderr)
        return None


def mesh_shape(text) -> tuple[int, ...]:
    """'1,-1,1,1' -> (1, -1, 1, 1): dp,fsdp,tp,sp sizes, one of them -1 for the remaining devices."""
    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or any(x == 0 or x < -1 for x in sizes):
        raise ValueError(f"mesh {text!r}: give dp,fsdp,tp,sp sizes, e.g. 1,-1,1,1 (-1: the remaining devices)")
    return sizes


def cmd_train(args) -> int:
    import dataclasses
    import json

    from easympt.training.run import run_training
    from easympt.training.trainer import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    run_keys = ("model", "data", "eval_data", "export", "eval_fraction", "mesh")  # settings outside TrainConfig
    settings = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as fh:
            settings = yaml.safe_load(fh) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
    for key in run_keys:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    unknown = set(settings) - fields - set(run_keys)
    if unknown:
        raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
    for need in ("model", "data", "output_dir"):
        if not settings.get(need):
            raise ValueError(f"missing setting {need!r} (flag or --config)")
    model, data = settings.pop("model"), settings.pop("data")
    eval_data, export = settings.pop("eval_data", None), settings.pop("export", None)
    eval_fraction = float(settings.pop("eval_fraction", 0.1))
    mesh = settings.pop("mesh", None)
    result = run_training(model, data, TrainConfig(**settings), eval_data=eval_data, eval_fraction=eval_fraction,
                          export_dir=export, mesh_shape=mesh_shape(mesh) if mesh else None)
    print(json.dumps(result))
    return 0


def _name_and_dir(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora {spec!r}: give NAME=DIR (a PEFT adapter directory)")
    return name, path


def cmd_serve(args) -> int:
    import logging
    import signal
    import time

    from easympt.serve import JaxServerConfig, MPTJaxServer

    # Ctrl-C (SIGINT) stops the server even when the parent started it with SIGINT ignored, as a
    # script's background jobs and pytest-xdist's workers do: an ignored signal is inherited across
    # exec, and Python then never raises KeyboardInterrupt (the two-process test hung on it)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    source = args.model
    if source is None:
        from easympt.demo import demo_checkpoint

        source = demo_checkpoint()
        print(f"no MODEL given: serving the bundled demo model at {source}", file=sys.stderr)
    overrides = {"host": args.host, "port": args.port, "max_length": args.max_length,
                 "max_compile_tokens": args.max_compile_tokens, "batch_size": args.batch_size,
                 "prefill_chunk": args.prefill_chunk, "decode_steps": args.decode_steps,
                 "pre_compile": not args.no_precompile}
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.kv_dtype:
        overrides["kv_dtype"] = args.kv_dtype
    if args.quantize:
        overrides["quantize"] = args.quantize
    if args.max_new_tokens:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.lora:
        overrides["lora_modules"] = dict(_name_and_dir(spec) for spec in args.lora)
    for key in ("max_loras", "max_lora_rank", "prefix_cache_bytes", "num_speculative_tokens", "draft_model"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.mesh:
        overrides["mesh_axes_shape"] = mesh_shape(args.mesh)
    if args.api_key:
        overrides["api_key"] = args.api_key
    config = JaxServerConfig(**overrides)
    server = MPTJaxServer.from_pretrained(source, config=config)
    import jax

    if jax.process_index() != 0:  # process 0 serves HTTP; this one repeats its engine calls
        print(f"easympt process {jax.process_index()} of {jax.process_count()}: following process 0, which "
              "serves HTTP", flush=True)
        try:
            server.follow()
        except RuntimeError as e:
            print(f"easympt serve: error: {e}", file=sys.stderr)
            return 1
        return 0
    server.fire()
    urls = server.launch(share_chat=args.share, share_inst=args.share) if not args.no_gradio else {}
    print(f"easympt is serving on {server.url}  (REST: /chat /instruct /v1/...; docs: {server.url}/docs)")
    for name, url in urls.items():
        print(f"  gradio {name}: {url}")
    sys.stdout.flush()
    try:
        while True:
            # short sleeps: Ctrl-C may land on any thread (uvicorn's, the scheduler's, XLA's); Python
            # raises it in the main thread when that thread next runs, which an hour's sleep delays
            time.sleep(0.5)
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def cmd_plan(args) -> int:
    import json

    from easympt.config import PRESETS, MptConfig
    from easympt.plan import memory_plan
    from easympt.transform.flax_to_hf import parse_size

    # a preset name, else a directory / config.json / hub id (only config.json is fetched)
    config = MptConfig.preset(args.model) if args.model in PRESETS else MptConfig.from_pretrained(args.model)
    memory = parse_size(args.device_memory) if args.device_memory else None
    if args.train:
        from easympt.training.memory import training_plan

        plan = training_plan(config, seq_len=args.seq_len, batch_size=args.batch_size, lora_rank=args.lora_rank,
                             lora_targets=tuple(args.lora_targets.split(",")), quantize=args.quantize,
                             dtype=args.dtype, remat=args.remat, device_memory=memory)
        print(json.dumps(plan.to_dict()) if args.json else f"{args.model}\n{plan.summary()}")
        return 0 if plan.fits is not False else 1
    plan = memory_plan(config, dtype=args.dtype, max_length=args.max_length, batch_size=args.batch_size,
                       mesh=args.mesh, kv_dtype=args.kv_dtype, quantize=args.quantize,
                       device_memory=parse_size(args.device_memory) if args.device_memory else None,
                       prefix_cache_bytes=parse_size(args.prefix_cache_bytes), block_tokens=args.max_compile_tokens)
    print(json.dumps(plan.to_dict()) if args.json else f"{args.model}\n{plan.summary()}")
    return 0 if plan.fits is not False else 1


def cmd_eval(args) -> int:
    import json

    from easympt.evaluation import evaluate_texts, local_scorer, read_texts, server_scorer

    source = args.model
    if source is None:
        from easympt.demo import demo_checkpoint

        source = demo_checkpoint()
    texts = read_texts(args.data)  # bad data fails before any model is loaded
    from easympt.transform.hf_to_flax import load_tokenizer, resolve_checkpoint_dir

    if args.server:
        import httpx

        key = args.api_key or __import__("os").environ.get("EASYMPT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        status = httpx.get(args.server.rstrip("/") + "/status", headers=headers, timeout=30)
        status.raise_for_status()
        served = status.json()
        max_length = min(args.max_length or served["max_length"], served["max_length"] - 1)
        tokenizer = load_tokenizer(resolve_checkpoint_dir(source))
        scorer = server_scorer(args.server, served.get("model"), key)
    else:
        from easympt.model import FlaxMptForCausalLM
        from easympt.transform import mpt_from_pretrained
        from easympt.transform.quantized import params_format

        ckpt = resolve_checkpoint_dir(source)
        params, config = mpt_from_pretrained(ckpt, dtype=args.dtype, quantize=args.quantize)
        model = FlaxMptForCausalLM(config, dtype=args.dtype, _do_init=False, quantize=params_format(params))
        tokenizer = load_tokenizer(ckpt)
        max_length = args.max_length or config.max_seq_len
        scorer = local_scorer(model, params, max_length)
    result = evaluate_texts(texts, tokenizer, scorer, max_length, stride=args.stride, batch_size=args.batch_size)
    out = {"model": source, "data": args.data, "max_length": max_length,
           "stride": args.stride or max_length // 2, **result.to_dict()}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.data}: {result.documents} documents, {result.tokens} tokens, {result.bytes} bytes\n"
              f"perplexity {result.perplexity:.4f}   bits per byte {result.bits_per_byte:.4f}   "
              f"(max_length {max_length}, stride {out['stride']})")
    return 0


BENCHMARKS = {"generate": "bench_generate.py", "server": "bench_server.py", "train": "bench_train.py",
              "convert-memory": "convert_memory.py", "profile-decode": "profile_decode.py"}


def cmd_bench(args) -> int:
    """Run a script of the source checkout's benchmarks/ (they are not installed with the package)."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", BENCHMARKS[args.which])
    if not os.path.isfile(script):
        raise FileNotFoundError(f"{script}: benchmarks ship with the source repository, not the installed package")
    return subprocess.call([sys.executable, script, *args.rest])


# optional packages each command needs -> the extra that installs them; checked before any work
NEEDS = {
    "serve": {"fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "prometheus_client": "serve",
              "gradio": "serve"},
    "train": {"matplotlib": "train", "yaml": "train"},
}


def check_dependencies(args) -> None:
    import importlib.util

    needs = dict(NEEDS.get(args.command, {}))
    if args.command == "serve" and args.no_gradio:
        needs.pop("gradio")
    if args.command == "eval" and args.server:
        needs["httpx"] = "serve"
    missing = sorted({(m, extra) for m, extra in needs.items() if importlib.util.find_spec(m) is None})
    if missing:
        extras = sorted({extra for _, extra in missing})
        raise ImportError(f"`easympt {args.command}` needs {', '.join(m for m, _ in missing)}: "
                          f"pip install 'easympt[{','.join(extras)}]'")


def _add_distributed(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("more than one process (TPU pod slices, GPU nodes); the same on every process")
    g.add_argument("--coordinator-address", dest="coordinator_address", default=None, metavar="HOST:PORT",
                   help="process 0's address (or EASYMPT_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", dest="num_processes", type=int, default=None,
                   help="how many processes (or EASYMPT_NUM_PROCESSES)")
    g.add_argument("--process-id", dest="process_id", type=int, default=None,
                   help="this process's id, 0 to N-1 (or EASYMPT_PROCESS_ID)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easympt", description="MosaicML MPT in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream a completion to the terminal",
                       usage="easympt generate [-h] [options] [MODEL] PROMPT")
    p.add_argument("model_prompt", nargs="+", metavar="[MODEL] PROMPT",
                   help="checkpoint directory or hub id (default: the bundled demo model), then the prompt")
    _add_model(p)
    _add_sampling(p)
    p.add_argument("--verbose", action="store_true",
                   help="print what runs (backend, dtypes, the CPU kernels' instruction set) to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve a model over REST, the OpenAI API and Gradio")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the bundled demo model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2059)
    p.add_argument("--batch-size", type=int, default=8, help="decode slots")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--mesh", default=None, help="mesh shape dp,fsdp,tp,sp, e.g. 1,-1,1,1")
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY (or EASYMPT_API_KEY)")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode steps per engine dispatch (1: stream every token as it is made)")
    p.add_argument("--prefill-chunk", type=int, default=2048,
                   help="longer prompts are prefilled this many tokens at a time, between other requests' decode steps")
    p.add_argument("--prefix-cache-bytes", dest="prefix_cache_bytes", type=int, default=None,
                   help="automatic prefix cache: bytes of KV kept from earlier prompts and replies, reused by "
                        "requests that start the same (a chat's history, a shared system prompt); default 512 MiB, "
                        "0 turns it off")
    p.add_argument("--num-speculative-tokens", dest="num_speculative_tokens", type=int, default=None,
                   help="prompt-lookup speculative decoding: check this many draft tokens copied from each request's "
                        "own text per step (greedy output unchanged; 0, the default: off)")
    p.add_argument("--draft-model", dest="draft_model", default=None, metavar="PATH",
                   help="speculative decoding with a draft model: a small MPT (dir, cache or hub id) with the same "
                        "vocabulary proposes --num-speculative-tokens tokens (default 4) a step; greedy output unchanged")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                   help="serve a LoRA adapter (PEFT's format) as model NAME; repeatable; a request picks it with "
                        "\"model\": NAME")
    p.add_argument("--max-loras", dest="max_loras", type=int, default=None,
                   help="LoRA adapter slots (default: 4 or the number of --lora, whichever is larger, with --lora; "
                        "else 0). Adapters load and unload at run time (/v1/load_lora_adapter) into free slots")
    p.add_argument("--max-lora-rank", dest="max_lora_rank", type=int, default=None,
                   help="the largest adapter rank the slots hold (default 16)")
    p.add_argument("--share", action="store_true", help="ask Gradio for public share links")
    p.add_argument("--no-gradio", action="store_true")
    p.add_argument("--no-precompile", action="store_true")
    _add_model(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="fine-tune an HF MPT checkpoint on text / JSONL data (resumes automatically)")
    p.add_argument("model", nargs="?", default=None, help="HF checkpoint directory or hub id")
    p.add_argument("--config", default=None, help="YAML file of settings (flags override it)")
    p.add_argument("--data", default=None, help=".txt (blank-line separated documents) or .jsonl (text or "
                                                 "prompt/response)")
    p.add_argument("--eval-data", dest="eval_data", default=None)
    p.add_argument("--eval-fraction", dest="eval_fraction", type=float, default=None)
    p.add_argument("--output-dir", dest="output_dir", default=None, help="checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--export", default=None, help="write the trained model here as an HF checkpoint")
    p.add_argument("--mesh", default=None, help="dp,fsdp,tp,sp sizes, e.g. 1,-1,1,1 (default: one device; with "
                                                "several processes FSDP over all devices)")
    for flag, typ in (("seq-len", int), ("batch-size", int), ("grad-accum", int), ("learning-rate", float),
                      ("warmup-steps", int), ("max-steps", int), ("weight-decay", float),
                      ("max-grad-norm", float), ("save-every", int), ("keep-last", int), ("seed", int)):
        p.add_argument("--" + flag, dest=flag.replace("-", "_"), type=typ, default=None)
    p.add_argument("--remat", action="store_true", default=None,
                   help="recompute activations in the backward pass (less memory for long sequences)")
    g = p.add_argument_group("LoRA / QLoRA: train adapters only (written to OUTPUT_DIR/adapter in PEFT's format)")
    g.add_argument("--lora-rank", dest="lora_rank", type=int, default=None, help="adapter rank r (0: full fine-tuning)")
    g.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None, help="scale alpha / r (default 2 x r)")
    g.add_argument("--lora-targets", dest="lora_targets", default=None,
                   help="comma-separated layers: Wqkv,out_proj,up_proj,down_proj (gate_proj on GLU models); "
                        "default Wqkv, PEFT's default for MPT")
    g.add_argument("--lora-dropout", dest="lora_dropout", type=float, default=None)
    _add_quantize(g, "QLoRA: the frozen base in 8 or 4 bits (needs --lora-rank)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="Hugging Face MPT checkpoint <-> easympt (orbax) checkpoint, or HF -> HF "
                                       "(e.g. .bin shards -> safetensors)")
    p.add_argument("src", help="HF checkpoint directory or hub id, or an easympt checkpoint (a training step too)")
    p.add_argument("dst", help="output directory (written atomically)")
    p.add_argument("--to", choices=("hf", "easympt"), default=None,
                   help="output format (default: hf from an easympt source; from an HF source easympt when "
                        "DST ends in .easympt, else hf)")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 for the written tensors")
    p.add_argument("--max-shard-size", default="5GB")
    _add_quantize(p, "from an HF source: a quantized easympt checkpoint that loads as is; DST must then end in "
                     ".easympt or --to easympt")
    p.add_argument("--dequantize", action="store_true",
                   help="to HF from a quantized source: write the float weights it stands for (HF's MptForCausalLM "
                        "has no 8- or 4-bit weights)")
    p.add_argument("--merge-lora", dest="merge_lora", default=None, metavar="DIR",
                   help="fold this LoRA adapter (PEFT's format) into the weights: W + A B alpha / r, as PEFT's "
                        "merge_and_unload")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="perplexity and bits per byte of a text file, locally or through a server")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint directory or hub id (default: the bundled demo model); with --server its "
                        "tokenizer is used")
    p.add_argument("--data", required=True, help=".txt (one document) or .jsonl ({\"text\": ...} per line)")
    p.add_argument("--server", default=None, help="score through this running server's /v1/completions instead")
    p.add_argument("--api-key", dest="api_key", default=None, help="the server's API key (or EASYMPT_API_KEY)")
    p.add_argument("--max-length", dest="max_length", type=int, default=None,
                   help="tokens per window (default: the model's max_seq_len; with --server its max_length - 1)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default max_length/2)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="windows scored together")
    p.add_argument("--dtype", default=None, help="fp32 / bf16 (default: fp32 on CPU, bf16 on GPU/TPU)")
    _add_quantize(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the summary")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="memory plan from a config alone: weights, KV cache, per-device bytes, fit")
    p.add_argument("model", help="checkpoint directory, config.json, hub id (fetches config.json only) or a "
                                 "preset name (mpt-7b, mpt-30b, mpt-7b-storywriter, ...)")
    p.add_argument("--dtype", default="bf16", help="weight dtype (default bf16)")
    p.add_argument("--kv-dtype", dest="kv_dtype", default=None,
                   help="KV-cache dtype: fp32 / bf16 / fp16 / int8 (default: --dtype)")
    _add_quantize(p, "the plan counts their scales; --dtype is then what stays float")
    p.add_argument("--max-length", dest="max_length", type=int, default=None,
                   help="tokens per request (default: the config's max_seq_len)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="requests decoded together")
    p.add_argument("--prefix-cache-bytes", dest="prefix_cache_bytes", default="0",
                   help="a server's prefix-cache budget, e.g. 512MiB (what `easympt serve` keeps by default): its "
                        "pool counted as the server sizes it (default 0: none)")
    p.add_argument("--max-compile-tokens", dest="max_compile_tokens", type=int, default=64,
                   help="the server's smallest prompt bucket: the prefix cache's block (default 64)")
    p.add_argument("--mesh", default=None, help="dp,fsdp,tp,sp sizes, e.g. 1,8,1,1 (default: one device)")
    p.add_argument("--device-memory", dest="device_memory", default=None,
                   help="memory of one device, e.g. 16GB or 80GiB; exit status 1 when it does not fit")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the summary")
    g = p.add_argument_group("training (--train): one optimizer step, compiled on abstract shapes")
    g.add_argument("--train", action="store_true", help="plan a training step instead of serving")
    g.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    g.add_argument("--lora-rank", dest="lora_rank", type=int, default=0, help="LoRA adapters of this rank over a "
                                                                              "frozen base (0: full fine-tuning)")
    g.add_argument("--lora-targets", dest="lora_targets", default="Wqkv,out_proj,up_proj,down_proj")
    g.add_argument("--no-remat", dest="remat", action="store_false", help="keep activations instead of recomputing")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("bench", help="run a benchmark against transformers (from a source checkout)")
    p.add_argument("which", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags (see its --help)")
    p.set_defaults(func=cmd_bench)
    for name, command in sub.choices.items():
        if name != "bench":
            _add_distributed(command)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_dependencies(args)
        if args.command != "bench":
            import easympt.distributed

            easympt.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        print(f"easympt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
