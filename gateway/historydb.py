"""history.db's file: its schema and statements, the size it grows to, its permissions, and how
a value is stored. The store that writes and reads it is gateway/history.py."""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from pathlib import Path

from .rollups import NAMES, RES
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
