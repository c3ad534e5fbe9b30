"""The history store's rollups: exact extremes for any window, a restart or `kill -9` that
neither loses what was written nor counts it twice, a clock stepped back, a full disk while
buckets close, and a database from before rollups migrated on first start."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gateway.history as history
from gateway.history import HistoryStore
from gateway.hub import FieldSpec, History, Hub
from gateway.rollups import BadWindow, Window, parse_window, plan
from tests.test_history import disk_full, problem_events

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def make_hub(size: int = 20, kind: str = "numeric") -> Hub:
    hub = Hub(size)
    hub.add_node("dev", "dev", "simulated", [FieldSpec("f0", type=kind)])
    hub.bind(asyncio.get_running_loop())
    return hub


def store_for(hub: Hub, db: Path) -> HistoryStore:
    """Every reading to the disk, raw readings kept long enough that the brute force has them all."""
    return HistoryStore(hub, db, per_second=0, raw_rows=1_000_000)


def bucket_rows(db: Path) -> dict[int, int]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT res, COUNT(*) FROM rollups GROUP BY res"))
    finally:
        con.close()


# ---------------------------------------------------------------- exact extremes


readings = st.lists(
    st.tuples(st.floats(0, 3 * DAY), st.floats(-1e6, 1e6, allow_nan=False)), min_size=1, max_size=300
)
windows = st.lists(st.tuples(st.floats(-DAY, 3.2 * DAY), st.floats(1, 3.5 * DAY)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(readings, windows)
def test_any_window_has_the_min_max_and_count_of_its_readings(
    rs: list[tuple[float, float]], ws: list[tuple[float, float]]
) -> None:
    async def run(folder: Path) -> None:
        hub = make_hub(size=20)  # memory holds 20: the rest comes from the database's rows and buckets
        store = store_for(hub, folder / "history.db")
        await store.start()
        try:
            base = math.floor(time.time() / DAY) * DAY - 4 * DAY  # so windows start at all alignments
            times = sorted(base + t for t, _ in rs)
            pushed = list(zip(times, (v for _, v in rs)))
            for t, v in pushed:
                hub.push("dev", "f0", v, at=t)
            await store.flush()
            f = hub.field("dev.f0")
            for offset, length in ws:
                a = base + offset
                b = min(a + length, time.time())
                if b <= a:
                    continue
                got = (await store.answer(f, Window(a, b, "w"), 500)).summary
                inside = [v for t, v in pushed if a <= t < b]
                assert got.n == len(inside)
                if inside:
                    assert (got.lo, got.hi) == (min(inside), max(inside))
        finally:
            await store.stop()

    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(Path(folder)))


def test_plan_covers_the_window_in_order_without_overlap() -> None:
    start, end = 1_000_000.5, 1_000_000.5 + 40 * DAY + 3671.25
    pieces = plan(start, end, {})
    assert pieces[0][1] == start and pieces[-1][2] == end
    assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))
    assert {r for r, _, _ in pieces} == {0, 60, 3600, 86400}
    assert len(pieces) <= 7


# ---------------------------------------------------------------- restart and kill -9


CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from gateway.hub import FieldSpec, History, Hub
from gateway.history import HistoryStore

async def main() -> None:
    hub = Hub(20)
    hub.add_node("dev", "dev", "simulated", [FieldSpec("f0")])
    hub.bind(asyncio.get_running_loop())
    store = HistoryStore(hub, Path(sys.argv[1]), flush_every=3600, per_second=0, raw_rows=1_000_000)
    await store.start()
    base = float(sys.argv[2])
    for i in range(600):  # 50 minutes at one reading every 5 s, a spike at 1234
        hub.push("dev", "f0", 999.0 if i == 1234 % 600 else float(i % 7), at=base + i * 5)
    await store.flush()  # acknowledged: everything so far
    for i in range(600, 700):  # never flushed: lost with the process
        hub.push("dev", "f0", -5.0, at=base + i * 5)
    print("flushed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_kill_9_loses_no_written_reading_and_a_restart_counts_nothing_twice(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    base = math.floor(time.time() / 3600) * 3600 - 5 * 3600 + 17  # mid-minute, hours ago
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(db), repr(base)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL and "flushed" in child.stdout, child.stderr
    whole = Window(base - 60, time.time(), "all")
    for attempt in range(2):  # the first restart rebuilds the open buckets and writes them; the second reads them back
        hub = make_hub()
        store = store_for(hub, db)
        await store.start()
        try:
            f = hub.field("dev.f0")
            got = (await store.answer(f, whole, 500)).summary
            assert got.n == 600, attempt
            assert (got.lo, got.hi) == (0.0, 999.0)
            by_hour = await store.answer(f, Window(base - 17, base - 17 + 4 * 3600, "4h", 3600), 500)
            assert sum(b.n for b in by_hour.rows) == 600
        finally:
            await store.stop()
    # Every bucket written once: 600 readings over 50 minutes, from 17 s into one, touch 51 one-minute
    # buckets; the last (3 readings) is still open (no reading closed it), rebuilt from the stored readings.
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT SUM(n), COUNT(*) FROM rollups WHERE res = 60").fetchone() == (597, 50)
        assert con.execute("SELECT COUNT(*) FROM rollups WHERE res = 3600").fetchone() == (0,)  # the hour, open
    finally:
        con.close()


# ---------------------------------------------------------------- faults


async def test_a_clock_stepped_back_neither_reorders_nor_rewrites_buckets(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub = make_hub()
    store = store_for(hub, db)
    await store.start()
    try:
        base = math.floor(time.time() / 60) * 60 - 600
        for i in range(5):
            hub.push("dev", "f0", 1.0, at=base + 60 * i)
        hub.push("dev", "f0", 50.0, at=base + 60 * 4 + 5)
        await store.flush()  # minutes 0–3 closed and written; minute 4 open
        hub.push("dev", "f0", 77.0, at=base - 3600)  # the clock stepped back an hour
        hub.push("dev", "f0", 2.0, at=base + 60 * 6)
        await store.flush()
        con = sqlite3.connect(db)
        rows = con.execute("SELECT t, n, hi FROM rollups WHERE res = 60 ORDER BY t").fetchall()
        con.close()
        starts = [t for t, _, _ in rows]
        assert starts == sorted(set(starts))  # no bucket twice, none before another it followed
        # The stepped-back reading counts in the open minute, at its start; nothing written is rewritten.
        assert rows == [(base + 60 * i, 1, 1.0) for i in range(4)] + [(base + 240, 3, 77.0)]
        got = (await store.answer(hub.field("dev.f0"), Window(base - 7200, time.time(), "w"), 500)).summary
        assert got.n == 8 and got.hi == 77.0
    finally:
        await store.stop()


async def test_a_full_disk_while_buckets_close_is_reported_and_they_are_written_after(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub = make_hub()
    events = problem_events(hub)
    store = store_for(hub, db)
    await store.start()
    try:
        base = math.floor(time.time() / 3600) * 3600 - 3 * 3600
        await disk_full(store)
        for i in range(360):  # 3 hours at one reading every 30 s: minutes and hours close
            hub.push("dev", "f0", float(i), at=base + 30 * i)
        await store.flush()
        assert hub.problems["history"].message.startswith("not saved:")
        assert [e for e in events if e[0] == "history"][0][1].startswith("not saved:")
        await disk_full(store, full=False)
        await store.flush()
        assert "history" not in hub.problems
        # The last minute and hour stay open until a reading closes them (or the field is quiet for a day).
        assert bucket_rows(db)[60] == 179 and bucket_rows(db)[3600] == 2
        got = (await store.answer(hub.field("dev.f0"), Window(base, time.time(), "w"), 500)).summary
        assert (got.n, got.lo, got.hi) == (360, 0.0, 359.0)
    finally:
        await store.stop()


OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (ref TEXT NOT NULL, t REAL NOT NULL, v TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS readings_ref_t ON readings (ref, t);
"""  # history.db as made by the gateway before rollups


