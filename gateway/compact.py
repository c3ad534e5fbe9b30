"""`iot-gateway compact`: rewrite history.db with the pages a new one gets.

A history.db made before 1 KiB pages keeps SQLite's 4 KiB ones (SQLite changes a page size only
by rewriting the whole file), and every batch then writes about twice the bytes (docs/history.md).
This rewrites it, with the gateway stopped: SQLite's VACUUM, which leaves the database as it was if
anything fails on the way.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from .historydb import PAGE_SIZE, SIDE_FILES, megabytes, private

ROOM = 2.2  # free space needed, times the database's size: the new copy, and the journal of the old pages


class CompactError(Exception):
    """history.db could not be rewritten; nothing was changed."""


def compact(path: Path) -> str:
    """Rewrite the database at `path` with PAGE_SIZE pages; one line saying what was done."""
    if not path.is_file():
        raise CompactError(f"{path}: no history database there (nothing to compact)")
    size = sum(os.path.getsize(p) for p in _files(path))
    free = shutil.disk_usage(path.parent).free
    if free < size * ROOM:
        raise CompactError(
            f"{path}: rewriting it needs about {megabytes(size * ROOM)} free beside it, "
            f"{megabytes(free)} free: nothing changed"
        )
    # SQLite's temporary copy beside the database, not in /tmp (on a Pi, the same SD card or a small tmpfs).
    os.environ["SQLITE_TMPDIR"] = str(path.parent)
    try:
        db = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise CompactError(f"{path}: {e}: nothing changed") from None
    try:
        before = db.execute("PRAGMA page_size").fetchone()[0]
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise CompactError(f"{path}: damaged ({check}); the gateway sets a damaged database aside itself at start")
        if before == PAGE_SIZE:
            return f"{path}: already {PAGE_SIZE}-byte pages, {megabytes(size)}: nothing to do"
        db.execute("PRAGMA journal_mode=DELETE")  # a page size changes only outside WAL mode
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        db.execute("VACUUM")
        db.execute("PRAGMA journal_mode=WAL")
        after = db.execute("PRAGMA page_size").fetchone()[0]
    except sqlite3.Error as e:
        raise CompactError(f"{path}: {e}: nothing changed (SQLite undoes a VACUUM that fails)") from None
    finally:
        db.close()
    for p in _files(path):
        private(p, create=False)
    now = sum(os.path.getsize(p) for p in _files(path))
    return f"{path}: {before}-byte pages → {after}, {megabytes(size)} → {megabytes(now)}"


def _files(path: Path) -> list[Path]:
    return [p for p in (path, *(path.with_name(path.name + s) for s in SIDE_FILES)) if p.exists()]
