"""Timing: the median wall time of a call, and the CPU's name to say where it was measured."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in ms after `warmup` untimed calls (fn must end on the host, so no sync is needed)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0