async def test_a_database_from_before_rollups_is_rolled_up_on_first_start(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    con = sqlite3.connect(db)
    con.executescript(OLD_SCHEMA)
    base = math.floor(time.time() / DAY) * DAY - 5 * DAY  # older than the 2 days readings are kept
    with con:
        con.executemany(
            "INSERT INTO readings VALUES ('dev.f0', ?, ?)",
            [(base + 600 * i, json.dumps(500.0 if i == 100 else float(i % 10))) for i in range(600)],
        )
    con.close()
    hub = make_hub()
    store = HistoryStore(hub, db, raw_rows=1000)
    await store.start()
    try:
        await store.flush()
        got = (await store.answer(hub.field("dev.f0"), Window(base - DAY, time.time(), "w"), 500)).summary
        assert (got.n, got.hi) == (600, 500.0)
        assert bucket_rows(db)[60] == 600
        store._expire()  # the next sweep: the old readings go, their buckets stay
        con = sqlite3.connect(db)
        assert con.execute("SELECT COUNT(*) FROM readings WHERE t < ?", (time.time() - 2 * DAY,)).fetchone() == (0,)
        con.close()
        got = (await store.answer(hub.field("dev.f0"), Window(base - DAY, time.time(), "w"), 500)).summary
        assert (got.n, got.hi) == (600, 500.0)
    finally:
        await store.stop()


async def test_on_off_fields_count_time_in_each_state_and_changes(tmp_path: Path) -> None:
    hub = make_hub(kind="boolean")
    store = store_for(hub, tmp_path / "history.db")
    await store.start()
    try:
        base = math.floor(time.time() / 3600) * 3600 - 2 * 3600
        for i, v in enumerate([True, True, False, True]):  # 15 min each
            hub.push("dev", "f0", v, at=base + 900 * i)
        hub.push("dev", "f0", False, at=base + 3600)
        await store.flush()
        ans = await store.answer(hub.field("dev.f0"), Window(base, base + 3600, "1h", 3600), 10)
        hour = ans.rows[0]
        assert hour.changes == 2 and hour.states == {"true": 2700.0, "false": 900.0}
    finally:
        await store.stop()


# ---------------------------------------------------------------- the window grammar


NOW = 1_780_000_000.0  # 2026-05-28


@pytest.mark.parametrize(
    ("words", "span"),
    [(["30m"], 1800), (["7d"], 7 * DAY), (["3w"], 21 * DAY), (["6mo"], 180 * DAY), (["1y"], 365 * DAY)],
)
def test_durations_from_minutes_to_years(words: list[str], span: float) -> None:
    w = parse_window(words, NOW)
    assert (w.end - w.start, w.end) == (span, NOW)


def test_dates_and_ranges_are_utc_days_both_included() -> None:
    w = parse_window(["2026-03-01..2026-03-07", "by", "day"], NOW)
    assert (w.start, w.end - w.start, w.by) == (1772323200.0, 7 * DAY, 86400)
    assert parse_window(["since", "2026-03-01"], NOW).start == 1772323200.0


@pytest.mark.parametrize(
    ("words", "why"),
    [
        (["7x"], "is not a window; use 30m"),
        (["since", "2027-01-01"], "starts in the future"),
        (["2026-03-07..2026-03-01"], "ends before it starts"),
        (["2026-02-30..2026-03-01"], "is not a date"),
        (["7d", "by", "week"], "say by minute, by hour or by day"),
    ],
)
def test_bad_windows_are_refused_with_the_grammar(words: list[str], why: str) -> None:
    with pytest.raises(BadWindow, match=why):
        parse_window(words, NOW)


# ---------------------------------------------------------------- through the real stack


SIM = [
    {
        "id": "sim",
        "driver": "simulated",
        "interval": 3600,  # one reading at start: the stored month is the series
        "fields": [{"name": "temp", "unit": "°C", "decimals": 1, "base": 20, "amplitude": 0, "noise": 0}],
    }
]


def month_in_old_db(tmp_path: Path) -> tuple[float, float]:
    """history.db as today's main left it (readings only): sim.temp every 10 minutes for 30 days,
    20 °C with one reading of 99 °C; returns (the first reading's time, the spike's time)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    con = sqlite3.connect(state / "history.db")
    con.executescript(OLD_SCHEMA)
    first = math.floor(time.time() / DAY) * DAY - 30 * DAY
    spike = first + 17 * DAY + 3 * 3600 + 600
    with con:
        con.executemany(
            "INSERT INTO readings VALUES ('sim.temp', ?, ?)",
            [(t, "99.0" if t == spike else "20.0") for t in (first + 600 * i for i in range(30 * 144))],
        )
    con.close()
    return first, spike


async def test_chat_history_and_plot_of_a_month_show_the_spike_at_the_resolution_that_answered(
    xmpp_server: Any, tmp_path: Path, peers: dict[str, Any]
) -> None:
    from PIL import Image

    from tests.conftest import gateway_config, start_gateway
    from tests.test_plot import fetch, oob_url

    first, spike = month_in_old_db(tmp_path)
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path, devices=SIM), xmpp_server.passwords["gateway"])
    victor = peers["victor"]
    try:
        day = time.strftime("%Y-%m-%d", time.gmtime(first))
        reply = await victor.ask_for(gw.jid, "history sim.temp 30d by day", "sim.temp: 30d")
        lines = reply.splitlines()
        assert lines[0] == f"sim.temp: 30d at 1-day resolution, 31 rows; data since {day}"
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(spike))
        assert f"max 99.0 at {when}" in lines
        rows = [line for line in lines if line[:4].isdigit()]
        assert len(rows) == 31 and all(len(line) <= 40 for line in lines[[line.split() for line in lines].index(["UTC", "min", "mean", "max"]):])
        spike_day = time.strftime("%Y-%m-%d", time.gmtime(spike))
        assert [line.split() for line in rows if line.startswith(spike_day)] == [[spike_day, "20.0", "20.5", "99.0"]]  # mean (143 × 20 + 99) / 144
        reply = await victor.ask_for(gw.jid, "history sim.temp 1y", "sim.temp: 1y")
        assert reply.startswith(f"sim.temp: 1y at 1-day resolution, 31 rows; data since {day}")
        assert f"max 99.0 at {when}" in reply
        reply = await victor.ask_for(gw.jid, "history sim.temp 20y", "sim.temp: 20y")
        assert "(nothing is kept from before " in reply
        reply = await victor.ask_for(gw.jid, "history sim.temp 3x", "Error:")
        assert reply.startswith("Error: '3x' is not a window; use 30m, 6h, 7d, 3w, 6mo, 1y, since")
        reply = await victor.ask_for(gw.jid, "history sim.temp since 2999-01-01", "Error:")
        assert reply == "Error: since 2999-01-01 starts in the future."
        victor.client.send_message(mto=gw.jid, mbody="plot sim.temp 30d", mtype="chat")
        msg = await victor.message_from(gw.jid, timeout=30, match=lambda b: b.startswith(("https://", "No picture")))
    finally:
        await gw.stop()
    url = oob_url(msg)
    assert url and msg["body"] == url, msg["body"]
    png = await asyncio.to_thread(fetch, url, xmpp_server.prosody.ca_file)
    (tmp_path / "plot-30d.png").write_bytes(png)
    import io

    img = Image.open(io.BytesIO(png))
    w, h = img.size
    rgb = img.convert("RGB").load()
    # The spike (99 against 20) reaches the top part of the axes, about 17/30 of the way across:
    # blue pixels there (the band's edge is thin and anti-aliased: bluish, not the exact colour).
    top = [x for y in range(int(0.1 * h), int(0.35 * h)) for x in range(int(0.1 * w), w)
           if rgb[x, y][2] - rgb[x, y][0] > 40]
    assert top and all(0.45 * w < x < 0.7 * w for x in top), sorted(set(top))[:20]


async def test_admins_see_history_db_size_now_and_when_full_in_status(
    xmpp_server: Any, tmp_path: Path, peers: dict[str, Any]
) -> None:
    from tests.conftest import gateway_config, start_gateway

    gw = await start_gateway(gateway_config(xmpp_server, tmp_path, devices=SIM), xmpp_server.passwords["gateway"])
    try:
        await gw.gateway.history.flush()
        status = await peers["alice"].ask_for(gw.jid, "status", "Test GW")  # an admin
        line = [s for s in status.splitlines() if s.startswith("history.db: ")]
        full = sum(history.expected(gw.gateway.history.keep, gw.gateway.history.raw_rows, 2).values())
        assert len(line) == 1 and line[0].endswith(f" MB (full: ~{full / 1e6:.3g} MB)") and len(line[0]) <= 40
        status = await peers["victor"].ask_for(gw.jid, "status", "Test GW")  # a viewer
        assert "history.db" not in status
    finally:
        await gw.stop()


def test_check_prints_the_expected_size_of_history_db(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[gateway]\nstate_dir = "{tmp_path}"\nhistory_days = "1y"\n'
        '[[devices]]\nid = "sim"\ndriver = "simulated"\ninterval = 1\n'
        '  [[devices.fields]]\n  name = "a"\n  [[devices.fields]]\n  name = "b"\n'
    )
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    # 2 fields at 1/s: readings 30,000 × 66 B, minutes 10,080, hours 8,760 and days 365 buckets × 97 B, each.
    each = 30_000 * 66 + (10_080 + 8_760 + 365) * 97
    line = next(s for s in out.stdout.splitlines() if s.startswith("history.db:"))
    assert line.startswith(f"history.db: about {2 * each / 1e6:.3g} MB when full for 2 fields;"), line


# ---------------------------------------------------------------- XEP-0323 historical read-outs


async def test_historical_readout_older_than_memory_comes_from_the_buckets(xmpp_server: Any, tmp_path: Path,
                                                                          peers: dict[str, Any]) -> None:
    from tests.test_sensordata import stamp
    from tests.xep_helpers import Inbox, iq, running, values

    first, spike = month_in_old_db(tmp_path)
    async with running(xmpp_server, tmp_path) as xgw:
        xgw.session.commands.store = xgw.gateway.history
        xgw.hub.field("sim.temp").history = History(50, True)  # memory holds none of the month
        alice = peers["alice"]
        inbox = Inbox(alice)
        # An hour of yesterday (1-minute buckets are kept 7 days): one reading every 10 minutes.
        hour = first + 29 * DAY + 3600
        await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='40' historical='true' "
                 f"from='{stamp(hour)}' to='{stamp(hour + 3599)}'><node nodeId='sim'/><field name='temp'/></req>")
        got = values(await inbox.readout(40))
        assert [v.timestamp for v in got] == [stamp(hour + 600 * i) for i in range(6)]
        assert [v.value for v in got] == ["20.00"] * 6
        assert all(v.flags() == {"historicalMinute", "computed"} for v in got)
        # Around the spike, 13 days ago: older than the minutes are kept, so 1-hour buckets.
        await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='42' historical='true' "
                 f"from='{stamp(spike - 600)}' to='{stamp(spike + 3600)}'><node nodeId='sim'/><field name='temp'/></req>")
        got = values(await inbox.readout(42))
        start = spike - spike % 3600  # from is on the hour: its bucket and the next, with their means
        assert [(v.timestamp, v.value) for v in got] == [(stamp(start), f"{(5 * 20 + 99) / 6:.2f}"),
                                                          (stamp(start + 3600), "20.00")]
        assert {v.flags() == {"historicalHour", "computed"} for v in got} == {True}
        # The whole month: more minutes than a read-out may hold, so 1-hour buckets (their means).
        await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='41' historical='true' "
                 f"from='{stamp(first)}' to='{stamp(first + 30 * DAY - 1)}'><node nodeId='sim'/><field name='temp'/></req>")
        got = values(await inbox.readout(41))
        assert len(got) == 30 * 24 and {v.flags() == {"historicalHour", "computed"} for v in got} == {True}
        hour = stamp(spike - spike % 3600)
        assert [v.value for v in got if v.timestamp == hour] == [f"{(5 * 20 + 99) / 6:.2f}"]


async def test_a_queued_historical_readout_older_than_memory_comes_from_the_buckets_too(
    xmpp_server: Any, tmp_path: Path, peers: dict[str, Any]
) -> None:
    from tests.test_sensordata import stamp, when
    from tests.xep_helpers import SD, Inbox, child, iq, running, values

    first, _spike = month_in_old_db(tmp_path)
    async with running(xmpp_server, tmp_path) as xgw:
        xgw.session.commands.store = xgw.gateway.history
        xgw.hub.field("sim.temp").history = History(50, True)  # memory holds none of the month
        alice = peers["alice"]
        inbox = Inbox(alice)
        hour = first + 29 * DAY + 3600  # an hour of yesterday, read out a second from now
        answer = await iq(alice, xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='43' historical='true' "
                          f"from='{stamp(hour)}' to='{stamp(hour + 3599)}' when='{when(1.0)}'>"
                          "<node nodeId='sim'/><field name='temp'/></req>")
        assert child(answer, SD, "accepted").attrib == {"seqnr": "43", "queued": "true"}
        msgs = await inbox.readout(43)
        assert msgs[0].tag == f"{{{SD}}}started"
        got = values(msgs)
        assert [v.timestamp for v in got] == [stamp(hour + 600 * i) for i in range(6)]
        assert [v.value for v in got] == ["20.00"] * 6
        assert all(v.flags() == {"historicalMinute", "computed"} for v in got)


# ---------------------------------------------------------------- export


async def test_export_of_a_month_is_a_csv_file_for_operators_only(
    xmpp_server: Any, tmp_path: Path, peers: dict[str, Any]
) -> None:
    import ssl
    import urllib.request

    from tests.conftest import gateway_config, start_gateway
    from tests.test_plot import oob_url

    first, spike = month_in_old_db(tmp_path)
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path, devices=SIM), xmpp_server.passwords["gateway"])
    try:
        refused = await peers["victor"].ask_for(gw.jid, "export sim.temp 30d by day", "Refused")
        assert refused.startswith("Refused:"), refused
        olive = peers["olive"]  # an operator
        olive.client.send_message(mto=gw.jid, mbody="export sim.temp 30d by day", mtype="chat")
        msg = await olive.message_from(gw.jid, timeout=30, match=lambda b: b.startswith(("https://", "No file")))
        url = oob_url(msg)
        assert url and msg["body"] == url, msg["body"]
        ctx = ssl.create_default_context(cafile=str(xmpp_server.prosody.ca_file))
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, context=ctx, timeout=10).read().decode())
        lines = body.splitlines()
        assert lines[0] == "time,count,min,mean,max" and len(lines) == 1 + 31  # 30 stored days and today
        day = time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime(spike))
        assert [line for line in lines if line.startswith(day)] == [f"{day},144,20.0,{(143 * 20 + 99) / 144!r},99.0"]
        assert lines[1].startswith(time.strftime("%Y-%m-%dT00:00:00Z,144,", time.gmtime(first)))
    finally:
        await gw.stop()


async def test_export_without_uploads_shows_the_last_rows_and_defuses_formulas() -> None:
    from gateway.auth import Actor
    from gateway.commands import Commands

    hub = make_hub(size=100, kind="string")
    now = time.time()
    for i in range(30):
        hub.push("dev", "f0", '=HYPERLINK("x")' if i == 29 else f"mode {i}", at=now - 300 + i)
    reply = await Commands(hub).run("export dev.f0 1h", Actor("o@x", "operator", "chat"))
    lines = reply.splitlines()
    assert lines[0] == "No file: this interface shows text only. dev.f0, 1h, readings, the last 20 of 30:"
    assert lines[1] == "time,value" and len(lines) == 22
    assert lines[-1].endswith(""",\"'=HYPERLINK(\"\"x\"\")\"""")


