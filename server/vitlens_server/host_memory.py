"""Keep freed host memory in the process: glibc malloc tuned for a long-running tensor server.

PyTorch's CPU tensors come from malloc. By default glibc serves every block above its mmap
threshold (128 KiB, raised as such blocks are freed, to at most 32 MiB) with a fresh ``mmap`` and
returns a heap's free top to the kernel once it passes the trim threshold. A model pass allocates
and frees the same activations each time, so each pass faults the same tens of MiB of zeroed pages
back in. `keep_freed_memory` raises the mmap threshold to its 32 MiB ceiling and turns trimming
off. Measured on the demo model in the steady state of mixed traffic, 2-core CPU, B = 4
(`scripts/bench_host_memory.py`, benchmarks/host_memory.md): Transformer Attribution went from
about 12,000 minor page faults a call to 2 and ran 1.12-1.30x faster, `partial_lrp` 1.18x,
`saliency` 1.08x; the methods that faulted no pages once warm were unchanged (1.01-1.02x). The
price is that the heap stays at its peak: the peak of one batch, which a server reaches on every
batch anyway.

`vitlens serve` calls it at start (``--return-freed-memory`` keeps glibc's defaults); so do the
benchmark scripts, for they measure what the server runs. On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from pathlib import Path

__all__ = ["MMAP_THRESHOLD_BYTES", "keep_freed_memory", "minor_page_faults"]

# glibc's <malloc.h> parameter numbers for mallopt
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Tune this process's glibc malloc to keep freed blocks (see the module docstring).

    Returns True when both settings took effect, False on a C library without ``mallopt``
    (musl, macOS, Windows) or when glibc refused a value. Process-wide, for the rest of its life.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Setting either value also stops glibc from moving them itself (its dynamic threshold).
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    trim_set = mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    return bool(mmap_set and trim_set)


def minor_page_faults() -> int:
    """This process's minor page faults so far (Linux: field 10 of ``/proc/self/stat``)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])
