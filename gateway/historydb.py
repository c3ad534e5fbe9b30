"""history.db's file: its schema and statements, the size it grows to, its permissions, and how
a value is stored. The store that writes and reads it is gateway/history.py."""

from __future__ import annotations

import json
import logging
import math
import os
import ctypes
import sqlite3
from array import array
from collections.abc import Callable
from pathlib import Path

from .rollups import NAMES, RES, Bucket
from .values import Value

log = logging.getLogger("iot_gateway.history")

# Bytes a row takes in history.db, index included (measured: bench/history.py prints them).
RAW_BYTES = 66
BUCKET_BYTES = 97
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of a database file
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

# A new history.db's page size. Every commit writes each page it touched whole, to the WAL and
# later into the file; a batch of readings touches a dozen pages (the table's last page, each
# field's end of the (ref, t) index, the pages a split shares out, the roots, the header) and
# fills little of each: 1 KiB pages make a batch's commit ~2.5 times smaller than SQLite's
# 4 KiB (bench sd_writes: 4.53 → ~2.4 MB/h), and reads over a year of buckets are no slower.
# A database made before keeps its page size (SQLite changes it only by a VACUUM).
PAGE_SIZE = 1024
WAL_BYTES = 4 * 1024 * 1024  # the WAL is copied into the database past this (SQLite's 1000 pages of 4 KiB)
# SQLite's own page cache (its default is 2 MB): batches write to the ends of two indexes and
# windows read a few hundred rows, and the kernel's cache of the file stands behind it.
CACHE_KIB = 512

SCHEMA = f"""
PRAGMA page_size = {PAGE_SIZE};
CREATE TABLE IF NOT EXISTS readings (
    ref TEXT NOT NULL,
    t REAL NOT NULL,
    v TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_ref_t ON readings (ref, t);
"""
# Rows of a JSON array [[ref, t, v], ...]: many readings in one statement.
INSERT_BATCH = """
INSERT INTO readings (ref, t, v)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]')
FROM json_each(?)
"""
# One field down to its last ?2 rows inserted. Insertion order (rowid), not the time stamp:
# readings stamped by a clock that was ahead (then corrected) must not outlive newer real ones.
TRIM_FIELD = """
DELETE FROM readings WHERE ref = ?1 AND rowid IN (
    SELECT rowid FROM readings WHERE ref = ?1 ORDER BY rowid DESC LIMIT -1 OFFSET ?2)
"""

# The distinct fields of a table, one index probe each (a skip scan) rather than a scan of all rows.
REFS = """
WITH RECURSIVE r(ref) AS (
    SELECT min(ref) FROM {table}
    UNION ALL SELECT (SELECT min(ref) FROM {table} WHERE ref > r.ref) FROM r WHERE r.ref IS NOT NULL)
SELECT ref FROM r WHERE ref IS NOT NULL
"""



# What a field's open buckets are rebuilt from (HistoryStore._open_buckets).
Opened = tuple[list[float], list[Bucket], list[Bucket], list[tuple[float, str]]]
# A field's stored readings as memory holds them: times, and values (an array when all are floats).
Stored = tuple["array[float]", "array[float] | list[Value]"]

# Fields with readings stored out of time order: a later row with an older stamp (a clock stepped
# back, a device's own clock). For every other field the newest readings by time are also the last
# inserted, and a start finds them on the (ref, t) index without sorting every rowid (newest()).
ORDER_SCHEMA = """
CREATE TABLE IF NOT EXISTS unordered (ref TEXT PRIMARY KEY) WITHOUT ROWID;
"""


class Order:
    """Which fields have readings stored out of time order, kept as rows are written (the
    `unordered` table and its copy here). Used from the database thread only."""

    def __init__(self) -> None:
        self.unordered: set[str] = set()
        self.top: dict[str, float] = {}  # the newest stamp stored per field, once looked up
        self.clean: set[str] = set()  # found in order again by a load: unmarked with the next write

    def open(self, db: sqlite3.Connection, migrate: bool) -> None:
        """Read the marks of a database just opened; one of an older version has every field
        marked (what it stored is not known to be in order)."""
        if migrate:
            db.execute(f"INSERT OR IGNORE INTO unordered {REFS.format(table='readings')}")
        self.unordered = {ref for ref, in db.execute("SELECT ref FROM unordered")}
        self.top.clear()
        self.clean.clear()

    def write(self, db: sqlite3.Connection, batch: list[tuple[str, float, str]]) -> Callable[[], None]:
        """Mark the fields this batch stores out of order, unmark the clean ones: inside the
        batch's transaction, before its rows. Returns what to call once it is committed."""
        tops: dict[str, float] = {}
        marked: set[str] = set()
        for ref, t, _ in batch:
            last = tops.get(ref)
            if last is None:
                last = self.top.get(ref)
            if last is None:
                last = db.execute("SELECT max(t) FROM readings WHERE ref = ?", (ref,)).fetchone()[0]
            if last is None or t >= last:
                tops[ref] = t
            else:
                tops[ref] = last
                marked.add(ref)
        clean = self.clean - marked
        if clean:
            db.executemany("DELETE FROM unordered WHERE ref = ?", [(ref,) for ref in clean])
        if marked:
            db.executemany("INSERT OR IGNORE INTO unordered VALUES (?)", [(ref,) for ref in marked])

        def done() -> None:
            self.top.update(tops)
            self.unordered -= clean
            self.unordered |= marked
            self.clean -= clean | marked

        return done

    def rename(self, old: str, new: str) -> None:
        """Device `old` is now `new` (prefixes with the dot)."""
        self.unordered = {new + r[len(old):] if r.startswith(old) else r for r in self.unordered
                          if not r.startswith(new)}
        self.top.clear()
        self.clean.clear()


