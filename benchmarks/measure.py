"""Time and peak memory of a command's whole process tree, and the machine it ran on.

Peak memory is the largest sum of resident set sizes over the process and all its descendants
(the MNN tool children included), sampled every 20 ms with psutil: the number that decides
whether a step fits a container's memory limit. Used by the bench_*.py scripts.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import tempfile
import time

import psutil


def run_tree(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None, interval_s: float = 0.02) -> dict:
    """Run ``cmd``; return {"seconds", "cpu_seconds", "peak_rss_bytes", "returncode", "output"}
    (cpu_seconds: user+system of the whole tree, steadier than wall time on a shared machine;
    output: the last 2000 characters of stdout+stderr). Not thread-safe (RUSAGE_CHILDREN)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # Output into a file, as mnnpipe gives its tool children: MNN's quantizer wrote no model for
    # VGG19 with its stdout on a pipe ("open scale file ... fail. error code:4", exit status 0).
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        peak = max(peak, total)
        time.sleep(interval_s)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    log.seek(0)
    output = log.read().decode("utf-8", "replace")[-2000:]
    log.close()
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_bytes": peak,
        "returncode": proc.returncode,
        "output": output,
    }


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine() -> str:
    """One line: CPU model, cores, memory, AVX-512 VNNI present or not, load average now."""
    flags = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = line
            break
    mem_gib = psutil.virtual_memory().total / 2**30
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    vnni = "avx512_vnni" if " avx512_vnni" in flags else "no avx512_vnni"
    return f"{cpu_model()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB, {vnni}; load average {load}"
