"""The host allocator's policy: keep freed memory in the process for the next step to reuse.

Why: XLA:CPU allocates each execution's temporaries as one block (a LoRA training step of
mpt-125m at 4 x 256 tokens: 2.08 GB) and frees it at the end. glibc's malloc serves a block that
large with a fresh `mmap` and returns it with `munmap`, so every step page-faults through the whole
block again: 508,000 minor faults and ~0.7 s of kernel time per 3.2 s step on 2 cores (measured with
`strace` and `getrusage`). Served from the heap and never trimmed, the block is reused with no fault
(0 faults; the step 7-10% faster). Three glibc settings do that: one arena (the XLA worker threads
that allocate would otherwise get arenas of their own, whose large blocks glibc always maps),
no `mmap` for large blocks, no trimming of the heap's top.

The cost: memory a process has used stays with it (its resident set is its high-water mark, which
is what a server or a training run holds at its busiest anyway). `EASYMPT_MALLOC=system` keeps
glibc's defaults. `give_back_free_memory()` returns what the heap holds free (`malloc_trim`), for
a process that is about to leave the machine to another: a PyTorch training step run between
easympt's steps (in another process, on this 2-core VM) took 3.2-3.6 s where it takes 2.6-2.8 s
beside a process that gave its free memory back first.

Applied once, when easympt is imported, so that it precedes JAX's CPU runtime starting its threads;
a process that ran JAX first still gets the heap settings for its own thread. Other C libraries
(musl) and other systems are left alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV = "EASYMPT_MALLOC"
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set the policy above (once); True where it is in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    choice = os.environ.get(ENV, "reuse")
    if choice not in ("reuse", "system"):
        raise ValueError(f"{ENV}={choice!r}: expected 'reuse' (easympt's default) or 'system' (glibc's defaults)")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc's mallopt parameters only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # -1 as the trim threshold is SIZE_MAX inside glibc: the heap's top is never given back
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
    return _applied


def give_back_free_memory() -> None:
    """Return the heap's free memory to the system (glibc's malloc_trim); no-op where the policy is off.
    The next large allocation then faults its pages in again."""
    if keep_freed_memory():
        ctypes.CDLL(None).malloc_trim(0)
