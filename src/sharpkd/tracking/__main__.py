"""`python -m sharpkd.tracking`: send what stages kept during a tracking outage (outage.py) to the
project's store now, rather than with the next stage that runs. Exit status 1 when the store cannot
be reached or something is still kept."""

from __future__ import annotations

import sys

from sharpkd.tracking.outage import send_pending


def main() -> int:
    from sharpkd.errors import UserError
    from sharpkd.tracking.registry import project_store
    from sharpkd.tracking.store import LockedClient, check_reachable, project_root

    try:
        store = project_store()
        check_reachable(store)
        notes = send_pending(LockedClient(store), project_root())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for note in notes or [f"tracking: nothing is kept for {store.uri}"]:
        print(note, file=sys.stderr if note.startswith("warning") else sys.stdout)
    return 1 if any(n.startswith("warning") for n in notes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
