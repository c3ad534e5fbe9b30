"""The mqtt driver's payload logic in process, on the fake broker (gateway/mqtt/fake.py):
readings parsed and pushed, bad payloads skipped, sets published and confirmed (or not),
health following the connection. The same driver against a real Mosquitto: test_mqtt.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from devices import Context
from devices.mqtt import MqttDriver
from gateway.app import build_hub
from gateway.config import parse
from gateway.hub import Health, Unconfirmed
from gateway.mqtt.broker import MqttError
from gateway.mqtt.fake import FakeBroker, published_to


def plug(tmp_path: Path, **device: Any) -> tuple[MqttDriver, FakeBroker]:
    """A Tasmota-style plug: power (JSON), a relay with a state topic and a command topic."""
    config = parse({
        "gateway": {"state_dir": str(tmp_path / "state")},
        "mqtt": {"url": "mqtt://127.0.0.1:1883"},
        "devices": [{
            "id": "plug",
            "driver": "mqtt",
            "confirm_timeout": 0.2,
            "fields": [
                {"name": "power", "unit": "W", "topic": "tele/plug/SENSOR", "json_path": "ENERGY.Power"},
                {"name": "relay", "type": "boolean", "writable": True,
                 "topic": "stat/plug/POWER", "command_topic": "cmnd/plug/POWER"},
            ],
            **device,
        }],
    })
    hub = build_hub(config)
    hub.bind(asyncio.get_running_loop())
    ctx = Context(hub, config)
    fake = FakeBroker().install(ctx)
    return MqttDriver(config.devices[0], ctx), fake


async def test_readings_and_bad_payloads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    driver, fake = plug(tmp_path)
    await driver.start()
    assert driver.hub.nodes["plug"].health.state is Health.OK
    assert fake.deliver("tele/plug/SENSOR", '{"ENERGY": {"Power": 12.5}}') == 1
    assert driver.hub.field("plug.power").latest.value == 12.5
    caplog.set_level(logging.WARNING, logger="iot_gateway.mqtt")
    fake.deliver("tele/plug/SENSOR", '{"ENERGY": {"Power": "lots"}}')
    fake.deliver("tele/plug/SENSOR", "not json")
    assert driver.hub.field("plug.power").latest.value == 12.5  # nothing read is lost
    assert any("skipped: expects a number, got 'lots'" in r.getMessage() for r in caplog.records)
    await driver.stop()
    assert fake.routes == [] and fake.users == []


async def test_a_set_is_published_and_confirmed_by_the_state_topic(tmp_path: Path) -> None:
    driver, fake = plug(tmp_path)
    await driver.start()
    write = asyncio.create_task(driver.write("relay", True))
    await asyncio.sleep(0)
    assert published_to(fake, "cmnd/plug/POWER") == ["ON"]
    fake.deliver("stat/plug/POWER", "ON")
    assert await write is None  # applied: the device reported it
    assert driver.hub.field("plug.relay").latest.value is True
    with pytest.raises(Unconfirmed, match="did not report the new state within 0.2 s; it last reported on"):
        await driver.write("relay", False)  # the device stays silent
    await driver.stop()


async def test_health_follows_the_connection_and_a_refused_publish_says_why(tmp_path: Path) -> None:
    driver, fake = plug(tmp_path)
    await driver.start()
    fake.down("connection refused")
    assert driver.hub.nodes["plug"].health.state is Health.OFFLINE
    with pytest.raises(MqttError, match="connection refused"):
        await driver.write("relay", True)
    fake.up()
    assert driver.hub.nodes["plug"].health.state is Health.OK
    fake.refuse = "the broker did not acknowledge the command"
    with pytest.raises(MqttError, match="did not acknowledge"):
        await driver.write("relay", True)
    await driver.stop()


async def test_a_retained_message_never_reaches_a_command_route(tmp_path: Path) -> None:
    driver, fake = plug(tmp_path)
    heard: list[str] = []
    fake.route(object(), "gw/+/set", lambda sub, topic, payload: heard.append(topic), command=True)
    assert fake.deliver("gw/relay/set", "ON", retain=True) == 0
    assert fake.deliver("gw/relay/set", "ON") == 1 and heard == ["gw/relay/set"]
