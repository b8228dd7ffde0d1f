"""The peers easympt's benchmarks run beside it, each as its users run it, on the same checkpoint.

Every peer runs in a child process of the benchmark (JAX's thread pool cannot slow it down; it gets
the machine's threads). A generation peer stays up and is timed in turns with easympt (`Peer`,
timing.decode_figures): it prints one JSON line when it is ready ({"keys": the prompt sets it
decodes, ...} or {"skipped": why}), then answers each request line {"key": "b1", "n_new": 128}
with {"seconds": its own timing of that run, "tokens": greedy ids}. The training peer runs once and
prints one JSON line, which `run_peer` returns:

    python benchmarks/peers.py transformers-generate CKPT --prompts FILE [--dtype float32]
        PyTorch MptForCausalLM.generate with its KV cache on (`use_cache=True`: transformers'
        MptConfig defaults to False) under torch.inference_mode(), greedy, batch 1 and 8.
    python benchmarks/peers.py llama-cpp CKPT --prompts FILE --llama-cpp-src DIR [--outtype f32]
        llama.cpp (llama-cpp-python) on a GGUF written from the checkpoint (llama_cpp_peer.py), batch 1.
    python benchmarks/peers.py transformers-train CKPT --batch 4 --seq-len 256 --steps 4
        a plain PyTorch loop: AdamW + global-norm clipping, float32 weights (bf16 autocast on a GPU,
        as easympt computes in bf16 there).

bench_generate runs all three, bench_train the training loop. bench_server has no peer: neither
transformers nor the packages installed here offer a continuous-batching HTTP server to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from timing import timed

HERE = os.path.dirname(os.path.abspath(__file__))


def write_checkpoint(geometry: str, path: str, max_seq_len: int) -> str:
    """Random weights (torch seed 0) in an easympt preset's geometry, saved by transformers itself."""
    import torch
    from transformers import MptConfig as HFConfig, MptForCausalLM

    from easympt import MptConfig

    c = MptConfig.preset(geometry)
    torch.manual_seed(0)
    hf = MptForCausalLM(HFConfig(d_model=c.d_model, n_heads=c.n_heads, n_layers=c.n_layers, vocab_size=c.vocab_size,
                                 max_seq_len=max_seq_len, eos_token_id=None, bos_token_id=None))
    hf.save_pretrained(path)
    return path


def write_prompts(path: str, prompts: dict) -> str:
    """Prompt ids every system gets: {"b1": [[ids]], "b8": [[ids] x 8], "long": [[ids]]}."""
    with open(path, "w") as fh:
        json.dump({k: np.asarray(v).tolist() for k, v in prompts.items()}, fh)
    return path


def run_peer(*args: str) -> dict:
    """One peer in a child process (arguments as on the command line above): its JSON line."""
    child = subprocess.run([sys.executable, os.path.join(HERE, "peers.py"), *args], capture_output=True, text=True)
    if child.returncode != 0:
        raise RuntimeError(f"peer {args[0]} failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


class Peer:
    """A generation peer's child process, kept up so that the benchmark can time it in turns with
    easympt: `peer(key, n_new)` -> (seconds, greedy tokens), timed in the child; `info` is its ready
    line ({"skipped": why} when it cannot run here)."""

    def __init__(self, *args: str):
        self.name = args[0]
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "peers.py"), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"peer {self.name} failed:\n{self._stderr.read()[-3000:]}")
        return json.loads(line)

    def __call__(self, key: str, n_new: int) -> tuple[float, list]:
        self.proc.stdin.write(json.dumps({"key": key, "n_new": n_new}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()  # end of requests: the child exits
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(start) -> None:
    """The child's side of `Peer`: `start()` -> (run(key, n_new) -> tokens, ready line). Replies go to the
    process's real stdout; anything a library prints there (C code included) goes to stderr instead."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    run, ready = start()
    print(json.dumps(ready), file=replies, flush=True)
    if "skipped" in ready:
        return
    for line in sys.stdin:
        request = json.loads(line)
        seconds, tokens = timed(run, request["key"], request["n_new"])
        print(json.dumps({"seconds": seconds, "tokens": tokens}), file=replies, flush=True)


# ------------------------------------------------------------------ transformers
def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def transformers_generate(ckpt: str, prompts: dict, dtype: str):
    """(run, ready line) for `serve`."""
    import torch
    from transformers import MptForCausalLM

    device = _device()
    model = MptForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device).eval()

    def run(key, n_new):
        ids = torch.tensor(prompts[key], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=0, use_cache=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return out[:, ids.shape[1]:].tolist()

    return run, {"keys": ["b1", "b8"], "threads": torch.get_num_threads(), "device": device, "dtype": dtype}


def transformers_train(ckpt: str, batch: int, seq_len: int, steps: int) -> dict:
    import torch
    from transformers import MptForCausalLM

    device = _device()
    gpu = device == "cuda"
    torch.manual_seed(0)
    model = MptForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=gpu)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()
    times, losses = [], []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        with amp:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss))
    return {"step_s": float(np.median(times[1:])), "threads": torch.get_num_threads(), "loss0": losses[0],
            "device": device}


# --------------------------------------------------------------------- command line
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="peer", required=True)
    gen = sub.add_parser("transformers-generate")
    gen.add_argument("ckpt")
    gen.add_argument("--prompts", required=True)
    gen.add_argument("--dtype", default="float32")
    train = sub.add_parser("transformers-train")
    train.add_argument("ckpt")
    train.add_argument("--batch", type=int, default=4)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--steps", type=int, default=4)
    llama = sub.add_parser("llama-cpp")
    llama.add_argument("ckpt")
    llama.add_argument("--prompts", required=True)
    llama.add_argument("--llama-cpp-src", required=True)
    llama.add_argument("--outtype", default="f32")
    args = ap.parse_args()

    if args.peer == "transformers-train":
        print(json.dumps(transformers_train(args.ckpt, args.batch, args.seq_len, args.steps)))
        return 0
    prompts = json.load(open(args.prompts))
    if args.peer == "transformers-generate":
        serve(lambda: transformers_generate(args.ckpt, prompts, args.dtype))
        return 0
    import llama_cpp_peer

    with tempfile.TemporaryDirectory() as tmp:  # the GGUF lives as long as the peer
        serve(lambda: llama_cpp_peer.start(args.ckpt, prompts, args.llama_cpp_src, args.outtype, tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
