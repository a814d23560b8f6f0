"""What every stages/*.py shares: load params, track the run, turn user errors into one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from sharpkd.config import Params, load_params
from sharpkd.errors import UserError


def run_stage(name: str, body: Callable[[Params, object], None], params_path: str = "params.yaml") -> None:
    """Run one DVC stage: `body(params, tracker)` inside its MLflow child run.

    A UserError (bad params, a missing file, bad input) exits with status 1 and a
    message naming what is wrong, without a traceback; the run is marked FAILED.
    """
    from sharpkd import tracking

    try:
        params = load_params(params_path)
        with tracking.stage_run(name, params) as tracker:
            body(params, tracker)
    except UserError as exc:
        print(f"error [{name}]: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)
