"""What every benchmark script prints and measures the same way: markdown tables, progress on
stderr, and a process's peak resident memory."""

from __future__ import annotations

import resource
import sys


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|"] + [line(r) for r in rows])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child started by a
    parent holding 2 GB reports at least 2 GB whatever it does itself. VmHWM belongs to the
    address space, which exec makes new."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere; Linux reports KiB
