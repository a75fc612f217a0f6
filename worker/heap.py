"""How glibc's malloc places a worker's memory while it loads a model.

glibc serves an allocation from its heap unless it is at least the mmap
threshold, and it raises that threshold to the size of every mmapped block
freed (up to 32 MiB). Loading frees transients of many sizes (codes unpacked
from file blocks, torch's packing inputs, slices of fp32 decoded for checks),
so after the first few the threshold sits near the largest and every later
allocation, the model's own packed weights included, lands in the heap between
freed transients. Those holes are never returned: a 1.1B-parameter Q4_1 model
(914 MiB of tensors) left its worker 1,450 MiB resident and a peak of 1,530 to
1,670 MiB after loading, where the same load with blocks of 1 MiB and up
mmapped (and so unmapped whole when freed) peaked at 1,280 MiB.

Mapping every large block costs its page faults each time (the 1.1B load took
1.7-1.9x as long, its transients being 17 GB of 1 MiB-and-up blocks), and steps
want the opposite: their activations reused from the heap without faults. So
the threshold is low only while loading, and after it is pinned where glibc's
own adjustment would have taken it (measured: steps as fast as before).
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Iterator, Optional

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

LOADING_MMAP_THRESHOLD = 1 << 20
# glibc's ceiling for its own adjustment (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), and
# the trim threshold it pairs with it: what a long-running process settles on.
SERVING_MMAP_THRESHOLD = 32 << 20
SERVING_TRIM_THRESHOLD = 2 * SERVING_MMAP_THRESHOLD


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    # gnu_get_libc_version marks glibc: musl has mallopt as a stub that ignores its arguments.
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


@contextlib.contextmanager
def loading_heap() -> Iterator[None]:
    """Large blocks mmapped while the body runs (a model load), then the serving
    thresholds pinned and the heap's free pages returned."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, SERVING_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, SERVING_TRIM_THRESHOLD)
        libc.malloc_trim(0)
