"""Field history persisted in SQLite, so `history` survives a restart.

The hub keeps the live history in memory; this store mirrors it to
`state_dir/history.db` in batches (a busy field costs one INSERT per batch, not
one transaction per reading), and loads it back at start. Rows are bounded by
`history_size` per field (trimmed as batches are written, so a flood cannot
fill the disk) and by the optional `retention` window.

An SD card wears with small frequent writes, so the batches are far apart
(FLUSH_EVERY, `[gateway] history_flush`): every commit rewrites whole 4 KiB
pages. And at most `per_second` readings of a field per second reach the disk
(the first ones and the last of each second; the hub keeps them all in
memory), so a device flooding readings costs the disk no more than a busy one.

The database is a convenience, never a reason to stop: when it cannot be
opened or written (a full disk, a read-only folder, a file that is not a
database) readings stay in memory, the hub's `history` problem says why, and
writing resumes by itself once it works again. A corrupt database is moved
aside (`history.db.corrupt-<time>`) and a new one started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path
from typing import Any

from .hub import Field, History, Hub, NodeEvent, Reading
from .values import Value

log = logging.getLogger("iot_gateway.history")

FLUSH_EVERY = 60.0  # seconds between batches: what a power cut can lose of history.db
FLUSH_AT = 1000  # pending readings
PRUNE_EVERY = 300.0  # seconds between retention sweeps
REOPEN_EVERY = 30.0  # seconds between attempts to open a database that could not be opened
PENDING_MAX = 20_000  # readings kept for the database while it cannot be written; the oldest go first
SHARED_VALUES = 10_000  # distinct stored values a load keeps, so equal readings share one object
PROBLEM = "history"  # the component name in the hub's problems
SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of a database file
CORRUPT = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)

SCHEMA = """
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


