"""Peak resident memory a call adds, read in the process that makes it (the packing tests and bench_packing_scale.py
run their calls in a fresh child process that imports this module)."""

from __future__ import annotations

import resource


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def peak_start() -> tuple[int, bool]:
    """(baseline bytes, exact). Linux resets the peak (VmHWM) to the current RSS on "5" > /proc/self/clear_refs, so
    the peak after it is the call's own (exact); elsewhere ru_maxrss, which remembers every earlier peak (a lower
    bound of what the call adds)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS"), True
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False


def peak_added(start: int, exact: bool) -> int:
    """Bytes the peak rose above ``start`` (from `peak_start`)."""
    return (_status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - start