def newest(db: sqlite3.Connection, ref: str, n: int, unordered: bool) -> tuple[list[tuple[float, str]], bool]:
    """The last `n` readings of a field inserted, as (t, v) in that order, and whether they show an
    unordered field in order again. Insertion order, whatever the stamps: readings stamped by a
    clock that was ahead must not crowd out the later real ones."""
    if not unordered:
        # The newest by time, walking the (ref, t) index back (equal stamps by rowid, backwards):
        # the last inserted too. A field holds up to history_raw_rows rows (20,000), and sorting all
        # their rowids took 10 ms a field, 2 s of a start with 200 fields.
        rows = db.execute("SELECT t, v FROM readings WHERE ref = ? ORDER BY t DESC LIMIT ?", (ref, n)).fetchall()
        rows.reverse()
        return rows, False
    found = db.execute("SELECT rowid, t, v FROM readings WHERE ref = ? ORDER BY t DESC LIMIT ?", (ref, n)).fetchall()
    found.sort()
    # Every row from the oldest of these on is one of them: they are the last inserted.
    if found and db.execute(
        "SELECT count(*) FROM readings WHERE ref = ? AND rowid >= ?", (ref, found[0][0])
    ).fetchone()[0] == len(found):
        return [(t, v) for _, t, v in found], all(a[1] <= b[1] for a, b in zip(found, found[1:]))
    rows = db.execute(
        """SELECT t, v FROM readings WHERE rowid IN (
             SELECT rowid FROM readings WHERE ref = ? ORDER BY rowid DESC LIMIT ?) ORDER BY rowid""",
        (ref, n),
    ).fetchall()
    return rows, False


def expected(keep: dict[int, float], raw_rows: int, per_second: int, rate: float = 1.0) -> dict[int, float]:
    """Bytes one field takes in history.db once every resolution is full, per resolution (0:
    readings), at `rate` readings per second: the readings written (thinned to `per_second`,
    up to 1.5 × `raw_rows` before a trim) and one bucket per resolution step with a reading."""
    written = min(rate, per_second) if per_second else rate
    out = {0: min(1.5 * raw_rows, keep[0] * written) * RAW_BYTES}
    for res in RES:
        out[res] = keep[res] * min(rate, 1.0 / res) * BUCKET_BYTES
    return out


def megabytes(n: float) -> str:
    """Bytes as `12.3 MB` (decimal megabytes, as disks are sold)."""
    return f"{n / 1e6:.3g} MB" if n < 1e9 else f"{n / 1e9:.3g} GB"


def disk_use(keep: dict[int, float], raw_rows: int, per_second: int, rates: list[float]) -> str:
    """The expected size of history.db for fields at these rates, on one line: the total, then per
    field and resolution at 1 reading per second."""
    total = sum(sum(expected(keep, raw_rows, per_second, r).values()) for r in rates)
    one = expected(keep, raw_rows, per_second)
    parts = ", ".join(f"{'readings' if res == 0 else NAMES[res]} {megabytes(b)}" for res, b in one.items())
    return (f"history.db: about {megabytes(total)} when full for {len(rates)} field{'s' if len(rates) != 1 else ''};"
            f" a field at 1 reading/s: {megabytes(sum(one.values()))} ({parts})")


def private(path: Path, create: bool = True) -> None:
    """Make `path` owner-only (0600), creating it empty if missing and `create`.

    SQLite creates files 0644 (less the umask), and its -wal and -shm files take the
    database file's mode; readings can tell when a house is empty.
    """
    if create:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except FileNotFoundError:
        pass
    except OSError as e:  # not ours to change: worth a line in the log, not a failure
        log.warning("cannot make %s private (chmod 600): %s", path, e.strerror or e)


def is_corrupt(e: BaseException) -> bool:
    """True for SQLite's 'file is not a database' and 'database disk image is malformed'."""
    return isinstance(e, sqlite3.DatabaseError) and (getattr(e, "sqlite_errorcode", 0) & 0xFF) in CORRUPT


def encode(value: Value) -> str:
    """A value as the JSON text stored; numbers without json.dumps, which costs ten times more."""
    kind = type(value)
    if kind is float and math.isfinite(value):
        return repr(value)
    if kind is int:
        return str(value)
    return json.dumps(value)


def give_back_memory() -> None:
    """Return freed heap to the system (glibc's malloc_trim; nothing elsewhere): a start's load of
    every field's readings frees a few MB that the C library would otherwise keep for the life of
    the process."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc's, no search for it
    except (OSError, AttributeError):
        return  # not glibc (musl has no malloc_trim)
    trim(0)
