"""A process's own peak memory, as the kernel counts it (for engines.measure_server).

Python's tracemalloc cannot see what torch, ONNX Runtime or MNN allocate in C++, so the
measuring process asks the kernel. After importing the one runtime it needs and reading its
inputs it records its resident set size and resets the kernel's peak to it
(`/proc/self/clear_refs` = 5; the baseline, `reset_peak_rss`), then loads the model, runs every
timed setting and reads the peak resident set size (`VmHWM`; `ru_maxrss` where /proc is missing;
`peak_rss_bytes`). The difference is the model's weights, the runtime's arenas and activations
at the largest batch, and nothing from other models (one process per model).

A forked process shares its parent's runtime libraries, but fork copies no page-table entries of
file mappings: `mapped_file_pages` (in the parent) and `map_again` (in the child) fault them in
before the baseline, so that they are not counted as the model's memory.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["map_again", "mapped_file_pages", "peak_rss_bytes", "reset_peak_rss"]


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Current RSS in bytes, with the kernel's peak (VmHWM) reset to it where Linux allows.

    Without the reset, a transient peak while importing torch would hide the model's own use.
    Falls back to ru_maxrss (the peak so far) when /proc is not available.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
    except OSError:
        return peak_rss_bytes()
    rss = _status_kib("VmRSS")
    return rss * 1024 if rss is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def mapped_file_pages() -> list[tuple[int, int]]:
    """(address, length) of the file-backed pages this process has mapped (its runtimes' code).

    fork copies no page-table entries of file mappings, so a forked process would fault the
    runtime's libraries in again while it runs the model, and they would count as the model's
    memory; `map_again` restores them before the baseline (a few ms). Read from /proc/self/pagemap
    (bit 63: present); empty where it is not readable.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    ranges: list[tuple[int, int]] = []
    try:
        with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or not parts[5].startswith("/") or "r" not in parts[1]:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                pagemap.seek(lo // page * 8)
                present = (np.frombuffer(pagemap.read((hi - lo) // page * 8), dtype=np.uint64) >> np.uint64(63)).astype(np.int8)
                edges = np.flatnonzero(np.diff(np.concatenate(([0], present, [0]))))
                ranges += [(lo + int(a) * page, int(b - a) * page) for a, b in zip(edges[::2], edges[1::2])]
    except (OSError, ValueError):
        return []
    return ranges


def map_again(ranges: list[tuple[int, int]]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for address, length in ranges:
        libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), 22)  # MADV_POPULATE_READ (Linux 5.14+)
