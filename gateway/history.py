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
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .hub import Field, Hub, Reading

log = logging.getLogger("iot_gateway.history")

FLUSH_EVERY = 2.0  # seconds
FLUSH_AT = 1000  # pending readings
PRUNE_EVERY = 300.0  # seconds

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    ref TEXT NOT NULL,
    t REAL NOT NULL,
    v TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_ref_t ON readings (ref, t);
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
        stored = await loop.run_in_executor(self._pool, self._open_and_load)
        for ref, rows in stored.items():
            try:
                f = self.hub.field(ref)
            except Exception:
                continue  # a field no longer in the config
            self._restore(f, rows)
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
        self._pending.append((f.ref, r.time, json.dumps(r.value)))
        if len(self._pending) >= FLUSH_AT:
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

    def _restore(self, f: Field, rows: list[tuple[float, str]]) -> None:
        for t, v in rows:
            try:
                value = json.loads(v)
            except ValueError:
                continue
            f.history.append(Reading(value, t))
        if f.history and f.latest is None:
            f.latest = f.history[-1]

    # ---------------------------------------------------------- worker thread

    def _open_and_load(self) -> dict[str, list[tuple[float, str]]]:
        db = sqlite3.connect(self.path, check_same_thread=False)
        db.executescript(SCHEMA)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self._db = db
        self._prune()
        out: dict[str, list[tuple[float, str]]] = {}
        for ref in [r[0] for r in db.execute("SELECT DISTINCT ref FROM readings")]:
            rows = db.execute(
                "SELECT t, v FROM readings WHERE ref = ? ORDER BY t DESC LIMIT ?",
                (ref, self.hub.history_size),
            ).fetchall()
            out[ref] = list(reversed(rows))
        return out

    def _insert(self, batch: list[tuple[str, float, str]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany("INSERT INTO readings (ref, t, v) VALUES (?, ?, ?)", batch)

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
