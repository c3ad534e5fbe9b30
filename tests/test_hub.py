"""The hub on its own: readings, history, health, thread-safe pushes, checked writes."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from gateway.app import Gateway
from gateway.auth import Actor, Forbidden
from gateway.config import parse
from gateway.hub import DeviceError, FieldSpec, Health, Hub, NotWritable, UnknownField
from gateway.values import BadValue, coerce
from tests.contract import Contract, driver_contract

ADMIN = Actor("alice@x", "admin", "test")
OPERATOR = Actor("olive@x", "operator", "test")
VIEWER = Actor("victor@x", "viewer", "test")


def make_hub(history: int = 3) -> Hub:
    hub = Hub(history)
    hub.add_node(
        "dev", "Device", "simulated",
        [
            FieldSpec("temp", unit="°C"),
            FieldSpec("relay", type="boolean", writable=True),
            FieldSpec("level", type="integer", writable=True, min=0, max=10),
        ],
        stale_after=5,
    )
    return hub


def test_push_keeps_latest_and_bounded_history() -> None:
    hub = make_hub(history=3)
    for i, v in enumerate(["20.5", 21, 22.25, "23"]):
        hub.push("dev", "temp", v, at=100 + i)
    f = hub.field("dev.temp")
    assert f.latest is not None and (f.latest.value, f.latest.time) == (23.0, 103)
    assert [r.value for r in f.history] == [21.0, 22.25, 23.0]
    assert hub.nodes["dev"].health.state is Health.OK


def test_bad_reading_is_dropped_and_nothing_else_changes() -> None:
    hub = make_hub()
    hub.push("dev", "temp", 20)
    hub.push("dev", "temp", "garbage")
    hub.push("dev", "temp", float("nan"))
    hub.push("dev", "nope", 1)
    hub.push("ghost", "temp", 1)
    assert [r.value for r in hub.field("dev.temp").history] == [20.0]


def test_a_float_reading_is_what_coerce_makes_of_it_for_every_field_type() -> None:
    hub = Hub(10)
    types = ("numeric", "integer", "boolean", "string")
    hub.add_node("dev", "Device", "simulated", [FieldSpec(t, type=t) for t in types])
    for value in (1.5, 2.0, 1.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e308):
        for t in types:
            try:
                expected: object = coerce(t, value)
            except BadValue:
                expected = "dropped"
            f = hub.field(f"dev.{t}")
            f.latest = None
            hub.push("dev", t, value)
            got = "dropped" if f.latest is None else f.latest.value
            assert repr(got) == repr(expected) and type(got) is type(expected), (t, value)


def test_listeners_see_readings_and_health_and_a_failing_one_is_contained() -> None:
    hub = make_hub()
    seen: list[tuple[str, object]] = []
    hub.subscribe(reading=lambda f, r: 1 / 0)  # must not stop the others
    hub.subscribe(reading=lambda f, r: seen.append((f.ref, r.value)),
                  health=lambda n, old: seen.append((n.id, (old.state, n.health.state))))
    hub.push("dev", "temp", 1)
    hub.set_health("dev", Health.OFFLINE, "unplugged")
    hub.set_health("dev", Health.OFFLINE, "unplugged")  # no change, no event
    assert seen == [
        ("dev", (Health.STARTING, Health.OK)),
        ("dev.temp", 1.0),
        ("dev", (Health.OK, Health.OFFLINE)),
    ]


def test_stale_after_silence_and_back_on_data() -> None:
    hub = make_hub()
    hub.push("dev", "temp", 1, at=1000)
    node = hub.nodes["dev"]
    hub.check_stale(now=node.seen_at + 4)  # monotonic: durations never use the wall clock
    assert node.health.state is Health.OK
    hub.check_stale(now=node.seen_at + 6)
    assert (node.health.state, node.health.reason) == (Health.STALE, "no data for 5 s")
    hub.push("dev", "temp", 2)
    assert node.health.state is Health.OK


def test_offline_is_not_overridden_by_stale_check() -> None:
    hub = make_hub()
    hub.set_health("dev", Health.OFFLINE, "gone")
    hub.check_stale(now=10**12)
    assert hub.nodes["dev"].health.state is Health.OFFLINE


async def test_pushes_from_other_threads_land_on_the_loop() -> None:
    hub = make_hub(history=1000)
    hub.bind(asyncio.get_running_loop())
    loop_thread = threading.get_ident()
    threads_seen: set[int] = set()
    hub.subscribe(reading=lambda f, r: threads_seen.add(threading.get_ident()))

    def worker(start: int) -> None:
        for i in range(100):
            hub.push("dev", "temp", start + i)

    ts = [threading.Thread(target=worker, args=(k * 100,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(hub.field("dev.temp").history) == 400:
            break
    assert sorted(r.value for r in hub.field("dev.temp").history) == [float(i) for i in range(400)]
    assert threads_seen == {loop_thread}


async def test_write_checks_role_type_bounds_then_calls_driver() -> None:
    hub = make_hub()
    calls: list[tuple[str, object]] = []

    async def writer(field: str, value: object) -> None:
        calls.append((field, value))
        hub.push("dev", field, value)

    hub.set_writer("dev", writer)
    hub.push("dev", "level", 2)
    with pytest.raises(Forbidden):
        await hub.write("dev.level", 5, VIEWER)
    with pytest.raises(BadValue, match="dev.level 11 is above the maximum 10"):
        await hub.write("dev.level", "11", OPERATOR)
    with pytest.raises(BadValue, match="expects a whole number"):
        await hub.write("dev.level", "2.5", OPERATOR)
    with pytest.raises(NotWritable):
        await hub.write("dev.temp", 3, ADMIN)
    with pytest.raises(UnknownField):
        await hub.write("dev.nope", 3, ADMIN)
    assert calls == []
    assert await hub.write("dev.level", "7", OPERATOR) == (2, 7)
    assert calls == [("level", 7)]
    outcomes = [(e.actor.jid, e.outcome) for e in hub.audit.entries]
    assert outcomes == [
        ("victor@x", "refused"), ("olive@x", "refused"), ("olive@x", "refused"),
        ("alice@x", "refused"), ("olive@x", "applied"),
    ]


async def test_driver_failure_is_reported_and_audited() -> None:
    hub = make_hub()

    async def writer(field: str, value: object) -> None:
        raise OSError("port closed")

    hub.set_writer("dev", writer)
    with pytest.raises(DeviceError, match="dev refused the write: port closed"):
        await hub.write("dev.relay", "on", ADMIN)
    assert hub.audit.entries[-1].outcome == "failed"
    assert hub.field("dev.relay").latest is None


@pytest.mark.parametrize("raw, value", [("on", True), ("OFF", False), ("true", True), ("0", False), (1, True)])
async def test_boolean_words(raw: object, value: bool) -> None:
    hub = make_hub()

    async def writer(field: str, v: object) -> None:
        pass

    hub.set_writer("dev", writer)
    assert (await hub.write("dev.relay", raw, ADMIN))[1] is value


def test_unsubscribe_all_drops_an_owners_listeners_and_no_others() -> None:
    """Listeners subscribed under an owner all go with `unsubscribe_all(owner)`; the rest stay."""
    hub = make_hub()
    owner, other = object(), object()
    seen: list[str] = []
    hub.subscribe(owner, reading=lambda f, r: seen.append("owner"), node=lambda e: seen.append("owner node"))
    hub.subscribe(owner, health=lambda n, old: seen.append("owner health"))
    hub.subscribe(other, reading=lambda f, r: seen.append("other"))
    hub.subscribe(reading=lambda f, r: seen.append("nobody's"))
    assert hub.listeners() == 5
    hub.unsubscribe_all(owner)
    hub.unsubscribe_all(owner)  # twice: nothing left to do
    assert hub.listeners() == 2
    hub.push("dev", "temp", 21.0)
    hub.set_health("dev", Health.ERROR, "unplugged")
    assert seen == ["other", "nobody's"]


async def test_the_simulated_driver_contract(tmp_path: Path) -> None:
    """tests/contract.py for the simulated driver (the suite's stand-in device): a set is applied."""
    config = parse({"gateway": {"state_dir": str(tmp_path / "state")}, "devices": [{
        "id": "sim", "driver": "simulated", "interval": 0.2,
        "fields": [{"name": "temp"}, {"name": "relay", "type": "boolean", "writable": True}],
    }]})
    gw = Gateway(config)
    await gw.start()
    try:
        await driver_contract(Contract(gw.hub, "sim", gw.stop, writes=[("relay", True, True)]))
    except BaseException:
        await gw.stop()
        raise
