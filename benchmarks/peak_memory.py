"""Peak memory of the calling process, as the benchmarks report it (Linux).

VmHWM in /proc/self/status is the high-water mark of this process image's own address space, which starts
afresh at exec. getrusage(RUSAGE_SELF).ru_maxrss does not: Linux keeps the pre-exec image's peak across exec,
and a child's pre-exec image is its parent's (fork copies it, vfork shares it), so a measurement run in a
child of a parent that once held 1.2 GB reports at least 1.2 GB.
"""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float:
    """This process image's peak resident memory (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line: the benchmarks measure peak memory on Linux only")
