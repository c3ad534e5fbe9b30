"""`iot-gateway compact`: an old history.db's 4 KiB pages rewritten as 1 KiB ones, through the
real command line, and every way it must refuse and change nothing."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gateway.compact as compact_module
from gateway.compact import CompactError, compact
from gateway.history import HistoryStore
from gateway.state import StateDir
from tests.test_history import make_hub

ROOT = Path(__file__).resolve().parent.parent
EXIT_LOCKED = 3


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "compact", "--config", str(config)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


async def old_database(state: Path) -> Path:
    """A history.db with SQLite's 4 KiB pages (as made before 1 KiB ones) and a day of readings
    and buckets written by the store."""
    state.mkdir(mode=0o700)
    db = state / "history.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA page_size = 4096")
    con.execute("CREATE TABLE readings (ref TEXT NOT NULL, t REAL NOT NULL, v TEXT NOT NULL)")
    con.close()
    hub = make_hub(10, fields=2)
    store = HistoryStore(hub, db, raw_rows=5000)
    await store.start()
    now = time.time()
    for i in range(2000):
        hub.push("dev", "f0", 20.0 + i % 9, at=now - 86400 + 40 * i)
        hub.push("dev", "f1", i, at=now - 86400 + 40 * i)
    await store.stop()
    return db


def contents(db: Path) -> tuple[int, list[tuple[object, ...]], list[tuple[object, ...]], str]:
    con = sqlite3.connect(db)
    try:
        return (
            con.execute("PRAGMA page_size").fetchone()[0],
            con.execute("SELECT ref, t, v FROM readings ORDER BY rowid").fetchall(),
            con.execute("SELECT * FROM rollups ORDER BY ref, res, t").fetchall(),
            con.execute("PRAGMA journal_mode").fetchone()[0],
        )
    finally:
        con.close()


def config(tmp_path: Path, state: Path) -> Path:
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[gateway]\nstate_dir = "{state}"\n')
    cfg.chmod(0o600)
    return cfg


async def test_compact_rewrites_an_old_database_with_small_pages_and_keeps_everything(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="iot_gateway.history")
    db = await old_database(tmp_path / "state")
    hint = "history.db has 4096-byte pages: `iot-gateway compact`, with the gateway stopped"
    assert hint in caplog.text  # what the gateway's start tells the admin of such a database
    caplog.clear()
    page, readings, buckets, _ = contents(db)
    assert page == 4096 and len(readings) == 4000 and buckets
    r = run(config(tmp_path, tmp_path / "state"))
    assert r.returncode == 0, r.stderr
    assert "4096-byte pages → 1024" in r.stdout
    assert contents(db) == (1024, readings, buckets, "wal")
    assert os.stat(db).st_mode & 0o777 == 0o600
    assert [p.name for p in db.parent.iterdir() if p.name.startswith("etilqs")] == []  # no temporary left
    again = run(config(tmp_path, tmp_path / "state"))
    assert again.returncode == 0 and "already 1024-byte pages" in again.stdout
    # The gateway's store opens it and goes on from what it held.
    hub = make_hub(10, fields=2)
    store = HistoryStore(hub, db, raw_rows=5000)
    await store.start()
    try:
        assert len(hub.field("dev.f0").history) == 10
    finally:
        await store.stop()
    assert "byte pages" not in caplog.text


async def test_compact_refuses_while_the_gateway_holds_the_state_folder(tmp_path: Path) -> None:
    db = await old_database(tmp_path / "state")
    before = contents(db)
    holder = StateDir(tmp_path / "state")
    holder.lock()  # as a running gateway does
    try:
        r = run(config(tmp_path, tmp_path / "state"))
    finally:
        holder.unlock()
    assert r.returncode == EXIT_LOCKED
    assert "is in use by another iot-gateway process" in r.stderr and "stop it first" in r.stderr
    assert contents(db) == before


def test_compact_without_a_database_or_a_state_folder_says_so(tmp_path: Path) -> None:
    r = run(config(tmp_path, tmp_path / "nowhere"))
    assert r.returncode == 1 and "no state folder" in r.stderr
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    r = run(config(tmp_path, tmp_path / "empty"))
    assert r.returncode == 1 and "no history database there" in r.stderr
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["lock"]  # the state lock, nothing else


async def test_compact_needs_room_and_a_sound_database_and_changes_nothing_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = await old_database(tmp_path / "state")
    before = contents(db)

    class Full:
        free = 1000

    monkeypatch.setattr(compact_module.shutil, "disk_usage", lambda _: Full)
    with pytest.raises(CompactError, match=r"needs about [0-9.]+ MB free beside it, 0.001 MB free: nothing changed"):
        compact(db)
    monkeypatch.undo()
    assert contents(db) == before
    # A damaged file: the check before the rewrite finds it.
    data = bytearray(db.read_bytes())
    data[4096 * 3:4096 * 5] = b"\xff" * 8192
    db.write_bytes(data)
    with pytest.raises(CompactError, match="damaged|malformed"):
        compact(db)
    assert db.read_bytes() == bytes(data)
