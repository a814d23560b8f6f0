"""`python -m sharpkd.tracking`: send what stages kept during a tracking outage (outage.py) to the
project's store now, rather than with the next stage that runs. Exit status 1 when the store cannot
be reached or something is still kept (a damaged outbox, one for another store or a stage still running:
each is named)."""

from __future__ import annotations

import sys

from sharpkd.tracking.outage import UNLOGGED, send_pending, shown


def main() -> int:
    from sharpkd.errors import UserError
    from sharpkd.tracking.registry import project_store
    from sharpkd.tracking.store import LockedClient, check_reachable, project_root

    try:
        store = project_store()
        check_reachable(store)
        root = project_root()
        notes = send_pending(LockedClient(store), root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    base = root / UNLOGGED
    left = sorted(shown(p, root) for p in base.iterdir()) if base.is_dir() else []
    if not notes and left:
        notes = [f"warning: tracking: nothing to send to {store.uri}, but still kept: {', '.join(left)}"]
    for note in notes or [f"tracking: nothing is kept for {store.uri}"]:
        print(note, file=sys.stderr if note.startswith("warning") else sys.stdout)
    return 1 if left or any(n.startswith("warning") for n in notes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
