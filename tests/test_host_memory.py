"""easympt.host_memory: after `import easympt`, a large block XLA frees is reused by the next call
without page faults (glibc alone maps and unmaps it every call) until give_back_free_memory();
EASYMPT_MALLOC=system keeps glibc's behaviour; an unknown value is refused by name."""

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import resource
    import time
    import easympt
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: x @ x.T)  # a 64 MB output each call, freed before the next
    x = jnp.ones((4096, 64), jnp.float32)
    faults = []
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = f(x)
        y.block_until_ready()
        y.delete()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    time.sleep(0.5)  # the last block back in the heap before it is given back (see above)
    easympt.host_memory.give_back_free_memory()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    after_giving_back = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # the fewest of the later calls: a buffer is freed asynchronously, and under load the next call may
    # allocate before the last one's block is back in the heap (then it grows the heap once)
    print(min(faults[1:]), easympt.host_memory.keep_freed_memory(), after_giving_back)
""")


def _probe(env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "EASYMPT_MALLOC"}
    if env_value is not None:
        env["EASYMPT_MALLOC"] = env_value
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy is glibc's (Linux)")
def test_a_freed_block_is_reused_without_page_faults():
    out = _probe()
    assert out.returncode == 0, out.stderr[-2000:]
    faults, applied, after_giving_back = out.stdout.split()
    assert applied == "True"
    assert int(faults) < 1000, f"{faults} page faults re-using a freed 64 MB block (16,384 pages)"
    assert int(after_giving_back) > 8000, "give_back_free_memory() kept the block"
    system = _probe("system")
    assert system.returncode == 0, system.stderr[-2000:]
    faults, applied, _ = system.stdout.split()
    assert applied == "False"
    assert int(faults) > 8000, "glibc's own policy maps a fresh block each call: the probe no longer tells"


def test_an_unknown_policy_is_refused_by_name():
    out = subprocess.run([sys.executable, "-c", "import easympt"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "EASYMPT_MALLOC": "jemalloc"})
    assert out.returncode != 0
    assert "EASYMPT_MALLOC='jemalloc'" in out.stderr
