"""History for a season: history.db full at the defaults for 200 fields, and long windows read from it.

6.3 billion readings (200 fields at 1 Hz for a year) are too many to write, so the store is
filled at bucket level as the defaults keep it once full: per field 20,000 readings
(`history_raw_rows`), 7 days of 1-minute buckets, a year of 1-hour buckets and 10 years of
1-day buckets, one spike of 999 half a year ago in field 0. One more field gets a full day of
readings at 1 Hz through `hub.push` (rolled up as they come, flushed every 60 s of their stamps).
Then, in this process: `history f 30d`, `history f 1y` (the text reply) and `plot f 1y` (buckets
read and the PNG drawn, after a first plot), medians of a few rounds, beside `history f 1h`
answered from memory as the baseline. The CPU model is printed with the figures.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
import statistics
import time
from pathlib import Path

from .results import Result, Target, cpu_model

FIELDS = 200
ROUNDS = 5
RAW = 20_000
MINUTES = 7 * 1440
HOURS = 365 * 24
DAYS = 3650
MB = 1_000_000


def _fill(db: Path, now: float) -> tuple[int, int]:
    """Write the full store; (file size with readings only, with everything)."""
    from gateway.history import SCHEMA
    from gateway.rollups import SCHEMA as ROLLUPS
    from gateway.rollups import UPSERT

    con = sqlite3.connect(db)
    con.executescript(SCHEMA)
    con.executescript(ROLLUPS)
    con.execute("PRAGMA user_version = 2")
    refs = [f"dev{i // 5:02d}.field{i % 5}" for i in range(FIELDS)]
    with con:
        for ref in refs:
            con.executemany(
                "INSERT INTO readings (ref, t, v) VALUES (?, ?, ?)",
                ((ref, now - RAW + i, repr(20.0 + (i % 50) / 10)) for i in range(RAW)),
            )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw_size = os.path.getsize(db)
    spike = math.floor((now - 182 * 86400) / 3600) * 3600
    first, last = json.dumps(20.0), json.dumps(24.9)

    def rows(ref: str, res: int, count: int):  # type: ignore[no-untyped-def]
        end = math.floor(now / res) * res
        for k in range(count):
            t = end - (count - k) * res
            n = max(1, res)  # one reading a second
            hi = 999.0 if ref == refs[0] and t <= spike < t + res else 24.9
            yield (ref, res, t, n, 20.0, hi, t + 1, t + res / 2, 22.45 * n, 22.45 * res, float(res),
                   first, last, t, t + res, n - 1, None)

    with con:
        for ref in refs:
            for res, count in ((60, MINUTES), (3600, HOURS), (86400, DAYS)):
                con.executemany(UPSERT, rows(ref, res, count))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return raw_size, os.path.getsize(db)


def _rss() -> float:
    """This process's resident memory in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1000
    return 0.0


async def _timed(work) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    await work
    return time.perf_counter() - start


