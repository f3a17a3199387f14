"""Give freed heap memory back to the operating system between large batches.

PyTorch's CPU allocator uses malloc; glibc keeps freed blocks of a forward pass in its arenas, so a
process that runs many 512-token windows (calibration, one benchmark row after another) grows by
gigabytes that nothing uses (seen on SmolLM2 calibration; flat with a trim after each window).
`malloc_trim` returns them. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the heap's free blocks to the operating system (glibc; a no-op elsewhere)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---- peak resident memory per stage ------------------------------------------------------------
# Linux keeps one high-water mark of resident memory per process (VmHWM); writing "5" to
# /proc/self/clear_refs resets it. A measurement resets it on entry and reads it on exit, so each
# stage and each pass gets its own peak; the marks a reset discards are folded into every
# enclosing measurement and into the process's peak first, so nothing is lost.

_PROCESS = {"peak": 0.0}
_OPEN: list[list[float]] = []  # the running peak of each open measurement, outermost first


def _high_water_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _fold(mib: float) -> None:
    _PROCESS["peak"] = max(_PROCESS["peak"], mib)
    for running in _OPEN:
        running[0] = max(running[0], mib)


class PeakReading:
    """The peak resident memory (MiB) of one measured stretch; `per_stage`: False where the kernel's
    mark could not be reset, so the value is the process's peak so far, not this stretch's."""

    mib: float = 0.0
    per_stage: bool = True


class peak_memory:  # noqa: N801 -- used as a context manager, like contextlib's
    """`with peak_memory() as reading: ...`, then `reading.mib`: the largest resident size while inside."""

    def __enter__(self) -> PeakReading:
        self.reading = PeakReading()
        _fold(_high_water_mib())
        self.reading.per_stage = _reset_high_water()
        _OPEN.append([0.0])
        return self.reading

    def __exit__(self, *exc) -> None:
        inner = _OPEN.pop()[0]
        self.reading.mib = round(max(_high_water_mib(), inner), 1)
        _fold(self.reading.mib)


def resident_mib() -> float:
    """This process's resident size now (MiB), after giving freed heap blocks back: what is still alive."""
    release_freed_memory()
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def process_peak_mib() -> float:
    """The largest resident size of this process so far, across every reset of the kernel's mark."""
    _fold(_high_water_mib())
    return round(_PROCESS["peak"], 1)
