"""The history database: private files, bounded rows under a flood, and a broken database or
state folder that leaves the gateway running with history in memory, saying what is wrong.

Read-only folders and failing writes are made honestly for root, which ignores file modes:
`chattr +i` (immutable: not even root may create a file in the folder or write the file),
`PRAGMA max_page_count` (SQLite's own "database or disk is full"), a folder named history.db,
and garbage bytes where the database should be.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gateway.history as history
from gateway.app import Gateway
from gateway.config import parse
from gateway.history import HistoryStore
from gateway.hub import FieldSpec, Hub, Problem
from gateway.demo.localservers import Mosquitto
from gateway.systemd import notify_address
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.test_systemd import FakeSystemd
from tests.helpers import answering, until

ROOT = Path(__file__).resolve().parent.parent

Event = tuple[str, str | None, str | None]  # component, new message, old message


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flushes and reopen attempts every few hundredths of a second instead of 2 s and 30 s."""
    monkeypatch.setattr(history, "FLUSH_EVERY", 0.05)
    monkeypatch.setattr(history, "REOPEN_EVERY", 0.1)


def make_hub(size: int = 10, fields: int = 1) -> Hub:
    hub = Hub(size)
    hub.add_node("dev", "dev", "simulated", [FieldSpec(f"f{i}") for i in range(fields)])
    hub.bind(asyncio.get_running_loop())
    return hub


def problem_events(hub: Hub) -> list[Event]:
    """Every problem change the hub announces, as (component, new message, old message)."""
    events: list[Event] = []

    def listener(component: str, new: Problem | None, old: Problem | None) -> None:
        events.append((component, new.message if new else None, old.message if old else None))

    hub.subscribe(problem=listener)
    return events


def rows(db: Path) -> dict[str, int]:
    """Rows per field in a history database, read with a connection of its own."""
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT ref, COUNT(*) FROM readings GROUP BY ref"))
    finally:
        con.close()