async def _year(folder: Path) -> dict[str, float]:
    from gateway.auth import Actor
    from gateway.commands import Commands
    from gateway.history import HistoryStore
    from gateway.hub import FieldSpec, Hub
    from gateway.plot import Chart, render
    from gateway.rollups import parse_window

    db = folder / "history.db"
    now = time.time()
    raw_size, full_size = _fill(db, now)
    hub = Hub(1000)
    for d in range(FIELDS // 5):
        hub.add_node(f"dev{d:02d}", f"dev{d:02d}", "simulated", [FieldSpec(f"field{i}") for i in range(5)])
    hub.add_node("pushed", "pushed", "simulated", [FieldSpec("temp")])
    hub.bind(asyncio.get_running_loop())
    store = HistoryStore(hub, db, flush_every=3600, raw_rows=RAW)
    rss_before = _rss()
    started = time.perf_counter()
    await store.start()
    start_s = time.perf_counter() - started
    # A full day of readings at 1 Hz through the hub, a batch every 60 s of their stamps.
    t0 = math.floor(now / 86400) * 86400 - 86400
    pushed = time.perf_counter()
    for s in range(86400):
        hub.push("pushed", "temp", 20 + (s % 600) / 100, at=t0 + s)
        if s % 60 == 59:
            store._release(None)  # the stamps are not now: release what the second held back
            await store.flush()
    push_s = time.perf_counter() - pushed
    await store.flush()
    day = await store.answer(hub.field("pushed.temp"), parse_window(["2d"], now), 2000)
    commands = Commands(hub)
    commands.store = store
    viewer = Actor("bench@localhost", "viewer", "chat")
    f = "dev00.field0"
    for s in range(3600):  # an hour in memory for the baseline
        hub.push("dev01", "field0", 20.0, at=now - 3600 + s)
    reply = await commands.run(f"history {f} 1y", viewer)
    assert "max 999" in reply, reply
    memory = [await _timed(commands.run("history dev01.field0 1h", viewer)) for _ in range(ROUNDS)]
    d30 = [await _timed(commands.run(f"history {f} 30d", viewer)) for _ in range(ROUNDS)]
    y1 = [await _timed(commands.run(f"history {f} 1y", viewer)) for _ in range(ROUNDS)]
    rss_after = _rss()  # before the first plot imports matplotlib

    async def plot() -> None:
        w = parse_window(["1y"])
        series = await commands._buckets(hub.field(f), w)  # bench only: the plot's buckets
        assert max(series.highs or [0]) == 999.0
        await asyncio.get_running_loop().run_in_executor(None, render, Chart([series], w.start, w.end, "1y"))

    first_plot = await _timed(plot())
    plots = [await _timed(plot()) for _ in range(3)]
    await store.stop()
    return {
        "raw_size": raw_size, "full_size": full_size, "start": start_s, "push": push_s,
        "day_rows": float(len(day.rows)), "day_n": float(day.summary.n),
        "memory": statistics.median(memory), "d30": statistics.median(d30), "y1": statistics.median(y1),
        "first_plot": first_plot, "rss_before": rss_before, "rss_after": rss_after, "plot": statistics.median(plots),
        "size_after": float(os.path.getsize(db) + (os.path.getsize(str(db) + "-wal") if os.path.exists(str(db) + "-wal") else 0)),
    }


async def history_year(work: Path) -> list[Result]:
    """The figures of a full store (see the module's docstring)."""
    folder = work / "history-year"
    folder.mkdir(exist_ok=True)
    got = await _year(folder)
    model = cpu_model()
    print(f"\n  CPU: {model}; store opened in {got['start']:.2f} s; a day of 1 Hz readings pushed in"
          f" {got['push']:.1f} s ({got['day_n']:.0f} counted in {got['day_rows']:.0f} buckets)", flush=True)
    buckets = got["full_size"] - got["raw_size"]
    per_bucket = buckets / (FIELDS * (MINUTES + HOURS + DAYS))
    per_year = per_bucket * (HOURS + 365)
    base = f"history dev01.field0 1h from memory, same process ({model})"
    return [
        Result("history_db_full", got["full_size"] / MB, "MB",
               f"{FIELDS} fields full at the defaults (readings {got['raw_size'] / MB:.0f} MB)", None, Target("<", 1000)),
        Result("history_db.per_field_year", per_year / MB, "MB",
               f"1-hour and 1-day buckets of one field per year ({per_bucket:.0f} B a bucket)"),
        Result("history_30d", got["d30"] * 1000, "ms", base, got["memory"] * 1000, Target("<", 100)),
        Result("history_1y", got["y1"] * 1000, "ms", base, got["memory"] * 1000, Target("<", 100)),
        Result("history_rss", got["rss_after"], "MB",
               "the same process before the store opened (after: with memory's readings loaded back)",
               got["rss_before"], Target("over<=", 10)),
        Result("plot_1y", got["plot"] * 1000, "ms", f"first plot {got['first_plot'] * 1000:.0f} ms ({model})",
               None, Target("<", 300)),
    ]
