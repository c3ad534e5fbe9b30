"""Which readings a start puts back in memory: the last ones stored, whatever their stamps.

A start finds each field's newest readings on the (ref, t) index, which is right as long as the
field's readings were stored in time order; the fields where they were not (a clock stepped back,
a device's own clock) are marked as they are written, and loaded by insertion order instead.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway.historydb import Order
from gateway.history import HistoryStore
from gateway.hub import Hub
from tests.test_history import disk_full, make_hub


def marked(db: Path) -> set[str]:
    """The fields history.db marks as stored out of time order."""
    con = sqlite3.connect(db)
    try:
        return {ref for ref, in con.execute("SELECT ref FROM unordered")}
    finally:
        con.close()


async def opened(db: Path) -> tuple[Hub, HistoryStore]:
    """A hub of one device with fields f0 and f1, 5 readings each in memory, and its store started on `db`."""
    hub = make_hub(size=5, fields=2)
    store = HistoryStore(hub, db)
    await store.start()
    return hub, store


def memory(hub: Hub, ref: str) -> list[float]:
    return [r.value for r in hub.field(ref).history]


async def test_a_field_stored_out_of_order_is_marked_and_comes_back_in_insertion_order(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub, store = await opened(db)
    now = time.time()
    try:
        for i in range(8):
            hub.push("dev", "f0", float(i), at=now - 100 + i)
        for i in range(5):  # a clock a day ahead, then put right
            hub.push("dev", "f1", 5000.0 + i, at=now + 86400 + i)
        for i in range(3):
            hub.push("dev", "f1", 20.0 + i, at=now - 10 + i)
        await store.flush()
        assert marked(db) == {"dev.f1"}
    finally:
        await store.stop()
    hub, store = await opened(db)
    try:
        assert memory(hub, "dev.f0") == [3.0, 4.0, 5.0, 6.0, 7.0]
        # The last five stored, not the five newest stamps (which are all from the wrong day).
        assert memory(hub, "dev.f1") == [5003.0, 5004.0, 20.0, 21.0, 22.0]
        hub.push("dev", "f1", 23.0, at=now)
        await store.flush()
        assert marked(db) == {"dev.f1"}  # still out of order among the last five
    finally:
        await store.stop()


async def test_a_database_from_before_has_every_field_marked_until_a_start_finds_it_in_order(
    tmp_path: Path,
) -> None:
    db = tmp_path / "history.db"
    hub, store = await opened(db)
    now = time.time()
    try:
        for i in range(8):
            hub.push("dev", "f0", float(i), at=now - 100 + i)
        await store.flush()
    finally:
        await store.stop()
    # As the version before left it: no marks, and out-of-order rows of its own (dev.f1).
    con = sqlite3.connect(db)
    with con:
        con.execute("DROP TABLE unordered")
        con.execute("PRAGMA user_version = 2")
        con.executemany(
            "INSERT INTO readings VALUES ('dev.f1', ?, ?)",
            [(now + 86400 + i, str(5000 + i)) for i in range(5)] + [(now - 10 + i, str(20 + i)) for i in range(3)],
        )
    con.close()
    hub, store = await opened(db)
    try:
        assert marked(db) == {"dev.f0", "dev.f1"}
        assert memory(hub, "dev.f0") == [3.0, 4.0, 5.0, 6.0, 7.0]
        assert memory(hub, "dev.f1") == [5003.0, 5004.0, 20.0, 21.0, 22.0]
        hub.push("dev", "f0", 8.0, at=now)
        await store.flush()
        assert marked(db) == {"dev.f1"}  # dev.f0 was found in order: unmarked with the next write
    finally:
        await store.stop()
    hub, store = await opened(db)
    try:
        assert memory(hub, "dev.f0") == [4.0, 5.0, 6.0, 7.0, 8.0]
        assert memory(hub, "dev.f1") == [5003.0, 5004.0, 20.0, 21.0, 22.0]
    finally:
        await store.stop()


async def test_an_unmarked_field_is_trusted_to_be_in_order(tmp_path: Path) -> None:
    """What the mark saves: rows written behind the gateway's back, out of order and unmarked,
    come back by their stamps (the index), which a marked field's never do."""
    db = tmp_path / "history.db"
    _, store = await opened(db)
    await store.stop()
    now = time.time()
    con = sqlite3.connect(db)
    with con:
        for ref in ("dev.f0", "dev.f1"):
            con.executemany(
                "INSERT INTO readings VALUES (?, ?, ?)",
                [(ref, now + 86400 + i, str(5000 + i)) for i in range(5)] + [(ref, now - 10 + i, str(20 + i)) for i in range(3)],
            )
        con.execute("INSERT INTO unordered VALUES ('dev.f1')")
    con.close()
    hub, store = await opened(db)
    try:
        assert memory(hub, "dev.f0") == [5000.0, 5001.0, 5002.0, 5003.0, 5004.0]
        assert memory(hub, "dev.f1") == [5003.0, 5004.0, 20.0, 21.0, 22.0]
    finally:
        await store.stop()


async def test_a_mark_whose_batch_hit_a_full_disk_is_written_with_the_batch_that_works(tmp_path: Path) -> None:
    db = tmp_path / "history.db"
    hub = make_hub(size=5, fields=2)
    store = HistoryStore(hub, db, raw_rows=5000)
    await store.start()
    now = time.time()
    try:
        for i in range(300):
            hub.push("dev", "f1", 20.0 + i % 7, at=now - 400 + i)
        await store.flush()
        await disk_full(store)  # SQLite's own SQLITE_FULL, as from a full disk
        for i in range(2000):
            hub.push("dev", "f1", 5000.0 + i, at=now - 3000 + i)  # stamped before what is stored
        await store.flush()
        assert hub.problems["history"].message == "not saved: database or disk is full"
        assert marked(db) == set()  # the batch, and its mark, not written
        await disk_full(store, full=False)
        await store.flush()
        assert "history" not in hub.problems
        assert marked(db) == {"dev.f1"}  # the mark went with the batch, not lost with the first try
    finally:
        await store.stop()
    hub, store = await opened(db)
    try:
        assert memory(hub, "dev.f1") == [6995.0, 6996.0, 6997.0, 6998.0, 6999.0]  # the last stored
    finally:
        await store.stop()


def test_marks_follow_a_renamed_device() -> None:
    order = Order()
    order.unordered = {"old.t", "old.h", "new.x", "other.t"}
    order.rename("old.", "new.")
    # The former `new` device's rows were dropped with its mark; `old`'s are `new`'s now.
    assert order.unordered == {"new.t", "new.h", "other.t"}
