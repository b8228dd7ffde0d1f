"""The CPU kernels' C++ arithmetic without JAX (tests/csrc/kernel_selftest.cc against scalar
references), built with each library's own flags: for every instruction set this CPU runs, and for
aarch64 (the portable source compiles to NEON there) run under qemu-aarch64 where a cross compiler
and qemu are installed (.ci/run installs them), since no aarch64 jaxlib runs here."""

import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from test_cpu_kernels import CPU_ISAS, X86

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "tests", "csrc", "kernel_selftest.cc")
with open(os.path.join(ROOT, "easympt", "kernels", "csrc", "isa_flags.json")) as f:
    FLAGS = json.load(f)


def _build_and_run(compiler: str, flags: list[str], out: str, runner: list[str] = ()) -> str:
    jaxlib = importlib.util.find_spec("jaxlib").submodule_search_locations[0]  # XLA's FFI headers
    subprocess.run([compiler, "-O2", "-std=c++17", "-w", *flags, "-I", os.path.join(jaxlib, "include"), SOURCE,
                    "-o", out], check=True, capture_output=True, text=True)
    run = subprocess.run([*runner, out], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_kernels_native(isa, tmp_path):
    if isa not in CPU_ISAS:
        pytest.skip(f"this CPU does not run {isa}")
    out = _build_and_run("g++", FLAGS[isa], str(tmp_path / f"selftest_{isa}"))
    assert out.strip().endswith("all ok") and f"{isa if X86 else 'portable'} matmul bf16" in out


CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


@pytest.mark.skipif(shutil.which(CROSS) is None or shutil.which(QEMU) is None,
                    reason=f"{CROSS} and {QEMU} not installed (.ci/run installs g++-aarch64-linux-gnu, qemu-user)")
def test_kernels_on_aarch64_neon_under_qemu(tmp_path):
    out = _build_and_run(CROSS, FLAGS["portable"], str(tmp_path / "selftest_aarch64"),
                         [QEMU, "-L", "/usr/aarch64-linux-gnu"])
    assert out.strip().endswith("all ok") and "portable matmul bf16 M=40" in out
