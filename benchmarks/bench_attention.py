"""The attention kernels side by side: dense, blockwise (pure JAX) and Pallas, forward and forward +
backward, causal with ALiBi, at growing lengths; each output is compared with the first kernel timed at
that length (dense where it fits).

    python benchmarks/bench_attention.py [--heads 12] [--head-dim 64] [--lengths 512,2048,8192]

On CPU the Pallas kernel runs in interpret mode (a correctness path, not a fast one), so it is
timed only on an accelerator (where the defaults should be mpt-7b's 32 heads x 128). bf16 on an
accelerator, float32 on CPU. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from easympt.kernels.blockwise import blockwise_attention
from easympt.kernels.dense_attention import dense_attention
from easympt.kernels.mask import AttentionMask
from easympt.dtypes import default_compute_dtype
from easympt.layers import alibi_slopes
from easympt.kernels.pallas_attention import pallas_attention
from timing import median_time

DENSE_MAX = 8192  # [H, T, T] float32 scores beyond this do not fit comfortably


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--lengths", default="512,2048,8192")
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    dtype = default_compute_dtype()
    H, D = args.heads, args.head_dim
    kernels = {"dense": dense_attention, "blockwise": blockwise_attention}
    if not on_cpu:
        kernels["pallas"] = pallas_attention
    slopes = jnp.asarray(alibi_slopes(H)).reshape(H, 1)
    rows = []
    for T in (int(x) for x in args.lengths.split(",")):
        rng = np.random.default_rng(0)
        q = jnp.asarray(rng.standard_normal((1, H, 1, T, D)), dtype)
        kt = jnp.asarray(rng.standard_normal((H, D, T)), dtype)
        v = jnp.asarray(rng.standard_normal((H, T, D)), dtype)
        mask = AttentionMask(jnp.arange(T)[None], jnp.arange(T), jnp.ones((1, T), bool))
        scale = 1 / np.sqrt(D)
        ref = None
        for name, fn in kernels.items():
            if name == "dense" and T > DENSE_MAX:
                continue
            fwd = jax.jit(lambda q, kt, v, fn=fn: fn(q, kt, v, mask, slopes, scale, dtype=dtype))
            grad = jax.jit(jax.grad(lambda q, kt, v, fn=fn: fn(q, kt, v, mask, slopes, scale).astype(jnp.float32).sum(),
                                    argnums=(0, 1, 2)))
            out = fwd(q, kt, v)
            if ref is None:
                ref = np.asarray(out, np.float32)
            err = float(np.abs(np.asarray(out, np.float32) - ref).max())
            t_fwd = median_time(lambda: jax.block_until_ready(fwd(q, kt, v)))
            t_bwd = median_time(lambda: jax.block_until_ready(grad(q, kt, v)))
            rows.append({"kernel": name, "length": T, "forward_ms": 1e3 * t_fwd, "forward_backward_ms": 1e3 * t_bwd,
                         "max_abs_diff_vs_first": err})
            print(f"T={T:6d} {name:10s} forward {1e3 * t_fwd:9.2f} ms  fwd+bwd {1e3 * t_bwd:9.2f} ms  "
                  f"max |diff| vs the first kernel {err:.2e}")
    print(json.dumps({"backend": jax.default_backend(), "dtype": str(np.dtype(dtype)), "heads": H, "head_dim": D,
                      "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
