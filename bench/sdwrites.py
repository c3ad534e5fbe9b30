"""What the SD card sees: bytes written to the state folder per hour of history.

Three devices at one reading per second go through the gateway's `HistoryStore`
with a given flush interval, SQLite `synchronous` and per-second limit, in a
child process whose `/proc/self/io` `write_bytes` (bytes it made the kernel send
to the disk) is read before and after. Into a new store: one hour. Into a full
store, as after months (`history_raw_rows` readings per field, and 1-minute,
1-hour and 1-day buckets back to their keep times): three hours, so that each
field is trimmed once (every 10,000 readings of a field, 2.8 hours) and the
5-minute expiry sweeps delete what they would; the figure is per hour. The hours
are compressed: readings carry the stamps of real hours, the store's clock
follows them, and a batch is written every `flush_every` seconds of those
stamps. With `synchronous = FULL` every commit is fsynced, so the bytes are
those of real time; with NORMAL, pages dirtied twice before the kernel's
writeback are counted once here, so NORMAL looks a little better than it is.
Baseline: the raw size of the readings (field name, 8-byte time, value text).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .results import Result, Target

DEVICES = 3
HOURS = 3  # into a full store: a trim of each field falls in them (every 10,000 readings: 2.8 hours)
MB = 1_000_000
# (name, flush every s, synchronous, readings per field per second written, full store, target)
SETTINGS = [
    # The defaults into a new store, as measured since issue 13; issue 24: no more than before the buckets.
    ("sd_writes", 60.0, "full", 2, False, Target("<", 4.48)),
    # The defaults into a store full as after months: its trims and sweeps (the code before issue 24,
    # which kept 1,000 readings a field and no buckets, wrote 2.68 MB/h so: docs/history.md).
    ("sd_writes.full", 60.0, "full", 2, True, None),
    ("sd_writes.before", 2.0, "normal", 0, False, None),  # the settings before issue 13 (today's pages)
]


def _io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


class _Clock:
    """The store's `time` module in the child: wall-clock time follows the readings' stamps."""

    def __init__(self, now: float):
        self.now = now
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now


def _fill(db: Path, refs: list[str], start: float) -> None:
    """What months at one reading per second leave before `start`: the readings up to the
    per-field limit, and buckets of every resolution back to its keep time."""
    from gateway.history import KEEP, RAW_ROWS
    from gateway.rollups import UPSERT, Bucket

    con = sqlite3.connect(db)
    try:
        with con:
            for ref in refs:
                con.executemany(
                    "INSERT INTO readings (ref, t, v) VALUES (?, ?, ?)",
                    ((ref, start - RAW_ROWS + i, repr(20 + (i % 100) / 10)) for i in range(RAW_ROWS)),
                )
                for res in (60, 3600, 86400):
                    first = (start - KEEP[res]) // res * res
                    rows = []
                    for k in range(int((start - first) // res)):
                        b = Bucket(first + k * res, res)
                        b.add(20 + k % 50 / 10, b.t)
                        rows.append(b.row(ref))
                    con.executemany(UPSERT, rows)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


async def _hours(folder: Path, flush_every: float, sync: str, per_second: int, full: bool) -> dict[str, int]:
    import gateway.history
    from gateway.history import PRUNE_EVERY, HistoryStore, encode
    from gateway.hub import FieldSpec, Hub

    hours = HOURS if full else 1
    t0 = float(int(time.time()) // 60 * 60 - hours * 3600)  # the last hours: buckets close as readings come
    clock = _Clock(t0)
    gateway.history.time = clock  # type: ignore[assignment]
    hub = Hub(1000)
    for d in range(DEVICES):
        hub.add_node(f"dev{d}", f"dev{d}", "simulated", [FieldSpec("temp")])
    hub.bind(asyncio.get_running_loop())
    db = folder / "history.db"
    if full:
        store = HistoryStore(hub, db, flush_every=3600, sync=sync, per_second=per_second)
        await store.start()
        await store.stop()
        _fill(db, [f"dev{d}.temp" for d in range(DEVICES)], t0)
    store = HistoryStore(hub, db, flush_every=3600, sync=sync, per_second=per_second)
    await store.start()
    await store.flush()
    loop = asyncio.get_running_loop()
    before = _io_write_bytes()
    raw = 0
    next_flush, next_sweep = flush_every, PRUNE_EVERY
    for s in range(hours * 3600):
        clock.now = t0 + s
        for d in range(DEVICES):
            value = round(20 + (s % 100) / 10, 2)
            hub.push(f"dev{d}", "temp", value, at=t0 + s)
            raw += len(f"dev{d}.temp") + 8 + len(encode(value))
        if s + 1 >= next_flush:
            next_flush += flush_every
            store._release(None)  # the stamps are not now: release what the second held back
            await store.flush(everything=False)  # as the periodic batches do
        if s + 1 >= next_sweep:
            next_sweep += PRUNE_EVERY
            await loop.run_in_executor(store._pool, store._expire)  # as the store's own loop does
    await store.stop()
    return {"written": (_io_write_bytes() - before) // hours, "raw": raw // hours}


def child(argv: list[str]) -> None:
    """In the child process: the compressed hours, their numbers per hour as JSON on stdout."""
    folder, flush_every, sync, per_second, full = Path(argv[0]), float(argv[1]), argv[2], int(argv[3]), argv[4] == "full"
    print(json.dumps(asyncio.run(_hours(folder, flush_every, sync, per_second, full))))


async def sd_writes(work: Path) -> list[Result]:
    """Bytes written per hour with the defaults into a new and a full store, and with the
    settings before issue 13."""
    results = []
    for name, flush_every, sync, per_second, full, target in SETTINGS:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.sdwrites", tmp, str(flush_every), sync, str(per_second),
                "full" if full else "new",
                stdout=subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench.sdwrites child exited with code {proc.returncode}")
            got = json.loads(out)
        results.append(
            Result(
                name,
                got["written"] / MB,
                "MB/h",
                f"raw readings, {DEVICES} devices at 1/s into a {'full' if full else 'new'} store (flush every {flush_every:g} s, "
                f"synchronous {sync.upper()}, {per_second or 'all'} per field per s)",
                got["raw"] / MB,
                target,
            )
        )
    return results


if __name__ == "__main__":
    child(sys.argv[1:])
