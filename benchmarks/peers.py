"""The peers easympt's benchmarks run beside it, each as its users run it, on the same checkpoint.

Every peer runs in a child process of the benchmark (JAX's thread pool cannot slow it down; it gets
the machine's threads) and stays up, so that the benchmark times it in turns with easympt (`Peer`;
timing.decode_figures): it prints one JSON line when it is ready ({"skipped": why} when it cannot
run here), then answers each request line with one reply line, timed in the child. A generation
peer answers {"key": "b1", "n_new": 128} with {"seconds", "tokens": greedy ids}; the training peer
answers {} with one optimizer step's {"seconds", "loss"}.

    python benchmarks/peers.py transformers-generate CKPT --prompts FILE [--dtype float32]
        PyTorch MptForCausalLM.generate with its KV cache on (`use_cache=True`: transformers'
        MptConfig defaults to False) under torch.inference_mode(), greedy, batch 1 and 8.
    python benchmarks/peers.py llama-cpp CKPT --prompts FILE --llama-cpp-src DIR [--outtype f32]
        llama.cpp (llama-cpp-python) on a GGUF written from the checkpoint (llama_cpp_peer.py), batch 1.
    python benchmarks/peers.py transformers-train CKPT --batch 4 --seq-len 256
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


class Peer:
    """A peer's child process, kept up so that the benchmark can time it in turns with easympt:
    `peer(key, n_new)` -> (seconds, greedy tokens) for a generation peer, `peer.request()` -> the
    reply dict for any; `info` is its ready line ({"skipped": why} when it cannot run here)."""

    def __init__(self, *args: str, script: str | None = None, flag: str | None = None):
        """`python peers.py ARGS`, or `python SCRIPT FLAG ARGS[1:]` for a child another benchmark runs
        itself (args[0] is then only the peer's name)."""
        self.name = args[0]
        self._stderr = tempfile.TemporaryFile(mode="w+")
        command = [os.path.join(HERE, "peers.py"), *args] if script is None else [script, flag, *args[1:]]
        self.proc = subprocess.Popen([sys.executable, *command], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.seek(0)
            raise RuntimeError(f"peer {self.name} failed:\n{self._stderr.read()[-3000:]}")
        return json.loads(line)

    def request(self, **fields) -> dict:
        self.proc.stdin.write(json.dumps(fields) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def __call__(self, key: str, n_new: int) -> tuple[float, list]:
        answer = self.request(key=key, n_new=n_new)
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
    """The child's side of `Peer`: `start()` -> (answer(request dict) -> reply dict, ready line). Replies
    go to the process's real stdout; anything a library prints there (C code included) goes to
    stderr instead."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    answer, ready = start()
    print(json.dumps(ready), file=replies, flush=True)
    if "skipped" in ready:
        return
    for line in sys.stdin:
        print(json.dumps(answer(json.loads(line))), file=replies, flush=True)


def generation(start):
    """`start` for a generation peer whose own `start()` gives (run(key, n_new) -> tokens, ready line)."""
    run, ready = start()
    if run is None:
        return None, ready

    def answer(request):
        seconds, tokens = timed(run, request["key"], request["n_new"])
        return {"seconds": seconds, "tokens": tokens}

    return answer, ready


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


def transformers_train(ckpt: str, batch: int, seq_len: int, lora_rank: int = 0, lora_targets: str = "Wqkv"):
    """(answer, ready line) for `serve`: each request runs and times one optimizer step. `lora_rank`:
    PEFT's LoRA on `lora_targets` (comma-separated), only the adapters trained, as PEFT's users do."""
    import resource

    import torch
    from transformers import MptForCausalLM

    device = _device()
    gpu = device == "cuda"
    torch.manual_seed(0)
    model = MptForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device)
    if lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                 target_modules=lora_targets.split(",")))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, fused=gpu)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    def step(request):
        t0 = time.perf_counter()
        with amp:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - t0, "loss": float(out.loss),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}

    return step, {"threads": torch.get_num_threads(), "device": device,
                  "trained_params": sum(p.numel() for p in trained)}


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
    train.add_argument("--lora-rank", type=int, default=0)
    train.add_argument("--lora-targets", default="Wqkv")
    llama = sub.add_parser("llama-cpp")
    llama.add_argument("ckpt")
    llama.add_argument("--prompts", required=True)
    llama.add_argument("--llama-cpp-src", required=True)
    llama.add_argument("--outtype", default="f32")
    args = ap.parse_args()

    if args.peer == "transformers-train":
        serve(lambda: transformers_train(args.ckpt, args.batch, args.seq_len, args.lora_rank, args.lora_targets))
        return 0
    prompts = json.load(open(args.prompts))
    if args.peer == "transformers-generate":
        serve(lambda: generation(lambda: transformers_generate(args.ckpt, prompts, args.dtype)))
        return 0
    import llama_cpp_peer

    with tempfile.TemporaryDirectory() as tmp:  # the GGUF lives as long as the peer
        serve(lambda: generation(lambda: llama_cpp_peer.start(args.ckpt, prompts, args.llama_cpp_src, args.outtype,
                                                              tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
