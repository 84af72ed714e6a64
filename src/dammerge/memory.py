"""Keep freed CPU memory for reuse while a training or evaluation loop runs (glibc only).

PyTorch's CPU allocator has no cache: every tensor is a ``malloc`` and a ``free``. glibc serves
each allocation above its mmap threshold (32 MiB at most) with a fresh mapping and returns it
to the kernel on ``free``, so a loop that makes one large tensor per step (the logits of 1,280
positions over a 32k vocabulary are 164 MB, their log-softmax and gradient as much again) has
the kernel fault in and zero every page of it, again on every step (docs/performance.md).

:func:`reuse_freed_memory` switches glibc to serve every allocation from its heap and to keep
freed heap memory (up to 2 GiB at the top) instead of trimming it, so the next step's tensors
reuse the pages of the last step's (after the first few steps: torch asks for 64-byte aligned
blocks, which do not always fit the chunk just freed, so the heap may grow by a few blocks
before every request finds one). It changes where tensors live, never what is computed: a
family built inside it has the same content hash as one built outside. On leaving, large
allocations are mappings again and the kept memory is handed back (``AFTER_*`` below).
Merges of checkpoints (:mod:`dammerge.executor`) do not use it: they stream tensors of ever
different sizes, where kept memory would only raise the peak.

Set ``DAMMERGE_REUSE_MEMORY=0`` to keep the allocator's defaults (to compare with and without).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from collections.abc import Iterator

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# What the block leaves behind. Any mallopt call ends glibc's own adjustment of the thresholds
# for the rest of the process, so leaving sets the values that adjustment reaches in a process
# that has freed large tensors (mmap threshold at its 32 MiB ceiling, trim threshold twice
# that), not glibc's 128 KiB start values, which would make later mid-sized tensors fresh
# mappings again.
AFTER_MMAP_THRESHOLD = 32 * 2**20
AFTER_TRIM_THRESHOLD = 2 * AFTER_MMAP_THRESHOLD
DEFAULT_MMAP_MAX = 65536
KEEP_AT_MOST = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB of freed memory at the top

_depth = 0  # nesting level of reuse_freed_memory blocks
_active = False  # whether the outermost block changed the allocator


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else None.

    ``CDLL(None)`` is the running process itself, whose symbols include its C library's: no
    library search (``ctypes.util.find_library`` would run ``ldconfig`` in a subprocess).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def enabled() -> bool:
    """False when ``DAMMERGE_REUSE_MEMORY`` is 0/false/no/off."""
    value = os.environ.get("DAMMERGE_REUSE_MEMORY", "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def available() -> bool:
    """Whether a :func:`reuse_freed_memory` block changes the allocator here (glibc, not off)."""
    return enabled() and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, freed CPU memory is kept and reused; yields whether that is active.

    Nested blocks are free: only the outermost one sets and restores the allocator.
    """
    global _depth, _active
    libc = _glibc() if enabled() and _depth == 0 else None
    if libc is not None:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_AT_MOST)
        _active = True
    _depth += 1
    try:
        yield _active
    finally:
        _depth -= 1
        if libc is not None:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
            libc.malloc_trim(0)
            _active = False