async def test_buckets_not_yet_written_at_a_crash_are_rebuilt_from_the_readings_written(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub = make_hub()
    store = store_for(hub, db)
    await store.start()
    base = math.floor(time.time() / 3600) * 3600 - 2 * 3600
    for i in range(240):  # an hour at one reading every 15 s, a spike in minute 33
        hub.push("dev", "f0", 500.0 if i == 133 else float(i % 4), at=base + 15 * i)
    await store.flush(everything=False)  # a periodic batch: the readings, not yet the buckets
    assert bucket_rows(db) == {}
    await asyncio.get_running_loop().run_in_executor(store._pool, store._close)  # the process dies here
    assert store._task is not None
    store._task.cancel()
    hub = make_hub()
    store = store_for(hub, db)
    await store.start()
    try:
        got = (await store.answer(hub.field("dev.f0"), Window(base, time.time(), "w"), 500)).summary
        assert (got.n, got.lo, got.hi) == (240, 0.0, 500.0)
        await store.flush()
        assert bucket_rows(db) == {60: 59}  # the 60th minute stays open: no reading has closed it
    finally:
        await store.stop()


async def test_buckets_count_the_readings_thinned_away_from_the_disk(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub = make_hub(size=2)  # memory holds 2: the minute is answered by its bucket
    store = HistoryStore(hub, db, per_second=2)  # the first and the last of each second reach the disk
    await store.start()
    try:
        minute = math.floor(time.time() / 60) * 60 - 600
        for i in range(10):  # ten readings in one second, the spike in the middle
            hub.push("dev", "f0", 999.0 if i == 5 else 1.0, at=minute + 10 + i / 10)
        hub.push("dev", "f0", 1.0, at=minute + 70)
        await store.flush()
        con = sqlite3.connect(db)
        assert "999.0" not in [v for (v,) in con.execute("SELECT v FROM readings")]  # thinned away
        con.close()
        got = (await store.answer(hub.field("dev.f0"), Window(minute, minute + 60, "1m"), 10)).summary
        assert (got.n, got.hi) == (10, 999.0)
    finally:
        await store.stop()
