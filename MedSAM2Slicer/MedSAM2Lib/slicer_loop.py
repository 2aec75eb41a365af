"""Slicer's main loop, reproduced: the GIL is held while "Qt" idles, Python runs only in short ticks.

Slicer initialises PythonQt without GIL release, so its main thread keeps Python's GIL while the
Qt event loop waits; a Python thread elsewhere in the process runs only while the main thread
happens to run Python (e.g. a 40 ms QTimer tick). A call through `ctypes.PyDLL` keeps the GIL
(unlike `ctypes.CDLL`), so `usleep` through it is exactly such an idle wait.

For the tests and `python -m MedSAM2Lib.bench` (POSIX); the module itself never imports it.
"""

from __future__ import annotations

import ctypes
import resource  # POSIX: tests and benchmarks run on Linux/macOS
import time
from typing import NamedTuple

_LIBC = ctypes.PyDLL(None)
TICK_S = 0.040  # the module's timer interval


def idle_holding_the_gil(seconds: float = TICK_S) -> None:
    _LIBC.usleep(int(seconds * 1e6))


class Tick(NamedTuple):
    wall: float       # seconds the tick took
    cpu: float        # seconds of CPU this thread used in it
    preempted: bool   # the OS took the CPU away during it (another process needed it)


def run_main_loop(tick, until, timeout: float = 300.0) -> list:
    """Alternate a GIL-holding idle wait and `tick()` until `until()`; returns each tick's Tick."""
    ticks = []
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the main loop did not finish within {timeout:g} s")
        idle_holding_the_gil()
        switches = _involuntary_switches()
        cpu, began = time.thread_time(), time.perf_counter()
        tick()
        ticks.append(Tick(time.perf_counter() - began, time.thread_time() - cpu, _involuntary_switches() > switches))
    return ticks


def slowest_tick(ticks) -> float:
    """The longest tick, in seconds, not counting time the OS gave to other processes: a tick
    that was preempted counts with its CPU time (our code's cost), any other with its wall time
    (which includes any wait: a poll must never block)."""
    return max((t.cpu if t.preempted else t.wall) for t in ticks)


def _involuntary_switches() -> int:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_nivcsw
