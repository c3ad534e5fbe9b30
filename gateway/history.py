"""Field history persisted in SQLite, so `history` survives a restart.

The hub keeps the live history in memory; this store mirrors it to
`state_dir/history.db` in batches (a busy field costs one INSERT per batch, not
one transaction per reading), and loads it back at start. Rows are bounded by
`history_size` per field and by the optional `retention` window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .hub import Field, Hub, Reading
from .values import Value

log = logging.getLogger("iot_gateway.history")

FLUSH_EVERY = 2.0  # seconds
FLUSH_AT = 1000  # pending readings
PRUNE_EVERY = 300.0  # seconds
SHARED_VALUES = 10_000  # distinct stored values a load keeps, so equal readings share one object

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


class HistoryStore:
    """Mirrors the hub's readings to SQLite; all database work runs on one worker thread."""

    def __init__(self, hub: Hub, path: Path, retention: float | None = None):
        self.hub = hub
        self.path = Path(path)
        self.retention = retention
        self._pending: list[tuple[str, float, str]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="history")
        self._db: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the database, load stored readings into the hub, and start mirroring."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        refs = await loop.run_in_executor(self._pool, self._open)
        # Field by field: a full history (200 fields of 1000 readings) fetched at once
        # would leave its rows' memory behind, fragmented, for the life of the process.
        shared: dict[str, Value] = {}
        for ref in refs:
            try:
                f = self.hub.field(ref)
            except Exception:
                continue  # a field no longer in the config
            self._restore(f, await loop.run_in_executor(self._pool, self._load, ref), shared)
        self.hub.subscribe(reading=self._on_reading)
        self._task = asyncio.create_task(self._run(), name="history-flush")

    async def stop(self) -> None:
        """Flush what is pending and close the database."""
        self.hub.unsubscribe(self._on_reading)
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
        """Write pending readings in one transaction."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._insert, batch)

    def _on_reading(self, f: Field, r: Reading) -> None:
        self._pending.append((f.ref, r.time, encode(r.value)))
        if len(self._pending) == FLUSH_AT:  # once: until the flush runs, more readings only queue up
            asyncio.ensure_future(self.flush())

    async def _run(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            try:
                await self.flush()
                if time.monotonic() - last_prune > PRUNE_EVERY:
                    last_prune = time.monotonic()
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._pool, self._prune)
            except sqlite3.Error as e:
                log.error("cannot write history to %s: %s", self.path, e)

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

    def _open(self) -> list[str]:
        """Open (and prune) the database; the fields it holds readings of."""
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.executescript(SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self._db = db
        self._prune()
        return [r[0] for r in db.execute("SELECT DISTINCT ref FROM readings")]

    def _load(self, ref: str) -> list[tuple[float, str]]:
        """The newest `history_size` readings of one field, oldest first."""
        assert self._db is not None
        rows = self._db.execute(
            "SELECT t, v FROM readings WHERE ref = ? ORDER BY t DESC LIMIT ?",
            (ref, self.hub.history_size),
        ).fetchall()
        rows.reverse()
        return rows

    def _insert(self, batch: list[tuple[str, float, str]]) -> None:
        assert self._db is not None
        with self._db:
            # One statement for the whole batch: sqlite3 lets go of the GIL around every step,
            # and executemany steps once per row, so a busy event loop thread would have to
            # win the GIL back a thousand times per flush.
            self._db.execute(INSERT_BATCH, (json.dumps(batch),))

    def _prune(self) -> None:
        assert self._db is not None
        with self._db:
            if self.retention is not None:
                self._db.execute("DELETE FROM readings WHERE t < ?", (time.time() - self.retention,))
            # Keep at most history_size rows per field: drop those older than the Nth newest.
            self._db.execute(
                """DELETE FROM readings WHERE rowid IN (
                     SELECT rowid FROM (
                       SELECT rowid, ROW_NUMBER() OVER (PARTITION BY ref ORDER BY t DESC) AS n
                       FROM readings) WHERE n > ?)""",
                (self.hub.history_size,),
            )

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def encode(value: Value) -> str:
    """A value as the JSON text stored; numbers without json.dumps, which costs ten times more."""
    kind = type(value)
    if kind is float and math.isfinite(value):
        return repr(value)
    if kind is int:
        return str(value)
    return json.dumps(value)
