"""Peak host memory and wall time of mpt_from_pretrained, as a ratio to the weight bytes.

    python benchmarks/convert_memory.py [--geometries mpt-125m,mpt-1b] [--workdir /tmp/convert-bench]

For each geometry it writes a random checkpoint in several layouts
(single-file and sharded safetensors, sharded `.bin`; float32 and bfloat16
tensors), then converts each in a fresh child process to a float32 and a
bfloat16 target on CPU. The child measures its resident set after the
imports, one small transfer and tracing the `tiny` model's shapes (the
baseline: python, jax's started CPU runtime and the flax code paths that
any use of a model loads, torch for `.bin`) and its
peak (`VmHWM`) after the conversion; the ratio is
(peak - baseline) / bytes of the converted weights. Target: <= 1.2.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# mpt-1b: a ~1.3B-parameter geometry (d_model 2048, 24 layers), the size class
# of mpt-1b-redpajama, to check that the ratio holds as the model grows.
GEOMETRIES = {"mpt-125m": dict(preset="mpt-125m"),
              "mpt-1b": dict(preset="mpt-125m", d_model=2048, n_heads=16, n_layers=24)}
LAYOUTS = (("safetensors", "float32", "1"), ("safetensors", "bfloat16", "4"), ("bin", "bfloat16", "4"))

CHILD = r"""
import json, sys, time
fmt = sys.argv[2]
import jax, jax.numpy as jnp
if fmt == "bin":
    import torch  # noqa: F401  (part of the baseline: a .bin conversion needs it)
from easympt import FlaxMptForCausalLM, MptConfig
from easympt.transform import mpt_from_pretrained
import numpy as np
jax.device_put(np.zeros(1 << 20, np.float32), jax.devices("cpu")[0]).block_until_ready()  # runtime start-up
FlaxMptForCausalLM(MptConfig.preset("tiny"), _do_init=False).params_shape()  # flax/jax code paths, ~50 MB
def status(field):  # VmHWM, not ru_maxrss: ru_maxrss survives exec and would report the parent's peak
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
t0 = time.perf_counter()
params, config = mpt_from_pretrained(sys.argv[1], dtype=sys.argv[3], device=jax.devices("cpu")[0], progress=False)
jax.block_until_ready(params)
wall = time.perf_counter() - t0
peak = status("VmHWM")
nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print("RESULT " + json.dumps({"baseline": base, "peak": peak, "weight_bytes": nbytes, "wall_s": wall}))
"""


def write_random_checkpoint(path: str, geometry: dict, fmt: str, dtype: str, n_shards: int) -> int:
    """A random checkpoint in HF layout, written shard by shard (never whole in memory)."""
    import ml_dtypes

    from easympt import FlaxMptForCausalLM, MptConfig
    from easympt.sharding import path_str
    from easympt.transform.flax_to_hf import plan_shards
    from easympt.transform.names import flax_to_hf_name

    geometry = dict(geometry)
    config = MptConfig.preset(geometry.pop("preset"), **geometry)
    shapes = FlaxMptForCausalLM(config, _do_init=False).params_shape()
    leaves = []
    for p, s in jax_flat(shapes):
        name, transpose = flax_to_hf_name(path_str(p))
        leaves.append((name, s.shape[::-1] if transpose else s.shape))
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    itemsize = np.dtype(np_dtype).itemsize
    total = sum(int(np.prod(s)) * itemsize for _, s in leaves)
    shards = plan_shards([(int(np.prod(s)) * itemsize, i) for i, (_, s) in enumerate(leaves)],
                         -(-total // n_shards))
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    rng = np.random.default_rng(0)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    names = ([f"{stem}.{ext}"] if len(shards) == 1 else
             [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))])
    weight_map = {}
    for fname, shard in zip(names, shards):
        tensors = {leaves[i][0]: (rng.standard_normal(leaves[i][1], np.float32) * 0.02).astype(np_dtype)
                   for i in shard}
        if fmt == "safetensors":
            from safetensors.numpy import save_file

            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        else:
            import torch

            def to_torch(a):
                if a.dtype == ml_dtypes.bfloat16:
                    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                return torch.from_numpy(a)
            torch.save({k: to_torch(v) for k, v in tensors.items()}, os.path.join(path, fname))
        weight_map.update({k: fname for k in tensors})
        del tensors
    if len(shards) > 1:
        with open(os.path.join(path, f"{stem}.{ext}.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return total


def jax_flat(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometries", default="mpt-125m,mpt-1b")
    ap.add_argument("--workdir", default="/tmp/easympt-convert-bench")
    args = ap.parse_args()
    rows = []
    for geo in args.geometries.split(","):
        for fmt, file_dtype, n_shards in LAYOUTS:
            path = os.path.join(args.workdir, f"{geo}-{fmt}-{file_dtype}-{n_shards}")
            shutil.rmtree(path, ignore_errors=True)
            file_bytes = write_random_checkpoint(path, GEOMETRIES[geo], fmt, file_dtype, int(n_shards))
            for target in ("float32", "bfloat16"):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, path, fmt, target], capture_output=True,
                                   text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
                if r.returncode != 0:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return 1
                res = json.loads(r.stdout.split("RESULT ", 1)[1])
                res.update(geometry=geo, format=fmt, file_dtype=file_dtype, shards=int(n_shards), target=target,
                           file_bytes=file_bytes, process_s=time.perf_counter() - t0,
                           ratio=(res["peak"] - res["baseline"]) / res["weight_bytes"])
                rows.append(res)
                print(f"{geo:9s} {fmt:11s} {file_dtype:8s} x{n_shards} -> {target:8s} "
                      f"weights {res['weight_bytes'] / 2**20:7.0f} MiB  baseline {res['baseline'] / 2**20:5.0f} MiB  "
                      f"peak {res['peak'] / 2**20:6.0f} MiB  ratio {res['ratio']:.2f}  {res['wall_s']:.1f} s",
                      flush=True)
            shutil.rmtree(path, ignore_errors=True)
    print(json.dumps({"max_ratio": max(r["ratio"] for r in rows), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