class HistoryStore:
    """Mirrors the hub's readings to SQLite; all database work runs on one worker thread."""

    def __init__(
        self,
        hub: Hub,
        path: Path,
        retention: float | None = None,
        flush_every: float | None = None,
        sync: str = "full",
        per_second: int = 0,
    ):
        """`flush_every`: seconds between batches (None: FLUSH_EVERY); `sync`: SQLite's synchronous
        (`full`: a committed batch survives a power cut); `per_second`: readings per field per second
        written (0: all)."""
        self.hub = hub
        self.path = Path(path)
        self.retention = retention
        self.flush_every = flush_every
        self.sync = sync
        self.per_second = per_second
        self.thinned = 0  # readings kept in memory only, past `per_second`
        # ref -> [second, readings written in it, the latest reading held back in it]
        self._slots: dict[str, list] = {}
        self._pending: list[tuple[str, float, str]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        self._db: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        # Flushes, reopening and sweeps one at a time, so a failure is handled before the next try.
        self._lock = asyncio.Lock()
        self._cause: str | None = None  # why readings are not being saved, while they are not
        self._next_open = 0.0  # monotonic time of the next attempt to open the database
        self._moved: str | None = None  # the notice after a corrupt database was moved aside
        # Rows written per field since its last trim (worker thread only).
        self._added: dict[str, int] = {}
        self._side: set[asyncio.Task[None]] = set()  # loads and renames for devices that came and went

    @property
    def slack(self) -> int:
        """Rows a field may gain over history_size before it is trimmed: the table stays under 1.5×."""
        return max(1, self.hub.history_size // 2)

    async def start(self) -> None:
        """Open the database, load stored readings into the hub, and start mirroring.

        Never fails for the database's sake: without one, history is kept in memory only.
        """
        loop = asyncio.get_running_loop()
        self._next_open = time.monotonic() + REOPEN_EVERY
        try:
            refs = await loop.run_in_executor(self._pool, self._open, None)
            # Field by field: a full history (200 fields of 1000 readings) fetched at once
            # would leave its rows' memory behind, fragmented, for the life of the process.
            shared: dict[str, Value] = {}
            for ref in refs:
                try:
                    f = self.hub.field(ref)
                except Exception:
                    continue  # a field no longer in the config
                self._restore(f, await loop.run_in_executor(self._pool, self._load, ref), shared)
        except (sqlite3.Error, OSError) as e:
            await self._failed(e)
        else:
            self._opened()
        self.hub.subscribe(reading=self._on_reading)
        self.hub.subscribe(node=self._on_node)
        self._task = asyncio.create_task(self._run(), name="history-flush")

    async def stop(self) -> None:
        """Flush what is pending and close the database."""
        self.hub.unsubscribe(self._on_reading)
        self.hub.unsubscribe(self._on_node)
        for side in list(self._side):
            side.cancel()
        self._release(None)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._close)
        self._pool.shutdown(wait=True)

    async def flush(self) -> None:
        """Write pending readings in one transaction; on failure keep them (bounded) for the next try."""
        if self._side:  # a rename or a late load first, so the database is as of now
            await asyncio.gather(*list(self._side), return_exceptions=True)
        async with self._lock:
            await self._flush()

    async def _flush(self) -> None:
        self._release(int(time.time()))
        if not self._pending:
            return
        if self._db is None:  # memory only until the database opens again
            del self._pending[:-PENDING_MAX]
            return
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._insert, batch)
        except (sqlite3.Error, OSError) as e:
            self._pending[:0] = batch
            del self._pending[:-PENDING_MAX]
            await self._failed(e)
        else:
            self._worked()

    def _on_reading(self, f: Field, r: Reading) -> None:
        if self.per_second:
            ref = f.ref
            second = int(r.time)
            slot = self._slots.get(ref)
            if slot is None or slot[0] != second:
                if slot is not None and slot[2] is not None:
                    held = slot[2]
                    self._pending.append((ref, held.time, encode(held.value)))
                slot = self._slots[ref] = [second, 0, None]
            if slot[1] >= self.per_second - 1:
                # Past the limit: held back; only the last of the second is written, once it is over.
                if slot[2] is not None:
                    self.thinned += 1
                slot[2] = r
                return
            slot[1] += 1
        self._pending.append((f.ref, r.time, encode(r.value)))
        if len(self._pending) == FLUSH_AT:  # once: until the flush runs, more readings only queue up
            asyncio.ensure_future(self.flush())

    # ------------------------------------------------------------ devices that come and go

    def _on_node(self, event: NodeEvent) -> None:
        """A device discovered at run time gets its stored history back; a renamed one takes its
        rows along (the same device under a new name). A removed one keeps its rows: it may come back."""
        if event.kind == "renamed":
            old, new = event.old_id + ".", event.node.id + "."
            self._pending = [((new + r[len(old):]) if r.startswith(old) else r, t, v) for r, t, v in self._pending]
            self._slots = {(new + r[len(old):]) if r.startswith(old) else r: s for r, s in self._slots.items()}
            self._later(self._rename(event.old_id, event.node.id), "history-rename")
        elif event.kind in ("added", "changed") and event.new:
            fields = [event.node.fields[n] for n in event.new if n in event.node.fields]
            self._later(self._restore_late(fields), "history-load")

    def _later(self, coro: Any, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _rename(self, old: str, new: str) -> None:
        async with self._lock:
            if self._db is None:
                log.warning("history: %s renamed to %s while history.db is not usable: its stored rows keep the old name", old, new)
                return
            try:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._move, old, new)
            except (sqlite3.Error, OSError) as e:
                await self._failed(e)

    async def _restore_late(self, fields: list[Field]) -> None:
        """Stored readings of fields that appeared after start, before the ones they got since."""
        async with self._lock:
            if self._db is None:
                return
            loop = asyncio.get_running_loop()
            shared: dict[str, Value] = {}
            for f in fields:
                try:
                    rows = await loop.run_in_executor(self._pool, self._load, f.ref)
                except (sqlite3.Error, OSError) as e:
                    await self._failed(e)
                    return
                if not rows or f.node.fields.get(f.name) is not f:
                    continue  # nothing stored, or the field went away meanwhile
                since = list(f.history)
                # Rows already flushed from this run are in memory: keep the stored ones before them.
                first = since[0].time if since else math.inf
                f.history = History(self.hub.history_size, f.spec.type == "numeric")
                latest = f.latest
                f.latest = None
                self._restore(f, [(t, v) for t, v in rows if t < first], shared)
                for r in since:
                    f.history.append(r)
                if latest is not None:
                    f.latest = latest

    def _release(self, second: int | None) -> None:
        """Queue the readings held back in seconds other than `second` (all of them with None)."""
        for ref, slot in self._slots.items():
            held = slot[2]
            if held is not None and slot[0] != second:
                self._pending.append((ref, held.time, encode(held.value)))
                slot[2] = None

    async def _run(self) -> None:
        last_prune = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.flush_every or FLUSH_EVERY)
            try:
                async with self._lock:
                    if self._db is None and time.monotonic() >= self._next_open:
                        await self._reopen()
                    await self._flush()
                    if (
                        self.retention is not None
                        and self._db is not None
                        and time.monotonic() - last_prune > PRUNE_EVERY
                    ):
                        last_prune = time.monotonic()
                        try:
                            await loop.run_in_executor(self._pool, self._expire)
                        except (sqlite3.Error, OSError) as e:
                            await self._failed(e)
            except Exception:
                log.exception("history: unexpected error; trying again in %g s", FLUSH_EVERY)

    async def _reopen(self) -> None:
        """Try to open the database again; the readings since are in the hub and in `_pending`."""
        self._next_open = time.monotonic() + REOPEN_EVERY
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._open, None)
        except (sqlite3.Error, OSError) as e:
            await self._failed(e)
        else:
            self._opened()

    def _opened(self) -> None:
        if self._moved is not None:
            # The new database works, but what was stored before is gone: the admins should know
            # (often a failing SD card), so this stays shown until the next start.
            log.error("history: %s", self._moved)
            self._cause = None
            self.hub.set_problem(PROBLEM, self._moved)
            self._moved = None
        else:
            self._worked()

    async def _failed(self, e: Exception) -> None:
        """Report a database failure once per cause; a corrupt database is moved aside and replaced."""
        loop = asyncio.get_running_loop()
        if _corrupt(e) and self._db is not None:
            try:
                await loop.run_in_executor(self._pool, self._open, str(e))
            except (sqlite3.Error, OSError) as again:
                e = again
            else:
                self._opened()
                return
        cause = self._describe(e)
        if cause != self._cause:
            self._cause = cause
            log.error(
                "history is not saved to %s: %s; readings stay in memory until it works again", self.path, cause
            )
            self.hub.set_problem(PROBLEM, f"not saved: {cause}")

    def _worked(self) -> None:
        if self._cause is not None:
            self._cause = None
            log.warning("history is saved to %s again", self.path)
            self.hub.set_problem(PROBLEM, None)

    def _describe(self, e: Exception) -> str:
        if isinstance(e, OSError):
            where = self.path.name if e.filename in (None, str(self.path)) else e.filename
            return f"{where}: {e.strerror or e}"
        return str(e) or type(e).__name__

    def _restore(self, f: Field, rows: list[tuple[float, str]], shared: dict[str, Value]) -> None:
        for t, v in rows:
            value = shared.get(v)
            if value is None:
                try:
                    value = json.loads(v)
                except ValueError:
                    continue
                if len(shared) >= SHARED_VALUES:
                    shared.clear()
                shared[v] = value
            f.history.append(Reading(value, t))
        if f.history and f.latest is None:
            f.latest = f.history[-1]

    # ---------------------------------------------------------- worker thread

    def _open(self, corrupt: str | None) -> list[str]:
        """Open (and prune) the database; the fields it holds readings of.

        A corrupt database (or the current one, when `corrupt` says why it is) is moved
        aside and a new one started. Raises OSError or sqlite3.Error when there is no usable database.
        """
        self._close()
        if corrupt is not None:
            self._set_aside(corrupt)
        try:
            return self._connect()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                raise
            self._set_aside(str(e))
            return self._connect()

    def _connect(self) -> list[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.executescript(SCHEMA)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            self._prune(db)
            refs = [r[0] for r in db.execute("SELECT DISTINCT ref FROM readings")]
        except BaseException:
            db.close()
            raise
        for suffix in SIDE_FILES:  # created by SQLite with the database's mode; older ones may not be
            private(self.path.with_name(self.path.name + suffix), create=False)
        self._db = db
        self._added.clear()
        return refs

    def _set_aside(self, why: str) -> None:
        """Rename the database (and its -wal/-shm/-journal) to `history.db.corrupt-<time>`."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(self.path, target)
            for suffix in SIDE_FILES:
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.rename(side, target.with_name(target.name + suffix))
        except OSError as e:
            raise OSError(e.errno, f"corrupt ({why}) and cannot be moved aside: {e.strerror}", str(self.path)) from e
        self._moved = f"database was corrupt ({why}): moved aside to {target.name}, new one started"

    def _move(self, old: str, new: str) -> None:
        """Give the rows of device `old` to `new` (a rename); rows `new` had are a former device's: dropped."""
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("database closed")
        o, n = old + ".", new + "."
        with db:
            db.execute("DELETE FROM readings WHERE substr(ref, 1, ?) = ?", (len(n), n))
            db.execute(
                "UPDATE readings SET ref = ? || substr(ref, ?) WHERE substr(ref, 1, ?) = ?",
                (n, len(o) + 1, len(o), o),
            )
        self._added = {(n + r[len(o):]) if r.startswith(o) else r: c for r, c in self._added.items()}

    def _load(self, ref: str) -> list[tuple[float, str]]:
        """The last `history_size` readings of one field stored (insertion order, whatever their stamps), oldest first."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT t, v FROM readings WHERE ref = ? ORDER BY rowid DESC LIMIT ?",
            (ref, self.hub.history_size),
        ).fetchall()
        rows.reverse()
        return rows

    def _insert(self, batch: list[tuple[str, float, str]]) -> None:
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("database closed")
        counts = Counter(map(itemgetter(0), batch))
        added = self._added
        slack = self.slack
        full = []
        for ref, n in counts.items():
            total = added.get(ref, 0) + n
            if total >= slack:
                full.append(ref)
        with db:
            # One statement for the whole batch: sqlite3 lets go of the GIL around every step,
            # and executemany steps once per row, so a busy event loop thread would have to
            # win the GIL back a thousand times per flush.
            db.execute(INSERT_BATCH, (json.dumps(batch),))
            # A field trimmed only once it has gained `slack` rows: one DELETE of a run of rows
            # then, instead of a few rows every batch.
            for ref in full:
                db.execute(TRIM_FIELD, (ref, self.hub.history_size))
        for ref, n in counts.items():
            added[ref] = added.get(ref, 0) + n
        for ref in full:
            added[ref] = 0

    def _prune(self, db: sqlite3.Connection) -> None:
        """Every field down to history_size rows, and rows past the retention window gone."""
        with db:
            if self.retention is not None:
                db.execute("DELETE FROM readings WHERE t < ?", (time.time() - self.retention,))
            # Keep at most history_size rows per field: drop all but the last N inserted.
            db.execute(
                """DELETE FROM readings WHERE rowid IN (
                     SELECT rowid FROM (
                       SELECT rowid, ROW_NUMBER() OVER (PARTITION BY ref ORDER BY rowid DESC) AS n
                       FROM readings) WHERE n > ?)""",
                (self.hub.history_size,),
            )

    def _expire(self) -> None:
        """Drop readings older than the retention window."""
        if self._db is None or self.retention is None:
            return
        with self._db:
            self._db.execute("DELETE FROM readings WHERE t < ?", (time.time() - self.retention,))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


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


def _corrupt(e: BaseException) -> bool:
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
