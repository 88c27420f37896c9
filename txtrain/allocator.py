"""The host allocator: keep freed memory for the next step instead of returning it to the OS.

glibc's malloc serves every block over 32 MB with its own mmap and gives it back on free. A
training step on the CPU allocates and frees the same large tensors every time (the logits of
a 50k vocabulary are hundreds of MB), so each step pays again for fresh, zeroed pages: on two
cores that was half the step time of the socrates experiment. Serving large blocks from the
heap, and never trimming it, lets the next step reuse them. (jemalloc or tcmalloc preloaded
with LD_PRELOAD achieve the same; this needs nothing installed.)

It costs resident memory: the heap keeps up to 2 GiB free at its top (M_TRIM_THRESHOLD). On
two loaded cores, 4 steps, the OS's max RSS: ``task=socrates model=tiny`` (chunked loss) 706
tokens/s and 2.2 GiB with it, 333 tokens/s and 0.94 GiB without; bench.py's reference config
(whole logits) 114 and 3.7 GiB, 95 and 2.6 GiB. It pays in speed on both, so it stays the
default; ``keep_freed_memory=false`` (config.py) turns it off where memory is tight. Once the
last step is taken, ``return_freed_memory`` gives the kept blocks back.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_MAX = -4


def glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc's (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc not to mmap large blocks nor trim the heap; False where that is not glibc."""
    libc = glibc()
    try:
        return libc is not None and bool(libc.mallopt(M_MMAP_MAX, 0)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except AttributeError:  # musl and others have no mallopt
        return False


def return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim), once training is over:
    what ``keep_freed_memory`` kept for the next step would otherwise stay resident under the
    final evaluation, checkpoint and plot, which then add their own on top of the step's peak."""
    libc = glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
