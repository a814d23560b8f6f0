"""Progress bars: live on a terminal, an occasional line in a log (CI, `dvc exp` queue logs)."""

from __future__ import annotations

import sys

from tqdm import tqdm

# Off a terminal every redraw of a bar becomes a line of the log: one every 10 s is plenty there.
LOG_INTERVAL_S = 10.0


def progress(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, redrawn at most every LOG_INTERVAL_S seconds when its output is
    not a terminal."""
    out = kwargs.get("file") or sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
