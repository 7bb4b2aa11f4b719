"""Model loads that leave no holes in the C heap (glibc; elsewhere a no-op).

A load reads tensors, reorders, repacks and joins them: many temporaries of a few MB each.
glibc serves an allocation below its mmap threshold from the heap, and raises that threshold
(up to 32 MiB) each time a bigger block is freed, so after the first large tensor such
temporaries come from the heap, and a freed heap block stays resident until everything above
it is free too: a load's temporaries end up as resident holes. Measured on the Mistral
proxy's Q3_K_M GGUF: peak RSS 760 MB without `compact_heap` around the load, 700 MB with it,
prefill and decode speed unchanged. The threshold is 64 KiB, not 1 MiB: a small model's
per-layer temporaries (SmolLM2's k_proj is 62 KiB of Q4_1) otherwise still leave holes;
`levante generate smollm2` peaked at a median 391 MB with 1 MiB, 383 MB with 64 KiB (5 runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_LOAD_MMAP_THRESHOLD = 1 << 16
# What glibc's own adjustment reaches once a large block has been freed: afterwards
# allocations (activations, kernel scratch) reuse the heap as they would have.
_RUN_MMAP_THRESHOLD, _RUN_TRIM_THRESHOLD = 32 << 20, 64 << 20
_depth = 0


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already links: its libc
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def compact_heap() -> Iterator[None]:
    """Within: allocations of 64 KiB and more are their own memory maps, returned to the OS
    when freed. After: glibc's usual thresholds (fixed at the values its adjustment reaches),
    and the heap's free pages handed back (`malloc_trim`). Nested uses act as the outermost."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    if _depth == 0:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOAD_MMAP_THRESHOLD)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _RUN_MMAP_THRESHOLD)
            libc.mallopt(_M_TRIM_THRESHOLD, _RUN_TRIM_THRESHOLD)
            libc.malloc_trim(0)  # (no gc.collect: tensors free by refcount; it cost 0.14 s)


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS now (`malloc_trim`), e.g. once a load's
    temporaries of one kind are gone and before the next, larger ones come."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
