"""Random and hostile input (hypothesis): nothing crashes, nothing is set that
should not be, and the answer is a specific error."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.mqtt import BadPayload, lookup, parse_json, to_value
from devices.serial import BadLine, LineBuffer, Parser, convert
from gateway.auth import Actor
from gateway.commands import Commands
from devices.mqtt_config import MqttField
from devices.serial_config import SerialDevice
from gateway.config import ConfigError, load, parse
from gateway.hub import FieldSpec, Hub
from gateway.values import BadValue

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

WORDS = st.sampled_from(
    ["set", "read", "history", "watch", "unwatch", "ack", "log", "status", "list", "help",
     "dev.relay", "dev.level", "dev.temp", "dev", "on", "off", "for", "10m", "-1", "1e309", "nan",
     ">", "==", "hysteresis", "interval", "change", "offline", "\x00", "é", "🔥", "'", '"', "```"]
)
COMMAND = st.one_of(st.text(max_size=200), st.lists(WORDS, max_size=8).map(" ".join))


def make_hub() -> Hub:
    hub = Hub(50)
    hub.add_node("dev", "Device", "simulated", [
        FieldSpec("temp", unit="°C"),
        FieldSpec("relay", type="boolean", writable=True),
        FieldSpec("level", type="integer", writable=True, min=0, max=10),
    ])
    writes: list[tuple[str, object]] = []

    async def writer(field: str, value: object) -> None:
        writes.append((field, value))
        hub.push("dev", field, value)

    hub.set_writer("dev", writer)
    hub.writes = writes  # type: ignore[attr-defined]
    return hub


@SETTINGS
@given(text=COMMAND)
def test_chat_commands_never_crash_and_viewers_never_set(text: str) -> None:
    hub = make_hub()
    commands = Commands(hub, "GW")
    viewer = Actor("v@x", "viewer", "chat")
    reply = asyncio.run(commands.run(text, viewer))
    assert isinstance(reply, str) and reply
    assert hub.writes == []  # type: ignore[attr-defined]
    assert all(e.outcome != "applied" for e in hub.audit.entries)


@SETTINGS
@given(text=COMMAND)
def test_operator_sets_only_valid_values(text: str) -> None:
    hub = make_hub()
    commands = Commands(hub, "GW")
    reply = asyncio.run(commands.run(text, Actor("o@x", "operator", "chat")))
    assert isinstance(reply, str) and reply
    for field, value in hub.writes:  # type: ignore[attr-defined]
        if field == "level":
            assert isinstance(value, int) and 0 <= value <= 10
        else:
            assert field == "relay" and isinstance(value, bool)


TOML_VALUES = st.recursive(
    st.one_of(st.text(max_size=20), st.integers(), st.floats(allow_nan=False), st.booleans()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)),
    max_leaves=10,
)
KEYS = st.sampled_from(["gateway", "xmpp", "contacts", "mqtt", "devices", "fields", "id", "driver", "name",
                        "type", "port", "pin", "kind", "topic", "jid", "role", "min", "max", "writable"])
CONFIG = st.dictionaries(KEYS, st.one_of(TOML_VALUES, st.lists(st.dictionaries(KEYS, TOML_VALUES, max_size=5), max_size=3)), max_size=5)


@SETTINGS
@given(data=CONFIG)
def test_random_config_data_is_valid_or_a_listed_error(data: dict) -> None:
    try:
        parse(data)
    except ConfigError as e:
        assert e.errors and all(": " in line for line in e.errors)


@SETTINGS
@given(text=st.text(max_size=300))
def test_random_config_text_never_raises_anything_else(tmp_path_factory, text: str) -> None:
    path = Path(tmp_path_factory.mktemp("cfg")) / "gw.toml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as e:
        assert e.errors


SERIAL = SerialDevice.model_validate({
    "id": "s", "driver": "serial", "port": "/dev/ttyX", "format": "json",
    "fields": [{"name": "t", "json_path": "a.0.b"}, {"name": "on", "type": "boolean", "key": "on"}],
})
SERIAL_KV = SerialDevice.model_validate({
    "id": "s", "driver": "serial", "port": "/dev/ttyX",
    "fields": [{"name": "t"}, {"name": "n", "type": "integer"}],
})


@SETTINGS
@given(chunks=st.lists(st.binary(max_size=3000), max_size=8))
def test_serial_line_buffer_bounds_every_line(chunks: list[bytes]) -> None:
    buf = LineBuffer(limit=4096)
    for chunk in chunks:
        for line in buf.feed(chunk):
            assert line is None or (0 < len(line) <= 4096 and b"\n" not in line and b"\r" not in line)
        assert buf.pending <= 4096


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.from_regex(r"[a-z]{1,3}=[-0-9.a-z]{0,6}([ ,;][a-z]{1,3}=[-0-9.]{0,6}){0,4}", fullmatch=True)))
def test_serial_lines_parse_or_are_rejected(text: str) -> None:
    for device in (SERIAL, SERIAL_KV):
        try:
            found = Parser(device).parse(text)
        except BadLine:
            continue
        by_name = {f.name: f for f in device.fields}
        for name, raw in found.items():
            try:
                convert(by_name[name], raw)
            except BadValue:
                pass


MQTT_FIELD = MqttField.model_validate({"name": "p", "topic": "t", "json_path": "ENERGY.Power"})
MQTT_BOOL = MqttField.model_validate({"name": "r", "type": "boolean", "topic": "t", "payload_on": "ON", "payload_off": "OFF"})


@SETTINGS
@given(payload=st.one_of(st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")),
                         st.recursive(st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.booleans()),
                                      lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.sampled_from(["ENERGY", "Power", "x"]), c, max_size=3)),
                                      max_leaves=8).map(lambda d: __import__("json").dumps(d))))
def test_mqtt_payloads_give_a_value_or_a_specific_error(payload: str) -> None:
    for f in (MQTT_FIELD, MQTT_BOOL):
        try:
            doc = parse_json(payload) if f.json_path else payload
            raw = lookup(doc, f.json_path) if f.json_path else doc
            value = to_value(f, raw)
        except BadPayload as e:
            assert str(e)
            continue
        assert isinstance(value, bool) if f.type == "boolean" else isinstance(value, float)
