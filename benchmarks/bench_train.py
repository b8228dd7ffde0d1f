"""Training throughput: easympt's jitted step against a plain PyTorch loop over
transformers' MptForCausalLM, same weights, batch, sequence length and optimizer.

    python benchmarks/bench_train.py [--geometry mpt-125m] [--batch 4] [--seq-len 256] [--steps 4]
    python benchmarks/bench_train.py --lora 16 [--lora-targets Wqkv,out_proj,up_proj,down_proj]

`--lora R`: LoRA of rank R on both sides (easympt's adapters; PEFT's on transformers), only the
adapters trained. Peak RSS of each process is reported (easympt's includes writing the peer's
checkpoint, so it is an upper bound).

Both sides run AdamW with global-norm clipping in float32 on random tokens;
the peer (benchmarks/peers.py transformers-train) runs in a child process with the same thread count.
Steps are timed as a user runs them, back to back: in blocks, each system in turn running one untimed
step and then its share of --steps, over --rounds rounds (timing.in_blocks); the median is reported.
Before the peer's block easympt gives back the free memory its allocator keeps
(easympt.host_memory): kept, it slowed PyTorch's steps in the other process by ~30% on this VM.
On a GPU both keep float32 weights and compute in bf16 (easympt's GPU default; torch autocast).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import numpy as np

from peers import Peer
from timing import in_blocks


def step_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of one training step: 3x the forward (weights, LM head, QK^T and PV over the full square)."""
    d, L = config.d_model, config.n_layers
    kv = config.kv_heads * config.head_dim
    per_layer = d * (d + 2 * kv) + d * d + (3 if config.ffn_config.ffn_type == "mptglu" else 2) * d * config.ffn_hidden_size
    tokens = batch * seq
    forward = 2 * tokens * (L * per_layer + config.vocab_size * d) + 4 * batch * L * seq * seq * d
    return 3.0 * forward


def matmul_peak_flops(n: int | None = None) -> float:
    """Best GEMM rate JAX reaches here in the compute dtype (float32 on CPU, bf16 on GPU): the practical ceiling."""
    import jax
    import jax.numpy as jnp

    from easympt.dtypes import default_compute_dtype

    n = n or (2048 if jax.default_backend() == "cpu" else 8192)  # a GPU needs a large product to be busy
    a = jnp.ones((n, n), default_compute_dtype())
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per system (over --rounds blocks)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--lora-targets", default="Wqkv,out_proj,up_proj,down_proj")
    args = ap.parse_args()

    import jax

    from easympt import FlaxMptForCausalLM, MptConfig, host_memory
    from easympt.training import TrainConfig, Trainer

    config = MptConfig.preset(args.geometry, max_seq_len=max(args.seq_len, 2048))
    model = FlaxMptForCausalLM(config, seed=0)
    base_params = model.params
    trained = model.params
    if args.lora:
        from easympt.adapters import LoraSpec, lora

        spec = LoraSpec(rank=args.lora, alpha=2.0 * args.lora, targets=tuple(args.lora_targets.split(",")))
        model = FlaxMptForCausalLM(config, _do_init=False, lora=spec)
        trained = lora.merge(base_params, lora.init_adapter(model, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    n = args.batch * (args.steps + 1)
    rows = {"input_ids": rng.integers(0, config.vocab_size, (n, args.seq_len)).astype(np.int32),
            "sequence_id": np.zeros((n, args.seq_len), np.int32),
            "loss_mask": np.ones((n, args.seq_len), np.float32),
            "attention_mask": np.ones((n, args.seq_len), np.int32)}
    tokens_per_step = args.batch * args.seq_len
    block = -(-args.steps // args.rounds)  # timed steps per block
    with tempfile.TemporaryDirectory() as tmp:
        tc = TrainConfig(output_dir=os.path.join(tmp, "run"), seq_len=args.seq_len, batch_size=args.batch,
                         max_steps=1 + args.rounds * (block + 1), save_every=10**9, learning_rate=1e-4,
                         warmup_steps=1)
        trainer = Trainer(model, trained, rows, tc)
        with contextlib.ExitStack() as stack:
            peer = None
            if not args.skip_torch:
                from easympt.transform import mpt_to_pretrained

                path = mpt_to_pretrained(base_params, config, os.path.join(tmp, "hf"))
                lora_flags = ["--lora-rank", str(args.lora), "--lora-targets", args.lora_targets] if args.lora else []
                peer = stack.enter_context(Peer("transformers-train", path, "--batch", str(args.batch),
                                                "--seq-len", str(args.seq_len), *lora_flags))
            t0 = time.perf_counter()
            trainer.train(stop_at=1)  # compile + first step
            compile_s = time.perf_counter() - t0
            peer_first = peer.request() if peer else None  # its warm-up step

            def our_step():
                t0 = time.perf_counter()
                trainer.train(stop_at=trainer.step + 1)
                jax.block_until_ready(trainer.params)
                return time.perf_counter() - t0

            last = {}

            def their_step():
                last.update(peer.request())
                return last["seconds"]

            steps = {"easympt": our_step, **({"transformers": their_step} if peer else {})}
            def before_block(name):
                if name != "easympt":  # the peer's turn: easympt's kept free memory would slow it
                    host_memory.give_back_free_memory()

            times = in_blocks(steps, args.rounds, block, before=before_block)
        import resource

        ours = {"step_s": float(np.median(times["easympt"])), "compile_and_first_step_s": compile_s,
                "trained_params": sum(x.size for x in jax.tree_util.tree_leaves(trainer.params)),
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        ours["tokens_per_s"] = tokens_per_step / ours["step_s"]
        flops = step_flops(config, args.batch, args.seq_len)
        peak = matmul_peak_flops()
        ours["fraction_of_matmul_peak"] = flops / ours["step_s"] / peak
        result = {"geometry": args.geometry, "batch": args.batch, "seq_len": args.seq_len, "lora_rank": args.lora,
                  "backend": jax.default_backend(), "step_gflop": flops / 1e9, "matmul_peak_gflop_s": peak / 1e9,
                  "easympt": ours}
        if peer:
            theirs = {**peer.info, "step_s": float(np.median(times["transformers"])), "loss0": peer_first["loss"],
                      "peak_rss_gb": last["peak_rss_gb"]}
            theirs["tokens_per_s"] = tokens_per_step / theirs["step_s"]
            theirs["fraction_of_matmul_peak"] = flops / theirs["step_s"] / peak
            result["transformers"] = theirs
            result["ratio_tokens_per_s"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
    print(f"{'':28s}{'easympt':>10s}{'transformers':>14s}{'ratio':>8s}")
    peer = result.get("transformers", {})
    print(f"{'train tokens/s':28s}{ours['tokens_per_s']:10.1f}{peer.get('tokens_per_s', float('nan')):14.1f}"
          f"{result.get('ratio_tokens_per_s', float('nan')):7.2f}x")
    print(f"{'step s':28s}{ours['step_s']:10.2f}{peer.get('step_s', float('nan')):14.2f}")
    print(f"{'of the matmul peak':28s}{ours['fraction_of_matmul_peak']:10.0%}"
          f"{peer.get('fraction_of_matmul_peak', float('nan')):14.0%}")
    print(f"{'peak RSS GB':28s}{ours['peak_rss_gb']:10.2f}{peer.get('peak_rss_gb', float('nan')):14.2f}")
    print(f"{'trained params':28s}{ours['trained_params']:10d}{peer.get('trained_params', 0):14d}")
    print(f"step: {result['step_gflop']:.0f} GFLOP; best GEMM here (compute dtype): {result['matmul_peak_gflop_s']:.0f} GFLOP/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