async def disk_full(store: HistoryStore, full: bool = True) -> None:
    """Cap the database at its current size (SQLite's own SQLITE_FULL, as from a full disk), or lift the cap.

    On the store's worker thread, between its own statements.
    """

    def cap() -> None:
        assert store._db is not None
        pages = store._db.execute("PRAGMA page_count").fetchone()[0] if full else 1073741823
        store._db.execute(f"PRAGMA max_page_count = {pages}")

    await asyncio.get_running_loop().run_in_executor(store._pool, cap)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def can_create_in(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """Make a file or folder unwritable even for root (`chattr +i`); undone at teardown."""
    done: list[Path] = []

    def make(path: Path) -> None:
        if shutil.which("chattr") is None:
            pytest.skip("chattr not installed")
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip(f"chattr +i not supported on {path}'s file system")
        done.append(path)

    yield make
    for path in done:
        subprocess.run(["chattr", "-i", str(path)], check=False)


# ---------------------------------------------------------------- item 3: private files


async def test_history_db_and_its_wal_and_shm_are_created_0600(tmp_path: Path) -> None:
    hub = make_hub()
    store = HistoryStore(hub, tmp_path / "state" / "history.db")
    await store.start()
    try:
        hub.push("dev", "f0", 1.5)
        await store.flush()
        files = sorted(p.name for p in (tmp_path / "state").iterdir())
        assert files == ["history.db", "history.db-shm", "history.db-wal"]
        assert {n: oct(mode(tmp_path / "state" / n)) for n in files} == {n: "0o600" for n in files}
    finally:
        await store.stop()


async def test_an_existing_world_readable_history_db_is_made_0600(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    sqlite3.connect(db).close()
    db.touch()
    os.chmod(db, 0o644)  # what earlier versions left behind
    store = HistoryStore(make_hub(), db)
    await store.start()
    await store.stop()
    assert mode(db) == 0o600


# ---------------------------------------------------------------- item 7: bounded under a flood


async def test_flood_keeps_each_field_under_twice_history_size(tmp_path: Path) -> None:
    size, per_field = 50, 5000
    hub = make_hub(size, fields=3)
    db = tmp_path / "history.db"
    store = HistoryStore(hub, db)
    await store.start()
    try:
        t0 = time.time()
        for i in range(per_field):
            for f in range(3):
                hub.push("dev", f"f{f}", float(i), at=t0 + i * 0.001)
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the flushes that FLUSH_AT readings start run
        await store.flush()  # what the next 2 s tick does: no 300 s prune in between
        counts = rows(db)
        assert set(counts) == {"dev.f0", "dev.f1", "dev.f2"}
        assert all(size <= n <= 2 * size for n in counts.values()), counts
        con = sqlite3.connect(db)
        newest = [v for (v,) in con.execute("SELECT v FROM readings WHERE ref = 'dev.f1' ORDER BY t DESC LIMIT ?", (size,))]
        con.close()
        assert newest == [repr(float(i)) for i in range(per_field - 1, per_field - 1 - size, -1)]
    finally:
        await store.stop()
    # After a restart the field holds exactly its newest `size` readings.
    hub2 = make_hub(size, fields=3)
    store2 = HistoryStore(hub2, db)
    await store2.start()
    await store2.stop()
    assert [r.value for r in hub2.field("dev.f1").history] == [float(i) for i in range(per_field - size, per_field)]
    assert rows(db) == {"dev.f0": size, "dev.f1": size, "dev.f2": size}


async def page_settings(store: HistoryStore) -> tuple[int, int]:
    """The open database's page size and WAL checkpoint threshold (in pages), on the store's thread."""

    def read() -> tuple[int, int]:
        assert store._db is not None
        return (store._db.execute("PRAGMA page_size").fetchone()[0],
                store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    return await asyncio.get_running_loop().run_in_executor(store._pool, read)


async def test_a_new_database_has_small_pages_and_one_from_before_keeps_its_own(tmp_path: Path) -> None:
    # Every commit writes the pages it touched whole: a new database's are 1 KiB (bench sd_writes).
    hub = make_hub()
    store = HistoryStore(hub, tmp_path / "new" / "history.db")
    await store.start()
    try:
        hub.push("dev", "f0", 1.5)
        await store.flush()
        assert await page_settings(store) == (1024, 4096)  # the WAL still checkpointed at 4 MiB
    finally:
        await store.stop()
    # A database made with SQLite's default pages (as before) keeps them, and its readings.
    old = tmp_path / "old" / "history.db"
    old.parent.mkdir()
    con = sqlite3.connect(old)
    con.execute("PRAGMA page_size = 4096")
    con.execute("CREATE TABLE readings (ref TEXT NOT NULL, t REAL NOT NULL, v TEXT NOT NULL)")
    with con:
        con.execute("INSERT INTO readings VALUES ('dev.f0', ?, '2.5')", (time.time() - 60,))
    con.close()
    hub = make_hub()
    store = HistoryStore(hub, old)
    await store.start()
    try:
        assert [r.value for r in hub.field("dev.f0").history] == [2.5]
        assert await page_settings(store) == (4096, 1024)
    finally:
        await store.stop()


async def test_mqtt_flood_keeps_history_db_bounded(mosquitto: Mosquitto, tmp_path: Path) -> None:
    size, messages = 100, 3000
    config = parse({
        # Every reading to disk (history_per_second = 0): this is about trimming, not thinning;
        # the readings on disk are bounded by history_raw_rows (memory's by history_size).
        "gateway": {"name": "Flood", "state_dir": str(tmp_path / "state"), "history_size": size,
                    "history_raw_rows": size, "history_per_second": 0},
        "mqtt": {"url": mosquitto.url, "client_id": "history-flood"},
        "devices": [{"id": "flood", "driver": "mqtt", "fields": [{"name": "n", "topic": "hist/flood", "type": "integer"}]}],
    })
    gw = Gateway(config)
    await gw.start()
    try:
        field = gw.hub.field("flood.n")
        feed = tmp_path / "feed.txt"
        feed.write_text("".join(f"{i}\n" for i in range(messages)))
        # Publish until the subscription is in place, then flood the topic at QoS 0.
        probe = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.port), "-t", "hist/flood"]
        for _ in range(50):
            subprocess.run([*probe, "-m", "-1"], check=True, timeout=10)
            if field.latest is not None:
                break
            await asyncio.sleep(0.1)
        assert field.latest is not None, "the mqtt device got nothing"
        with feed.open("rb") as f:
            subprocess.run([*probe, "-l"], stdin=f, check=True, timeout=30)
        await until(lambda: field.latest is not None and field.latest.value == messages - 1, "the last message", 20)
        await gw.history.flush()
        counts = rows(Path(config.gateway.state_dir) / "history.db")
        assert size <= counts["flood.n"] <= 2 * size, counts
    finally:
        await gw.stop()


# ---------------------------------------------------------------- item 4: failures mid-run


async def test_disk_full_mid_run_keeps_readings_reports_once_and_recovers(tmp_path: Path) -> None:
    hub = make_hub(100)
    db = tmp_path / "history.db"
    store = HistoryStore(hub, db)
    await store.start()
    events = problem_events(hub)
    try:
        hub.push("dev", "f0", 0.0)
        await store.flush()
        # SQLite's own limit: growing the file past it fails with SQLITE_FULL, as a full disk does.
        await disk_full(store)
        for i in range(1, 2001):
            hub.push("dev", "f0", float(i))
            if i % 200 == 0:
                await asyncio.sleep(0.06)  # several flushes fail, one after the other
        await until(lambda: "history" in hub.problems, "the problem")
        assert hub.problems["history"].message == "not saved: database or disk is full"
        assert store._task is not None and not store._task.done()
        assert len(hub.field("dev.f0").history) == 100  # the hub's history is untouched
        assert events == [("history", "not saved: database or disk is full", None)]
        await disk_full(store, full=False)
        await until(lambda: "history" not in hub.problems, "the recovery")
        assert events[1:] == [("history", None, "not saved: database or disk is full")]
        await store.flush()
        assert rows(db) == {"dev.f0": 100}  # what was kept while failing, trimmed to history_size
        con = sqlite3.connect(db)
        assert con.execute("SELECT MAX(CAST(v AS REAL)) FROM readings").fetchone() == (2000.0,)
        con.close()
    finally:
        await store.stop()


async def test_io_error_mid_run_is_reported_once_and_recovers(
    tmp_path: Path, immutable: Callable[[Path], None]
) -> None:
    hub = make_hub(100)
    db = tmp_path / "history.db"
    store = HistoryStore(hub, db)
    await store.start()
    events = problem_events(hub)
    try:
        hub.push("dev", "f0", 0.0)
        await store.flush()
        immutable(db.with_name("history.db-wal"))  # every write to the WAL now fails (EPERM)
        for i in range(1, 6):
            hub.push("dev", "f0", float(i))
            await store.flush()
        assert events == [("history", "not saved: disk I/O error", None)]
        subprocess.run(["chattr", "-i", str(db.with_name("history.db-wal"))], check=True)
        await until(lambda: "history" not in hub.problems, "the recovery")
        assert len(events) == 2
        await store.flush()
        assert rows(db) == {"dev.f0": 6}
    finally:
        await store.stop()


# ---------------------------------------------------------------- item 4: broken at start


async def test_folder_named_history_db_keeps_history_in_memory_until_it_is_removed(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    db.mkdir()
    hub = make_hub(10)
    store = HistoryStore(hub, db)
    await store.start()  # no exception
    events = problem_events(hub)
    try:
        assert hub.problems["history"].message == "not saved: history.db: Is a directory"
        for i in range(5):
            hub.push("dev", "f0", float(i))
        assert len(hub.field("dev.f0").history) == 5
        db.rmdir()  # the admin removes it: the store opens a new database by itself
        await until(lambda: "history" not in hub.problems, "the database to open")
        assert events == [("history", None, "not saved: history.db: Is a directory")]
        await store.flush()
        assert rows(db) == {"dev.f0": 5}  # what came in meanwhile is saved too
    finally:
        await store.stop()


async def test_malformed_database_is_moved_aside_and_a_new_one_started(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    con = sqlite3.connect(db)
    con.executescript(history.SCHEMA)
    with con:
        con.executemany("INSERT INTO readings VALUES ('dev.f0', ?, ?)", [(float(i), "1.5" * 40) for i in range(5000)])
    con.close()
    data = bytearray(db.read_bytes())
    page = 4096
    data[3 * page:len(data) - page] = os.urandom(len(data) - 4 * page)  # a power cut mid-write, as on an SD card
    db.write_bytes(data)
    hub = make_hub(10)
    store = HistoryStore(hub, db)
    await store.start()
    try:
        message = hub.problems["history"].message
        assert message.startswith("database was corrupt (database disk image is malformed): moved aside to history.db.corrupt-")
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("history.db.corrupt-")]
        # The same bytes past the header page (which switching to WAL mode rewrites).
        assert len(aside) == 1 and aside[0].read_bytes()[page:] == bytes(data)[page:]
        assert message.endswith(f"moved aside to {aside[0].name}, new one started")
        hub.push("dev", "f0", 7.0)
        await store.flush()
        assert rows(db) == {"dev.f0": 1}
        assert mode(db) == 0o600
    finally:
        await store.stop()


async def test_a_current_database_with_a_corrupt_index_is_moved_aside_untouched(tmp_path: Path) -> None:
    """A database of this version is not written before its index has been read whole: a start
    reads only each field's newest readings, the prune before the first write all of it."""
    db = tmp_path / "history.db"
    hub = make_hub(10)
    store = HistoryStore(hub, db, raw_rows=5000)
    await store.start()
    now = time.time()
    for i in range(5000):  # 40 hours, every 30 s: its minutes, hours and days closed and stored
        hub.push("dev", "f0", 20.0 + i % 7, at=now - 30 * (5000 - i))
    await store.stop()
    assert rows(db) == {"dev.f0": 5000}
    con = sqlite3.connect(db)
    size = con.execute("PRAGMA page_size").fetchone()[0]
    # The index's leaves in key order (dbstat's path), but the first and the last ones: the
    # fields are listed from the first, the newest readings are in the last.
    leaves = [n for n, in con.execute(
        "SELECT pageno FROM dbstat WHERE name = 'readings_ref_t' AND pagetype = 'leaf' ORDER BY path")]
    con.close()
    assert len(leaves) > 10
    data = bytearray(db.read_bytes())
    for n in leaves[1:-4]:
        data[(n - 1) * size:n * size] = os.urandom(size)
    db.write_bytes(data)
    hub = make_hub(10)
    store = HistoryStore(hub, db, raw_rows=5000)
    await store.start()
    try:
        assert "history" not in hub.problems  # a start reads only each field's newest readings
        hub.push("dev", "f0", 7.0)
        await store.flush()  # the first write: the prune before it reads the whole index
        assert hub.problems["history"].message.startswith("database was corrupt (database disk image is malformed)")
        aside = [p for p in tmp_path.iterdir() if p.name.startswith("history.db.corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == bytes(data)
        await store.flush()  # the reading kept for the new database
        assert rows(db) == {"dev.f0": 1}
    finally:
        await store.stop()


def test_hub_problems_are_announced_on_change_only() -> None:
    hub = Hub()
    events = problem_events(hub)
    hub.set_problem("history", "not saved: disk I/O error")
    hub.set_problem("history", "not saved: disk I/O error")
    hub.set_problem("history", "not saved: database or disk is full")
    hub.set_problem("other", None)
    hub.set_problem("history", None)
    hub.set_problem("history", None)
    assert events == [
        ("history", "not saved: disk I/O error", None),
        ("history", "not saved: database or disk is full", "not saved: disk I/O error"),
        ("history", None, "not saved: database or disk is full"),
    ]
    assert hub.problems == {}


# ---------------------------------------------------------------- item 4: through XMPP


async def test_disk_full_shows_in_status_and_presence_and_tells_admins_once(
    xmpp_server: XmppServer, tmp_path: Path
) -> None:
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path), xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()
    victor = await xmpp_server.peer("victor").start()
    told: dict[str, list[str]] = {"alice": [], "victor": []}
    for name, peer in (("alice", alice), ("victor", victor)):
        peer.client.add_event_handler(
            "message",
            lambda m, name=name: told[name].append(m["body"])
            if m["from"].bare == gw.jid and m["body"].startswith("history:") else None,
        )
    store = gw.gateway.history
    try:
        alice.client.send_presence_subscription(pto=gw.jid)
        await alice.presence_from(gw.jid, lambda p: p["status"].startswith("Test GW:"))
        await disk_full(store)
        store.per_second = 0  # every reading to disk, not the first and last of each second
        for i in range(2000):  # more than the free room left in the file's pages
            gw.gateway.hub.push("sim", "temp", float(i))
        await until(lambda: "history" in gw.gateway.hub.problems, "the problem")
        pres = await alice.presence_from(gw.jid, lambda p: "history: not saved" in p["status"])
        assert pres["show"] == "away"
        assert pres["status"] == "Test GW: 1/1 devices OK · history: not saved: database or disk is full"
        status = await victor.ask(gw.jid, "status")
        assert status.splitlines()[0] == "Test GW: 1/1 devices OK"
        assert "history: not saved: database or disk is full" in status.splitlines()
        assert (await victor.ask(gw.jid, "read sim.temp")).startswith("sim.temp = ")
        await asyncio.sleep(0.3)  # several more flushes fail meanwhile
        assert (await alice.ask_for(gw.jid, "status", "Test GW")).startswith("Test GW")  # a round trip: earlier messages are in
        assert told == {"alice": ["history: not saved: database or disk is full"], "victor": []}
        alice.presences.clear()
        await disk_full(store, full=False)
        pres = await alice.presence_from(gw.jid, lambda p: p["status"] == "Test GW: 1/1 devices OK")
        assert pres["show"] == ""
        assert (await alice.ask_for(gw.jid, "status", "Test GW")).startswith("Test GW")
        assert told["alice"] == ["history: not saved: database or disk is full", "history: back to ok"]
    finally:
        await alice.stop()
        await victor.stop()
        await gw.stop()


# ---------------------------------------------------------------- item 4: `iot-gateway run` as a process


def write_config(tmp_path: Path, server: XmppServer) -> Path:
    contacts = server.contacts_toml()
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f"""
[gateway]
name = "Broken GW"
state_dir = "{tmp_path}/state"
[xmpp]
jid = "{server.jid('gateway')}"
server = "{server.prosody.address}"
ca_file = "{server.prosody.ca_file}"
{contacts}
[[devices]]
id = "sim"
driver = "simulated"
interval = 0.2
  [[devices.fields]]
  name = "temp"
  noise = 0
"""
    )
    return cfg


GARBAGE = b"this is not an SQLite database\n" * 200


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("garbage", "history: database was corrupt (file is not a database): moved aside to history.db.corrupt-"),
        ("folder", "history: not saved: history.db: Is a directory"),
        ("readonly", "history: not saved: history.db: Operation not permitted"),
    ],
)
async def test_run_keeps_serving_with_a_broken_history_db(
    xmpp_server: XmppServer, tmp_path: Path, immutable: Callable[[Path], None], case: str, expected: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    if case == "garbage":
        (state / "history.db").write_bytes(GARBAGE)
    elif case == "folder":
        (state / "history.db").mkdir()
    else:
        immutable(state)  # a read-only state folder, read-only for root too
        assert not can_create_in(state)
    cfg = write_config(tmp_path, xmpp_server)
    systemd = FakeSystemd(notify_address(str(tmp_path / "notify")))
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
    env.update(IOT_GATEWAY_XMPP_PASSWORD=xmpp_server.passwords["gateway"], NOTIFY_SOCKET=str(tmp_path / "notify"))
    gw = xmpp_server.jid("gateway")
    alice = await xmpp_server.peer("alice").start()
    told: list[str] = []
    alice.client.add_event_handler(
        "message", lambda m: told.append(m["body"]) if m["from"].bare == gw and m["body"].startswith("history") else None
    )
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stderr=err, text=True,
        )
    try:
        alice.client.send_presence_subscription(pto=gw)
        status = await answering(alice, gw, "Broken GW: 1/1", alive=lambda: proc.poll() is None)
        assert proc.poll() is None, log.read_text()
        assert any(line.startswith(expected) for line in status.splitlines()), status
        # The one-time admin notice about history may arrive meanwhile: wait for the answer itself.
        assert (await alice.ask_for(gw, "read sim.temp", "sim.temp = ", timeout=5)).startswith("sim.temp = ")
        pres = await alice.presence_from(gw, lambda p: expected in p["status"])
        assert pres["show"] == "away" and pres["status"].startswith("Broken GW: 1/1 devices OK · ")
        await asyncio.sleep(2.5)  # past a flush of the real process (every 2 s): no second message
        assert (await alice.ask_for(gw, "status", "Broken GW", timeout=5)).startswith("Broken GW")
        assert len(told) == 1 and told[0].startswith(expected), (told, log.read_text())
        statuses = [m for m in systemd.drain() if "STATUS=" in m]
        assert any(expected in m for m in statuses), statuses
    finally:
        await alice.stop()
        proc.terminate()
        try:
            code = proc.wait(10)
        finally:
            proc.kill()
        systemd.close()
    text = log.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert text.count("gateway problem: ") == 1, text  # logged once
    if case == "garbage":
        aside = [p for p in state.iterdir() if p.name.startswith("history.db.corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == GARBAGE
        assert rows(state / "history.db")["sim.temp"] > 0  # the new database works
        assert mode(state / "history.db") == 0o600
