"""What log-probabilities cost: prefill with and without prompt scoring, and a decode dispatch
with and without per-token log-probabilities, on the engine the server runs.

Random weights in mpt-125m geometry (or --geometry), float32; prompt --prompt tokens (512), batch 1;
decode batch 8 over --steps steps; 1 warm-up, median of 5. Prints a table and one JSON line.

    python benchmarks/bench_logprobs.py [--geometry mpt-125m] [--prompt 512]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from easympt import FlaxMptForCausalLM, MptConfig
from easympt.generation import GenerationEngine, SamplingConfig
from timing import median_time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="mpt-125m")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    config = MptConfig.preset(args.geometry, max_seq_len=2048)
    model = FlaxMptForCausalLM(config, dtype="fp32", seed=0)
    eng = GenerationEngine(model, model.params, max_length=2048, max_compile_tokens=args.steps)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, args.prompt).tolist()
    plain = SamplingConfig(temperature=0.0, max_new_tokens=1)
    scored = SamplingConfig(temperature=0.0, max_new_tokens=0, prompt_logprobs=True, logprobs=5)

    def prefill(cfg):
        return lambda: jax.block_until_ready(eng.prefill_batch([ids], [cfg]).token)

    t_plain, t_scored = median_time(prefill(plain), reps=5), median_time(prefill(scored), reps=5)

    batch = 8
    gen = SamplingConfig(temperature=0.0, max_new_tokens=10**6)
    prefix = eng.prefill_batch([ids[:32]] * batch, [gen] * batch)
    base = eng.insert(prefix, eng.empty_state(batch, 1024), jnp.arange(batch, dtype=jnp.int32))

    def decode(fn):
        def run():
            state = jax.tree_util.tree_map(jnp.copy, base)  # generate donates its state
            jax.block_until_ready(fn(eng.params, state, n_steps=args.steps)[1])
        return run

    d_plain = median_time(decode(eng.generate), reps=5) / args.steps
    d_lp = median_time(decode(eng.generate_logprobs), reps=5) / args.steps
    rows = [("prefill, first token only", t_plain), ("prefill + prompt logprobs (echo)", t_scored),
            ("decode step, batch 8", d_plain), ("decode step + logprobs, batch 8", d_lp)]
    print(f"{args.geometry}, {args.prompt}-token prompt, {jax.devices()[0].platform}")
    for name, t in rows:
        print(f"  {name:36s} {t * 1e3:9.2f} ms")
    print(f"  prompt scoring costs {t_scored / t_plain:.2f}x a plain prefill; logprobs cost "
          f"{d_lp / d_plain:.2f}x a plain decode step")
    print(json.dumps({"bench": "logprobs", "geometry": args.geometry, "prompt": args.prompt,
                      "prefill_ms": t_plain * 1e3, "prefill_scored_ms": t_scored * 1e3,
                      "decode_step_ms": d_plain * 1e3, "decode_step_logprobs_ms": d_lp * 1e3}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
