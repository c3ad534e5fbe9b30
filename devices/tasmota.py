"""`tasmota`: every Tasmota device that announces itself (native discovery), each its own node.

Tasmota publishes, retained, `tasmota/discovery/<MAC>/config` (its topic `t`,
full-topic template `ft` with the prefixes `tp`, relays `rl`, the texts of its
states and of its LWT) and `tasmota/discovery/<MAC>/sensors` (`{"sn": …}`, the
shape of `tele/<t>/SENSOR`). Each device becomes a node named after its topic
(`tasmota_5D3A1F` → `tasmota_5d3a1f`), with a boolean `power` field per relay
(`power1`, `power2` … with several), set through `cmnd/<t>/POWER<n>` and
confirmed by `stat/<t>/RESULT` (or `stat/<t>/POWER<n>`, `tele/<t>/STATE`), and
a numeric field per sensor value (`energy_power`, `bme280_temperature`) read
from `tele/<t>/SENSOR` and `stat/<t>/STATUS10`. Health follows
`tele/<t>/LWT`. The MAC is the identity: a device that changes its topic is
renamed, keeping its history. An empty config message (Tasmota withdrawing
it) leaves the device offline.

A device's topics are made from the entry's `full_topic` and `prefixes` and the
device's own `t` (one topic level), never from its `ft`/`tp`: a device whose
`ft` or `tp` differ from them is skipped, so no discovery message can point the
gateway's commands anywhere else. Two devices claiming one topic are both
skipped (one log line naming both); every other device goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from functools import partial
from typing import Any

from gateway.hub import FieldSpec, Health
from gateway.mqtt.broker import Broker, MqttError
from gateway.noise import Throttle
from gateway.values import Value, quoted

from .discovery import MAX_DEVICES, MAX_FIELDS, MAX_TEXT, Device, Discovering, Malformed, Spot, describe, dig, picked, sanitise, text
from .tasmota_config import LEVEL, TasmotaDevice

log = logging.getLogger("iot_gateway.tasmota")

MAC = re.compile(r"[0-9A-F]{12}")
RELAY_KINDS = (1, 2)  # `rl`: 1 a relay, 2 a light's power; 3 (shutter) is not an on/off field
# Units of Tasmota's sensor keys (xsns drivers); temperature and pressure units come with the reading.
UNITS = {
    "Temperature": "°C",
    "DewPoint": "°C",
    "Humidity": "%",
    "Pressure": "hPa",
    "SeaPressure": "hPa",
    "Illuminance": "lx",
    "Power": "W",
    "ApparentPower": "VA",
    "ReactivePower": "VAr",
    "Voltage": "V",
    "Current": "A",
    "Total": "kWh",
    "Yesterday": "kWh",
    "Today": "kWh",
    "Period": "Wh",
    "Frequency": "Hz",
    "Distance": "cm",
    "CarbonDioxide": "ppm",
    "Gas": "kΩ",
}
TEMP_KEYS = ("Temperature", "DewPoint")
PRESSURE_KEYS = ("Pressure", "SeaPressure")
UNIT_KEYS = ("TempUnit", "PressureUnit", "Time")
MAX_MESSAGE = 64 * 1024  # bytes of a discovery message (Tasmota's are about 1 KB)
DEFAULT_FT = "%prefix%/%topic%/"
DEFAULT_TP = ["cmnd", "stat", "tele"]


def full_topic(cfg: dict[str, Any], template: str = DEFAULT_FT, prefixes: list[str] = DEFAULT_TP) -> tuple[str, str, str]:
    """(`cmnd/<t>/`, `stat/<t>/`, `tele/<t>/`) of a device from the configured full topic and
    prefixes and its own topic `t`; Malformed when its `ft` or `tp` say otherwise, or `t` is not
    one topic level."""
    t = text(cfg.get("t"), "t", 64)
    if not LEVEL.fullmatch(t):
        raise Malformed(f"its topic {t!r} is not one topic level (no '/', '+', '#' or spaces)")
    ft, tp = cfg.get("ft", template), cfg.get("tp", prefixes)
    if not isinstance(ft, str) or ft.rstrip("/") != template.rstrip("/"):
        raise Malformed(f"its full topic {quoted(str(ft))} is not the configured {template!r}")
    if tp != prefixes:
        raise Malformed(f"its prefixes {quoted(json.dumps(tp))} are not the configured {prefixes}")
    out = template.replace("%topic%", t)
    return out.replace("%prefix%", prefixes[0]), out.replace("%prefix%", prefixes[1]), out.replace("%prefix%", prefixes[2])


def relays(cfg: dict[str, Any], cmnd: str) -> dict[str, Spot]:
    """A `power` field per relay (`power1` … with several) from `rl` and the `state` texts."""
    rl = cfg.get("rl", [])
    if not isinstance(rl, list) or len(rl) > 32 or any(isinstance(r, bool) or not isinstance(r, int) for r in rl):
        raise Malformed("rl is not a list of relay kinds")
    state = cfg.get("state", ["OFF", "ON", "TOGGLE", "HOLD"])
    if not isinstance(state, list) or len(state) < 2:
        raise Malformed("state is not a list of state texts")
    off, on = text(state[0], "state[0]", 32), text(state[1], "state[1]", 32)
    if off.lower() == on.lower():
        raise Malformed("state[0] and state[1] are the same")
    found = [i for i, kind in enumerate(rl) if kind in RELAY_KINDS]
    out: dict[str, Spot] = {}
    for i in found:
        name = "power" if found == [0] else f"power{i + 1}"
        spec = FieldSpec(name, "boolean", "", None, True, None, None, f"relay {i + 1} (POWER{i + 1})")
        out[name] = Spot(spec, (f"POWER{i + 1}",), True, on, off, cmnd + f"POWER{i + 1}", actuator=True)
    return out


def sensor_spots(sn: Any, skipped: list[str] | None = None) -> dict[str, Spot]:
    """A numeric field per sensor value of a `sensors` message (`ENERGY.Power` → `energy_power`);
    a key that makes no field name (`!!!`) is added to `skipped`."""
    if not isinstance(sn, dict):
        raise Malformed("sn is not an object")
    temp_unit = sn.get("TempUnit", "C")
    pressure_unit = sn.get("PressureUnit", "hPa")
    out: dict[str, Spot] = {}
    for sensor, values in sn.items():
        if sensor in UNIT_KEYS:
            continue
        text(sensor, "a sensor name", 64)
        if isinstance(values, dict):
            items = [((sensor, k), k, v) for k, v in values.items()]
        else:
            items = [((sensor,), sensor, values)]
        for path, key, v in items:
            text(key, "a sensor key", 64)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # TotalStartTime, lists of phases…: no single number
            name = sanitise("_".join(path))
            if not name:
                if skipped is not None:
                    skipped.append(".".join(path))
                continue
            unit = UNITS.get(key, "")
            if key in TEMP_KEYS and isinstance(temp_unit, str):
                unit = "°F" if temp_unit.upper() == "F" else "°C"
            elif key in PRESSURE_KEYS and isinstance(pressure_unit, str) and len(pressure_unit) <= 16:
                unit = pressure_unit
            spec = FieldSpec(name, "numeric", unit, None, False, None, None, ".".join(path)[:MAX_TEXT])
            out.setdefault(name, Spot(spec, path, True))
    if len(out) > MAX_FIELDS:
        raise Malformed(f"{len(out)} sensor values, more than {MAX_FIELDS}")
    return out


class TasmotaDriver(Discovering):
    """Tasmota's native discovery: each announcing device a node; relays set through `cmnd`."""

    family = "Tasmota"

    def __init__(self, device: TasmotaDevice, ctx: Any):
        super().__init__(device, ctx)
        self.dp = device.discovery_prefix
        self.configs: dict[str, Any] = {}  # MAC -> config message
        self.sensors: dict[str, Any] = {}  # MAC -> sensors message
        self.bad: set[str] = set()  # MACs whose latest message could not be used: kept as they were
        self._throttle = Throttle()
        self._polls: set[asyncio.Task[None]] = set()

    def routes(self, broker: Broker) -> None:
        broker.route(self, f"{self.dp}/+/config", self._on_discovery)
        broker.route(self, f"{self.dp}/+/sensors", self._on_discovery)

    def bridge_health(self) -> None:
        broker = self.broker
        if broker is None or not broker.connected:
            self.health(Health.OFFLINE, broker.reason if broker is not None else "not running")
        else:
            self.health(Health.OK)

    # ------------------------------------------------------------ discovery

    def _on_discovery(self, sub: str, topic: str, payload: bytes) -> None:
        mac, _, kind = topic[len(self.dp) + 1 :].partition("/")
        if not MAC.fullmatch(mac):
            self.once.warn(f"{self.id}: {topic} skipped: {mac!r} is not a MAC address (12 upper-case hex digits)")
            return
        store = self.configs if kind == "config" else self.sensors
        if not payload:
            if kind == "sensors" and mac in self.configs:
                return  # its fields stay: a device is withdrawn by its config
            store.pop(mac, None)  # Tasmota's way of withdrawing a device (SetOption19, a reset): it goes offline
            self.bad.discard(mac)
            self._sync()
            return
        if mac not in self.configs and mac not in self.sensors and len(self.configs.keys() | self.sensors.keys()) >= MAX_DEVICES:
            self.drop(f"discovery messages of more than {MAX_DEVICES} devices")
            return
        try:
            doc = describe(payload, topic, MAX_MESSAGE)
            if not isinstance(doc, dict):
                raise Malformed(f"{topic} is not an object")
            store[mac] = doc
            self.bad.discard(mac)
        except Malformed as e:
            self.once.warn(f"{self.id}: {e}: skipped, the device stays as it was")
            self.bad.add(mac)
        self._sync()

    def _sync(self) -> None:
        found: dict[str, Device] = {}
        keep = set(self.bad)
        for mac, cfg in self.configs.items():
            try:
                dev = self._device(mac, cfg, self.sensors.get(mac))
            except Malformed as e:
                self.once.warn(f"{self.id}: tasmota device {mac}: {e}: skipped, the device stays as it was")
                keep.add(mac)
                continue
            if dev is not None:
                found[mac] = dev
        by_topic: dict[str, list[str]] = {}
        for mac, dev in found.items():
            by_topic.setdefault(dev.name, []).append(mac)
        for macs in by_topic.values():
            if len(macs) > 1:
                # One of them may be forged: neither is trusted with the topic; both stay as they were.
                names = " and ".join(f"{m} ({found[m].name!r})" for m in sorted(macs))
                self.once.warn(f"{self.id}: tasmota devices {names} claim the same topic: both skipped until one changes it")
                for m in macs:
                    del found[m]
                    keep.add(m)
        self.sync(found, keep)

    def _device(self, mac: str, cfg: dict[str, Any], sensors: Any) -> Device | None:
        t = text(cfg.get("t"), "t", 64)
        title = cfg.get("dn") if isinstance(cfg.get("dn"), str) and cfg["dn"].isprintable() else t
        d = self.device
        # Include and exclude patterns match the topic or the device name.
        if d.include and not (picked(t, d.include, []) or picked(title, d.include, [])):  # type: ignore[attr-defined]
            return None
        if not (picked(t, [], d.exclude) and picked(title, [], d.exclude)):  # type: ignore[attr-defined]
            return None
        cmnd, stat, tele = full_topic(cfg, d.full_topic, d.prefixes)  # type: ignore[attr-defined]
        spots = relays(cfg, cmnd)
        if isinstance(sensors, dict) and "sn" in sensors:
            try:
                skipped: list[str] = []
                for name, spot in sensor_spots(sensors["sn"], skipped).items():
                    spots.setdefault(name, spot)
                for key in skipped:
                    self.once.warn(f"{self.id}: tasmota device {mac}: sensor value {quoted(key)} skipped: its name makes no field name")
            except Malformed as e:
                if mac in self.devices:
                    raise  # a device that was fine stays as it was
                self.once.warn(f"{self.id}: tasmota device {mac}: its sensors skipped: {e}")
        if len(spots) > MAX_FIELDS:
            raise Malformed(f"{len(spots)} fields, more than {MAX_FIELDS}")
        online = text(cfg.get("onln", "Online"), "onln", 32)
        offline = text(cfg.get("ofln", "Offline"), "ofln", 32)
        extra = {"cmnd": cmnd, "stat": stat, "tele": tele, "onln": online, "ofln": offline}
        return Device(mac, t, title[:MAX_TEXT], spots, extra)

    def _adopt(self, dev: Device, old: Device | None) -> None:
        broker = self.broker
        if broker is None:
            return
        topics = (dev.extra["stat"] + "+", dev.extra["tele"] + "+")
        before = (old.extra["stat"] + "+", old.extra["tele"] + "+") if old is not None else ()
        if before != topics:
            for sub in before:
                broker.unroute(self, sub)
            for sub in topics:
                broker.route(self, sub, partial(self._on_device, dev.key))
        if old is None or old.spots != dev.spots:
            self._poll(dev)  # new fields (its sensors message came): their values now

    def _forget(self, dev: Device) -> None:
        super()._forget(dev)
        if self.broker is not None:
            for sub in (dev.extra["stat"] + "+", dev.extra["tele"] + "+"):
                self.broker.unroute(self, sub)

    def _poll(self, dev: Device) -> None:
        """Ask the device for its sensors and relays now, rather than at its next TelePeriod."""
        if self.broker is None or not self.broker.connected:
            return
        asks = [(dev.extra["cmnd"] + "STATUS", "10")] if any(not s.spec.writable for s in dev.spots.values()) else []
        if any(s.spec.writable for s in dev.spots.values()):
            asks.append((dev.extra["cmnd"] + "STATE", ""))
        if asks:
            task = asyncio.get_running_loop().create_task(self._ask(asks), name=f"{self.id}:poll")
            self._polls.add(task)
            task.add_done_callback(self._polls.discard)

    async def _ask(self, asks: list[tuple[str, str]]) -> None:
        for topic, payload in asks:
            if self.broker is None:
                return
            try:
                await self.broker.publish(topic, payload, False)
            except MqttError as e:
                log.info("%s: could not poll %s: %s", self.id, topic, e)

    # ------------------------------------------------------------ device messages

    def _on_device(self, key: str, sub: str, topic: str, payload: bytes) -> None:
        dev = self.devices.get(key)
        if dev is None:
            return
        stat, tele = dev.extra["stat"], dev.extra["tele"]
        word = topic[len(stat) :] if topic.startswith(stat) else topic[len(tele) :] if topic.startswith(tele) else ""
        body = payload.decode("utf-8", "replace").strip()
        if topic == tele + "LWT":
            low = body.lower()
            if low == dev.extra["onln"].lower():
                was, dev.available = dev.available, True
                if was is False:
                    self._poll(dev)
            elif low == dev.extra["ofln"].lower():
                dev.available = False
            else:
                self._throttle.warn(f"lwt:{key}", f"{dev.node_id}: {topic} skipped: expected {dev.extra['onln']!r} or {dev.extra['ofln']!r}, got {quoted(body)}")
                return
            self.refresh(dev)
            return
        if re.fullmatch(r"POWER\d*", word):
            self._relay(dev, word, body)
            return
        if not body.startswith("{"):
            return
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            self._throttle.warn(f"json:{key}", f"{dev.node_id}: {topic} skipped: not JSON; payload {quoted(body)}")
            return
        if not isinstance(doc, dict):
            return
        if word == "STATUS10" and isinstance(doc.get("StatusSNS"), dict):
            doc = doc["StatusSNS"]
        for name, spot in dev.spots.items():
            if spot.command:
                for k in (spot.path[0], "POWER") if spot.path[0] == "POWER1" else spot.path:
                    if k in doc:
                        self._relay(dev, k, doc[k])
                        break
                continue
            raw = dig(doc, spot.path)
            if raw is None:
                continue
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                self._throttle.warn(f"value:{key}:{name}", f"{dev.node_id}.{name}: {topic} gave {quoted(json.dumps(raw))}, not a number: skipped")
                continue
            self.reading(dev, name, float(raw))

    def _relay(self, dev: Device, key: str, raw: Any) -> None:
        """A relay's state (`POWER`, `POWER1` … with ON/OFF or the config's state texts)."""
        n = key[5:] or "1"
        spot = next((s for s in dev.spots.values() if s.command and s.path[0] == f"POWER{n}"), None)
        if spot is None:
            return
        word = str(raw).strip().lower()
        if word == str(spot.on).lower():
            self.reading(dev, spot.spec.name, True)
        elif word == str(spot.off).lower():
            self.reading(dev, spot.spec.name, False)
        else:
            self._throttle.warn(f"relay:{dev.key}:{n}", f"{dev.node_id}.{spot.spec.name}: state {quoted(str(raw))} is neither {spot.on!r} nor {spot.off!r}: skipped")

    def command(self, dev: Device, spot: Spot, value: Value) -> tuple[str, str]:
        return spot.command, str(spot.on if value else spot.off)

    def owns(self, dev: Device, topic: str) -> bool:
        d = self.device
        cmnd = full_topic({"t": dev.name}, d.full_topic, d.prefixes)[0]  # type: ignore[attr-defined]
        return topic.startswith(cmnd) and re.fullmatch(r"POWER\d{1,2}", topic[len(cmnd):]) is not None

    async def stop(self) -> None:
        for task in list(self._polls):
            task.cancel()
        await super().stop()


DRIVER = TasmotaDriver
