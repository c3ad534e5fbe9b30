"""Field history persisted in SQLite, so `history` survives a restart.

The hub keeps the live history in memory; this store mirrors it to
`state_dir/history.db` in batches (a busy field costs one INSERT per batch, not
one transaction per reading), and loads it back at start. Rows are bounded by
`history_size` per field (trimmed as batches are written, so a flood cannot
fill the disk), by the `raw` keep time (`history_raw`), and by the optional `retention` window.

Beside the readings, every reading the hub gets (thinned or not) is rolled up into
1-minute, 1-hour and 1-day buckets (gateway/rollups.py), each resolution kept for its own
time (`history_minutes`, `history_hours`, `history_days`). A bucket is written after it
closes, with a batch of readings (every ROLLUP_EVERY-th one: each that carries buckets
dirties a page more): no write per reading. What a restart or `kill -9` keeps is
what the last batch wrote (the readings and the closed buckets, in one transaction); the
open buckets are rebuilt at start from what is stored: the open day from the stored hours
after the last stored day, the open hour from the stored minutes after the last stored
hour, the open minute from the stored readings after the last stored minute. A bucket
row is keyed by (field, resolution, start), so writing it again never counts twice.

An SD card wears with small frequent writes, so the batches are far apart
(FLUSH_EVERY, `[gateway] history_flush`): every commit rewrites whole pages
(1 KiB in a new database: gateway/historydb.py). And at most `per_second` readings of a
field per second reach the disk (the first ones and the last of each second; the hub keeps
them all in memory), so a device flooding readings costs the disk no more than a busy one.

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
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from .historydb import (
    CACHE_KIB, INSERT_BATCH, ORDER_SCHEMA, PAGE_SIZE, REFS, SCHEMA, SIDE_FILES, TRIM_FIELD, WAL_BYTES, Opened, Order,
    Stored, encode, expected, give_back_memory, is_corrupt, megabytes, newest, private,
)
from .hub import Field, History, Hub, NodeEvent, Reading
from .rollups import COLUMNS, RES, UPSERT, Bucket, Roller, Window, choose, plan
from .rollups import SCHEMA as ROLLUP_SCHEMA
from .values import Value

log = logging.getLogger("iot_gateway.history")

FLUSH_EVERY = 60.0  # seconds between batches: what a power cut can lose of history.db
FLUSH_AT = 1000  # pending readings
PRUNE_EVERY = 300.0  # seconds between retention sweeps
REOPEN_EVERY = 30.0  # seconds between attempts to open a database that could not be opened
PENDING_MAX = 20_000  # readings kept for the database while it cannot be written; the oldest go first
ROLLED_MAX = 100_000  # closed buckets kept for the database while it cannot be written
# Closed buckets go with every ROLLUP_EVERY-th periodic batch (30 minutes at the default
# history_flush): each batch that carries some dirties a page of the rollups table. A kill loses
# none of them: they are rebuilt at start from the readings written meanwhile (see the docstring).
ROLLUP_EVERY = 30
KEEP = {0: 2 * 86400.0, 60: 7 * 86400.0, 3600: 365 * 86400.0, 86400: 3650 * 86400.0}  # default keep times
RAW_ROWS = 20_000  # default readings kept on disk per field (history_raw_rows)
VERSION = 3  # PRAGMA user_version: 2 has rollups, 3 marks unordered fields
SHARED_VALUES = 10_000  # distinct stored values a load keeps, so equal readings share one object
LOAD_CHUNK = 20  # fields a start loads per trip to the database thread
PROBLEM = "history"  # the component name in the hub's problems


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
        keep: dict[int, float] | None = None,
        raw_rows: int | None = None,
    ):
        """`flush_every`: seconds between batches (None: FLUSH_EVERY); `sync`: SQLite's synchronous
        (`full`: a committed batch survives a power cut); `per_second`: readings per field per second
        written (0: all); `keep`: seconds kept per resolution (0: raw readings; default KEEP);
        `raw_rows`: readings kept on disk per field (default: the hub's history_size)."""
        self.hub = hub
        self.path = Path(path)
        self.retention = retention
        self.flush_every = flush_every
        self.sync = sync
        self.per_second = per_second
        self.keep = dict(KEEP if keep is None else keep)
        self.raw_rows = hub.history_size if raw_rows is None else raw_rows
        self.rollers: dict[str, Roller] = {}
        self._rolled: list[tuple[str, Bucket]] = []  # closed buckets not yet written
        self._batches = 0  # periodic batches so far (ROLLUP_EVERY)
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
        self._migrated = False  # the database was of an older version when opened (see _tidy)
        self._untidy = False  # opened by a start, not pruned and swept yet (see _tidied)
        self.order = Order()  # which fields have readings stored out of time order
        self._side: set[asyncio.Task[None]] = set()  # loads and renames for devices that came and went

    @property
    def slack(self) -> int:
        """Rows a field may gain over raw_rows before it is trimmed: the table stays under 1.5×."""
        return max(1, self.raw_rows // 2)

    async def start(self) -> None:
        """Open the database, load stored readings into the hub, and start mirroring.

        Never fails for the database's sake: without one, history is kept in memory only.
        """
        loop = asyncio.get_running_loop()
        self._next_open = time.monotonic() + REOPEN_EVERY
        try:
            # Pruned and swept before the first write (_tidied), not now: both read every field's
            # index, 1.4 s of a start with 200 fields of 20,000 readings, and of its CPU.
            refs = await loop.run_in_executor(self._pool, self._open, None, False)
            self._untidy = True
            # A few fields a trip to the database thread: a trip per field cost 0.1 s of a start with
            # 200 fields, and all of them fetched at once would leave memory behind, fragmented.
            shared: dict[str, Value] = {}
            for i in range(0, len(refs), LOAD_CHUNK):
                chunk = refs[i:i + LOAD_CHUNK]
                fields = {ref: self._configured(ref) for ref in chunk}
                for ref, opened, stored in await loop.run_in_executor(self._pool, self._load_fields, fields, shared):
                    self._rebuild(ref, *opened)
                    f = fields[ref]
                    if f is not None:
                        self._restore(f, *stored)
            await loop.run_in_executor(self._pool, self._shrink)
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

    async def flush(self, everything: bool = True) -> None:
        """Write pending readings and closed buckets in one transaction (without `everything`, the
        buckets only every ROLLUP_EVERY-th time, as the periodic batches do); on failure keep them
        (bounded) for the next try."""
        if self._side:  # a rename or a late load first, so the database is as of now
            await asyncio.gather(*list(self._side), return_exceptions=True)
        async with self._lock:
            await self._flush(everything)

    async def _flush(self, everything: bool = False) -> None:
        now = time.time()
        self._release(int(now))
        rolled = self._rolled
        out: list[Bucket] = []
        # A field's next reading closes its buckets; one gone quiet has them closed once they are
        # half the raw keep time old (so a restart can still rebuild them from stored readings).
        # Not sooner: readings stamped by a device (or replayed) may come late.
        quiet = now - self.keep[0] / 2
        for ref, roller in self.rollers.items():
            roller.due(quiet, out)
            rolled.extend((ref, b) for b in out)
            out.clear()
        self._batches += 1
        if not everything and self._batches % ROLLUP_EVERY and len(rolled) < ROLLED_MAX // 2:
            rolled = []  # not yet: a page of the rollups table less in most commits
        if not self._pending and not rolled:
            return
        if self._db is None:  # memory only until the database opens again
            del self._pending[:-PENDING_MAX]
            del self._rolled[:-ROLLED_MAX]
            return
        batch, self._pending = self._pending, []
        self._rolled = self._rolled[len(rolled):]
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._insert, batch, rolled)
        except (sqlite3.Error, OSError) as e:
            self._pending[:0] = batch
            del self._pending[:-PENDING_MAX]
            self._rolled[:0] = rolled
            del self._rolled[:-ROLLED_MAX]
            self._batches = -1  # the next batch tries them again
            await self._failed(e)
        else:
            self._worked()

    def _on_reading(self, f: Field, r: Reading) -> None:
        ref = f.ref
        roller = self.rollers.get(ref)
        if roller is None:
            roller = self.rollers[ref] = Roller()
        m = roller.open[0]
        if m is not None and m.t <= r.time < m.t + 60:
            m.add(r.value, r.time)  # the common case, without a call more
        else:
            out: list[Bucket] = []
            roller.add(r.value, r.time, out)
            self._rolled.extend((ref, b) for b in out)
        if self.per_second:
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
        self._pending.append((ref, r.time, encode(r.value)))
        if len(self._pending) == FLUSH_AT:  # once: until the flush runs, more readings only queue up
            asyncio.ensure_future(self.flush(everything=False))

    # ------------------------------------------------------------ devices that come and go

    def _on_node(self, event: NodeEvent) -> None:
        """A device discovered at run time gets its stored history back; a renamed one takes its
        rows along (the same device under a new name). A removed one keeps its rows: it may come back."""
        if event.kind == "renamed":
            old, new = event.old_id + ".", event.node.id + "."
            self._pending = [((new + r[len(old):]) if r.startswith(old) else r, t, v) for r, t, v in self._pending]
            self._slots = {(new + r[len(old):]) if r.startswith(old) else r: s for r, s in self._slots.items()}
            self.rollers = {(new + r[len(old):]) if r.startswith(old) else r: s for r, s in self.rollers.items()}
            self._rolled = [((new + r[len(old):]) if r.startswith(old) else r, b) for r, b in self._rolled]
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
                    times, values = await loop.run_in_executor(self._pool, self._load, f.ref, shared)
                except (sqlite3.Error, OSError) as e:
                    await self._failed(e)
                    return
                if not times or f.node.fields.get(f.name) is not f:
                    continue  # nothing stored, or the field went away meanwhile
                since = list(f.history)
                # Rows already flushed from this run are in memory: keep the stored ones before them.
                first = since[0].time if since else math.inf
                f.history = History(self.hub.history_size, f.spec.type == "numeric")
                latest = f.latest
                f.latest = None
                older = [(t, v) for t, v in zip(times, values) if t < first]
                self._restore(f, [t for t, _ in older], [v for _, v in older])
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
                    if self._db is not None and time.monotonic() - last_prune > PRUNE_EVERY:
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
        if is_corrupt(e) and self._db is not None:
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

    def _rebuild(self, ref: str, floors: list[float], hours: list[Bucket], minutes: list[Bucket],
                 raw: list[tuple[float, str]]) -> None:
        """A field's open buckets from what is stored (see the module's docstring); buckets this
        closes (the gateway was off when they ended) go out with the next batch."""
        roller = Roller()
        roller.floor = list(floors)
        out: list[Bucket] = []
        for b in hours:
            roller.feed(2, b, out)
        for b in minutes:
            roller.feed(1, b, out)
        for t, v in raw:
            try:
                roller.add(json.loads(v), t, out)
            except ValueError:
                continue
        self.rollers[ref] = roller
        self._rolled.extend((ref, b) for b in out)

    # ---------------------------------------------------------- answering windows

    async def answer(self, f: Field, window: Window, rows: int) -> "Answer":
        """What `f` did in `window`: the exact summary, and rows at the finest resolution
        giving at most about `rows` (or the window's `by`)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            stored = await loop.run_in_executor(self._pool, self._stored_span, f.ref)
        mem_times, mem_values = f.history.since(-math.inf)
        mem_start = mem_times[0] if mem_times else math.inf
        avail = {res: t for res, t in stored.items()}
        avail[0] = min(avail.get(0, math.inf), mem_start)
        now = time.time()
        cap = math.inf if self.retention is None else self.retention
        res = choose(window.start, window.end, {r: now - min(self.keep[r], cap) for r in RES}, rows, window.by)
        pieces = plan(window.start, window.end, avail)
        async with self._lock:
            found = await loop.run_in_executor(self._pool, self._fetch, f.ref, pieces, res, window, mem_start)
        buckets: dict[int, dict[float, Bucket]] = {r: {} for r in RES}
        for r, b in found[0]:
            buckets[r][b.t] = b
        for ref, b in self._rolled:  # closed, not yet written
            if ref == f.ref:
                buckets[b.res][b.t] = b
        roller = self.rollers.get(f.ref)
        if roller is not None:
            for b in roller.snapshot():
                buckets[b.res][b.t] = b
        summary = Bucket(window.start, 0)
        for r, a, b in pieces:
            if r == 0:
                part = Bucket(a, max(0, math.ceil(b - a)))  # a bucket as long as the piece: no clamping
                for t, v in found[1]:  # the stored readings up to the oldest one in memory, memory's after it
                    if a <= t < b and t <= mem_start:
                        part.add(v, t)
                i = bisect_left(mem_times, a) if a > mem_start else bisect_right(mem_times, mem_start)
                j = bisect_left(mem_times, b)
                for t, v in zip(mem_times[i:j], mem_values[i:j]):
                    part.add(v, t)
                summary.merge(part)
            else:
                for t in sorted(buckets[r]):
                    if a <= t < b:
                        summary.merge(buckets[r][t])
        first = math.floor(window.start / res) * res
        shown = [buckets[res][t] for t in sorted(buckets[res]) if first <= t < window.end]
        since = min([*stored.values(), mem_start, *(b.t for b in shown)], default=math.inf)
        return Answer(res, shown, summary, since)

    async def oldest(self, f: Field) -> float:
        """Before what history.db may hold readings of `f`: its oldest reading, or its oldest bucket's end."""
        async with self._lock:
            stored = await asyncio.get_running_loop().run_in_executor(self._pool, self._stored_span, f.ref)
        return min([stored.get(0, math.inf), *(t + res for res, t in stored.items() if res)])

    def disk(self) -> str:
        """history.db's size now, and when full for the fields it holds at one reading per second
        (status, for admins)."""
        try:
            now = sum(os.path.getsize(self.path.with_name(self.path.name + s)) for s in ("", "-wal")
                      if self.path.with_name(self.path.name + s).exists())
        except OSError as e:
            return f"history.db: size unknown ({e.strerror or e})"
        fields = max(1, len(self.rollers))
        full = sum(expected(self.keep, self.raw_rows, self.per_second).values()) * fields
        return f"history.db: {megabytes(now)} (full: ~{megabytes(full)})"  # 40 columns: a phone's line

    def kept_from(self, now: float) -> float:
        """The oldest time anything is kept from, by the config."""
        cap = math.inf if self.retention is None else self.retention
        return now - min(max(self.keep.values()), cap)

    def _stored_span(self, ref: str) -> dict[int, float]:
        """The oldest stored time per resolution (0: readings) for a field."""
        db = self._db
        if db is None:
            return {}
        out = {}
        t = db.execute("SELECT min(t) FROM readings WHERE ref = ?", (ref,)).fetchone()[0]
        if t is not None:
            out[0] = t
        for res in RES:
            t = db.execute("SELECT min(t) FROM rollups WHERE ref = ? AND res = ?", (ref, res)).fetchone()[0]
            if t is not None:
                out[res] = t
        return out

    def _fetch(self, ref: str, pieces: list[tuple[int, float, float]], res: int, window: Window,
               mem_start: float) -> tuple[list[tuple[int, Bucket]], list[tuple[float, Value]]]:
        """Stored buckets for the pieces and the shown rows, and stored readings older than memory."""
        db = self._db
        if db is None:
            return [], []
        spans = [(r, a, b) for r, a, b in pieces if r] + [(res, math.floor(window.start / res) * res, window.end)]
        buckets = []
        for r, a, b in spans:
            for row in db.execute(
                f"SELECT {COLUMNS} FROM rollups WHERE ref = ? AND res = ? AND t >= ? AND t < ? ORDER BY t",
                (ref, r, a, b),
            ):
                buckets.append((r, Bucket.from_row(row)))
        raw = []
        for r, a, b in pieces:
            if r == 0 and a <= mem_start:
                for t, v in db.execute(
                    "SELECT t, v FROM readings WHERE ref = ? AND t >= ? AND t < ? AND t <= ? ORDER BY t", (ref, a, b, mem_start)
                ):
                    try:
                        raw.append((t, json.loads(v)))
                    except ValueError:
                        continue
        return buckets, raw

    def _configured(self, ref: str) -> Field | None:
        try:
            return self.hub.field(ref)
        except Exception:  # a field no longer in the config
            return None

    @staticmethod
    def _restore(f: Field, times: Sequence[float], values: Sequence[Value]) -> None:
        """Stored readings (oldest first) into a field's memory, before any it got since start."""
        if not f.history and isinstance(times, array) and isinstance(values, (array, list)):
            f.history.take(times, values)  # _load's own arrays and list: kept, not copied
        else:
            for t, v in zip(times, values):
                f.history.append(Reading(v, t))
        if f.history and f.latest is None:
            f.latest = f.history[-1]

    # ---------------------------------------------------------- worker thread

    def _open(self, corrupt: str | None, tidy: bool = True) -> list[str]:
        """Open (and prune and sweep, with `tidy`) the database; the fields it holds readings of.

        A corrupt database (or the current one, when `corrupt` says why it is) is moved
        aside and a new one started. Raises OSError or sqlite3.Error when there is no usable database.
        """
        self._close()
        if corrupt is not None:
            self._set_aside(corrupt)
        def attempt() -> list[str]:
            refs = self._connect()
            if tidy:
                self._tidy()  # its prune is what finds most corruption
            return refs

        try:
            return attempt()
        except sqlite3.DatabaseError as e:
            if not is_corrupt(e):
                raise
            self._set_aside(str(e))
            return attempt()

    def _tidied(self) -> None:
        """Before a write: the prune and sweep a start left for later, if not done yet."""
        if self._untidy and self._db is not None:
            self._tidy()

    def _tidy(self) -> None:
        """Every field down to raw_rows readings, and what is past its keep time dropped; not the
        latter in a database just migrated (its readings are rolled up first, then expired by the
        next sweep)."""
        assert self._db is not None
        self._untidy = False
        self._prune(self._db)  # first: it reads every row, so a corrupt database is found before it is written
        if not self._migrated:
            self._expire(self._db)
        self._shrink()  # both read every field's index

    def _connect(self) -> list[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private(self.path)
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.executescript(SCHEMA)
            db.execute("PRAGMA journal_mode=WAL")
            page = db.execute("PRAGMA page_size").fetchone()[0]
            if page > PAGE_SIZE:
                log.info("history.db has %d-byte pages: `iot-gateway compact`, with the gateway stopped, "
                         "rewrites it with %d-byte ones, about half the writes (docs/history.md)", page, PAGE_SIZE)
            db.execute(f"PRAGMA wal_autocheckpoint = {max(1, WAL_BYTES // page)}")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            # Debian builds SQLite to zero every deleted byte, freed pages too: 6 % of what a full
            # store writes (its trims free whole pages). FAST zeroes only in pages written anyway.
            db.execute("PRAGMA secure_delete = FAST")
            old = db.execute("PRAGMA user_version").fetchone()[0] < VERSION
            if old:
                # Pruned before the rollups table is added: it reads every row, so a corrupt database
                # is found before it is written. A current one is pruned before its first write (_tidied).
                self._prune(db)
            # A database of an older version gains its rollups table here; its readings are rolled
            # up as the open buckets are rebuilt (no bucket stored yet: from the first reading on).
            db.executescript(ROLLUP_SCHEMA)
            db.executescript(ORDER_SCHEMA)
            with db:
                self.order.open(db, migrate=old)
                if old:
                    db.execute(f"PRAGMA user_version = {VERSION}")
            refs = sorted({r[0] for table in ("readings", "rollups") for r in db.execute(REFS.format(table=table))})
        except BaseException:
            db.close()
            raise
        for suffix in SIDE_FILES:  # created by SQLite with the database's mode; older ones may not be
            private(self.path.with_name(self.path.name + suffix), create=False)
        self._db = db
        self._migrated = old
        self._added.clear()
        return refs

    def _shrink(self) -> None:
        """Give back SQLite's page cache and the freed heap a read of every field left (2 MB)."""
        if self._db is not None:
            self._db.execute("PRAGMA shrink_memory")
        give_back_memory()

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
        self._tidied()
        o, n = old + ".", new + "."
        with db:
            for table in ("readings", "rollups", "unordered"):
                db.execute(f"DELETE FROM {table} WHERE substr(ref, 1, ?) = ?", (len(n), n))
                db.execute(
                    f"UPDATE {table} SET ref = ? || substr(ref, ?) WHERE substr(ref, 1, ?) = ?",
                    (n, len(o) + 1, len(o), o),
                )
        self._added = {(n + r[len(o):]) if r.startswith(o) else r: c for r, c in self._added.items()}
        self.order.rename(o, n)

    def _open_buckets(self, ref: str) -> Opened:
        """What a field's open buckets are rebuilt from: the end of the last stored bucket per
        resolution, the stored hours and minutes after them, the stored readings after the last minute."""
        assert self._db is not None
        db = self._db
        floors = []
        for res in RES:
            t = db.execute("SELECT max(t) FROM rollups WHERE ref = ? AND res = ?", (ref, res)).fetchone()[0]
            floors.append(-math.inf if t is None else t + res)

        def rows(res: int, since: float) -> list[Bucket]:
            return [Bucket.from_row(r) for r in db.execute(
                f"SELECT {COLUMNS} FROM rollups WHERE ref = ? AND res = ? AND t >= ? ORDER BY t", (ref, res, since))]

        hours = rows(3600, floors[2])
        minutes = rows(60, floors[1])
        raw = db.execute(
            "SELECT t, v FROM readings WHERE ref = ? AND t >= ? ORDER BY rowid", (ref, floors[0])
        ).fetchall()
        return floors, hours, minutes, raw

    def _load_fields(
        self, fields: dict[str, Field | None], shared: dict[str, Value]
    ) -> list[tuple[str, Opened, Stored]]:
        """What a start needs of some fields: what their open buckets are rebuilt from, and the
        readings memory holds of those still configured."""
        return [
            (ref, self._open_buckets(ref), self._load(ref, shared) if f is not None else ([], []))
            for ref, f in fields.items()
        ]

    def _load(self, ref: str, shared: dict[str, Value]) -> Stored:
        """The last `history_size` readings of one field stored (newest()), oldest first, as times
        and decoded values; a row that is not JSON is left out."""
        assert self._db is not None
        rows, clean = newest(self._db, ref, self.hub.history_size, ref in self.order.unordered)
        if clean:
            self.order.clean.add(ref)
        times = array("d")
        values: list[Value] = []
        for t, v in rows:
            value = shared.get(v)
            if value is None:
                try:
                    value = json.loads(v)
                except ValueError:
                    continue
                if len(shared) >= SHARED_VALUES:
                    shared.clear()
                shared[v] = value  # equal readings share one object
            times.append(t)
            values.append(value)
        if all(type(v) is float for v in values):
            return times, array("d", values)  # 8 bytes a number, and the ring stays an array
        return times, values

    def _insert(self, batch: list[tuple[str, float, str]], rolled: list[tuple[str, Bucket]] = []) -> None:
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("database closed")
        self._tidied()
        counts = Counter(map(itemgetter(0), batch))
        added = self._added
        slack = self.slack
        full = []
        for ref, n in counts.items():
            total = added.get(ref, 0) + n
            if total >= slack:
                full.append(ref)
        with db:
            done = self.order.write(db, batch)
            # One statement for the whole batch: sqlite3 lets go of the GIL around every step,
            # and executemany steps once per row, so a busy event loop thread would have to
            # win the GIL back a thousand times per flush.
            if batch:
                db.execute(INSERT_BATCH, (json.dumps(batch),))
            if rolled:
                db.executemany(UPSERT, [b.row(ref) for ref, b in rolled])
            # A field trimmed only once it has gained `slack` rows: one DELETE of a run of rows
            # then, instead of a few rows every batch.
            for ref in full:
                db.execute(TRIM_FIELD, (ref, self.raw_rows))
        done()
        for ref, n in counts.items():
            added[ref] = added.get(ref, 0) + n
        for ref in full:
            added[ref] = 0

    def _prune(self, db: sqlite3.Connection) -> None:
        """Every field down to raw_rows rows (a count per field from the index, then one DELETE per
        field over its limit: no window over the whole table, which holds millions of rows)."""
        over = [ref for ref, n in db.execute("SELECT ref, COUNT(*) FROM readings GROUP BY ref") if n > self.raw_rows]
        with db:
            for ref in over:
                db.execute(TRIM_FIELD, (ref, self.raw_rows))

    def _expire(self, db: sqlite3.Connection | None = None) -> None:
        """Drop readings and buckets older than their keep time (and the retention window)."""
        db = db or self._db
        if db is None:
            return
        self._tidied()  # a sweep before any batch since start; from _tidy itself a no-op
        now = time.time()
        cap = math.inf if self.retention is None else self.retention
        refs = {r[0] for table in ("readings", "rollups") for r in db.execute(REFS.format(table=table))}
        with db:  # per field, so each DELETE is a range of the (ref, …) index, not a scan
            for ref in refs:
                db.execute("DELETE FROM readings WHERE ref = ? AND t < ?", (ref, now - min(self.keep[0], cap)))
                for res in RES:
                    db.execute("DELETE FROM rollups WHERE ref = ? AND res = ? AND t < ?",
                               (ref, res, now - min(self.keep[res], cap)))

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

@dataclass
class Answer:
    """What a field did in a window: `rows` at resolution `res` (seconds), the exact `summary`
    (count, min, max with their times, mean) and the oldest time anything is stored from."""

    res: int
    rows: list[Bucket]
    summary: Bucket
    since: float
