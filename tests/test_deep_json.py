"""A JSON payload nested 200,000 deep is one more bad payload: a one-line skip, never a RecursionError traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import devices.serial as sd
from devices.mqtt import BadPayload, parse_json
from devices.serial_config import SerialDevice
from gateway.hub import Health
from gateway.demo.localservers import Mosquitto
from tests.test_mqtt import Publisher, gateways, health, make_config, publisher, start, unique, until, values

__all__ = ["gateways", "publisher"]  # fixtures, imported so pytest finds them here

DEEP = "[" * 200_000 + "]" * 200_000


def test_parsers_turn_recursion_into_a_bad_payload() -> None:
    with pytest.raises(BadPayload, match="^JSON nested too deeply$"):
        parse_json(DEEP)
    device = SerialDevice.model_validate(
        {"id": "d", "driver": "serial", "port": "/dev/ttyUSB0", "format": "json", "fields": [{"name": "x"}]}
    )
    # The serial driver drops lines over 4 KiB before parsing; its parser must hold on its own too.
    with pytest.raises(sd.BadLine, match="^JSON nested too deeply$"):
        sd.Parser(device).parse('{"x": ' + DEEP + "}")


async def test_deeply_nested_mqtt_payload_is_skipped_in_one_line(
    mosquitto: Mosquitto, publisher: Publisher, gateways: list, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    m = unique("deep")
    config = make_config(tmp_path, mosquitto.url, [{
        "id": "dev", "driver": "mqtt",
        "availability_topic": f"{m}/avail", "availability_json_path": "state",
        "fields": [{"name": "x", "topic": f"{m}/x", "json_path": "x"}],
    }])
    gw = await start(gateways, config)
    await until(lambda: health(gw, "dev")[1].startswith("waiting"), "the broker connection")
    await publisher.send(f"{m}/avail", '{"state": "Online"}')
    await publisher.send(f"{m}/x", '{"x": 1}')
    await until(lambda: values(gw, "dev.x") == [1.0], "a first reading")

    await publisher.send(f"{m}/x", '{"x": ' + DEEP + "}")
    await publisher.send(f"{m}/avail", DEEP)
    await publisher.send(f"{m}/x", '{"x": 7}')
    await until(lambda: values(gw, "dev.x") == [1.0, 7.0], "the good message after the deep ones")

    assert health(gw, "dev") == (Health.OK, "")
    records = [r for r in caplog.records if r.name.startswith("iot_gateway")]
    assert [r for r in records if r.levelno >= logging.ERROR or r.exc_info] == []
    skipped = [r.getMessage() for r in records if "skipped" in r.getMessage()]
    assert len(skipped) == 2, skipped
    assert skipped[0].startswith(f"dev.x: message on {m}/x skipped: JSON nested too deeply; payload ")
    assert skipped[1] == f"dev: availability message on {m}/avail skipped: JSON nested too deeply"
    assert all(len(s) < 300 and "\n" not in s for s in skipped)
