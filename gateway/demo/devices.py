"""Simulated real devices for `make demo`: a Tasmota-style smart plug on the
MQTT broker, and a DS18B20 thermometer as the kernel's 1-Wire folder.

Neither goes through the gateway's drivers: the plug is another MQTT client, as
a plug on the network would be, and the thermometer is files laid out as the
kernel lays them out under /sys/bus/w1/devices. The gateway reads them with its
ordinary `mqtt` and `kernel` drivers.

The plug runs by itself (paho's network thread answers commands, a thread of
its own sends telemetry); the thermometer changes on `tick(now)` from the
demo's main loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger("iot_gateway.demo")

# What Tasmota accepts on cmnd/<topic>/POWER (any case); an empty payload asks for the state.
ON_WORDS = ("on", "1", "true")
OFF_WORDS = ("off", "0", "false")
TOGGLE_WORDS = ("toggle", "2")


class DemoDeviceError(RuntimeError):
    """A simulated device could not start; the message says why."""


@dataclass
class Energy:
    """The plug's meter: what Tasmota reports under ENERGY in tele/<topic>/SENSOR."""

    power: float = 0.0  # W
    voltage: float = 230.0  # V
    total: float = 0.0  # kWh since the plug was set up
    today: float = 0.0  # kWh


class Plug:
    """A Tasmota-style smart plug with a relay and a power meter, as an MQTT client.

    Like Tasmota it publishes `tele/<topic>/LWT` (Online, and Offline as its
    will), `tele/<topic>/SENSOR` every `interval` seconds with ENERGY.Power,
    Voltage, Current, Today and Total, and answers `cmnd/<topic>/POWER` (ON,
    OFF, TOGGLE, 1, 0, 2; empty asks) with `stat/<topic>/POWER` and
    `stat/<topic>/RESULT`. The state on stat/ is retained (Tasmota's
    `PowerRetain 1`), so a gateway started later knows it at once; a SENSOR
    report also follows each switch, so the power shows without waiting.

    State and LWT go out at QoS 0: a gateway coming back gets the retained
    current state, not a replay of every change it missed (the Offline of the
    demo's last stop would raise an alert at each start). SENSOR reports go at
    QoS 1, so a gateway's persistent session keeps the ones it missed.
    """

    def __init__(
        self,
        host: str,
        port: int,
        topic: str = "plug",
        interval: float = 10.0,
        load: float = 42.0,
        password: str | None = None,
    ):
        """With `password`, the plug logs in as user `topic` (as a Tasmota device does in the broker's ACL)."""
        self.host, self.port, self.topic = host, port, topic
        self.interval = interval
        self.load = load  # watts drawn while the relay is on
        self.energy = Energy()
        self._on = False
        self._lock = threading.Lock()
        self._rng = random.Random(topic)
        self._metered = time.monotonic()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"demo-{topic}-{uuid.uuid4().hex[:6]}"
        )
        if password is not None:
            self.client.username_pw_set(topic, password)
        self.client.will_set(self._t("tele", "LWT"), "Offline", qos=0, retain=True)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    @property
    def on(self) -> bool:
        """Whether the relay is on."""
        with self._lock:
            return self._on

    def _t(self, prefix: str, name: str) -> str:
        return f"{prefix}/{self.topic}/{name}"

    def start(self, timeout: float = 5.0) -> None:
        """Connect to the broker (raise DemoDeviceError if it does not answer) and report."""
        try:
            self.client.connect(self.host, self.port, keepalive=30)
        except OSError as e:
            raise DemoDeviceError(f"the demo plug cannot reach the broker at {self.host}:{self.port}: {e}") from None
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise DemoDeviceError(f"the broker at {self.host}:{self.port} did not accept the demo plug")
        self._ticker = threading.Thread(target=self._run, name=f"demo-plug-{self.topic}", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        """Say Offline, as Tasmota's will would, and disconnect."""
        self._stopping.set()
        if self._ticker is not None:
            self._ticker.join(5)
        if self.client.is_connected():
            try:
                self.client.publish(self._t("tele", "LWT"), "Offline", qos=0, retain=True).wait_for_publish(2)
            except (RuntimeError, ValueError):  # the connection dropped meanwhile: the will says it
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            self._telemetry()

    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("demo plug: the broker refused the connection: %s", reason)
            return
        client.subscribe(self._t("cmnd", "POWER"), qos=1)
        client.publish(self._t("tele", "LWT"), "Online", qos=0, retain=True)
        self._report()
        self._telemetry()
        self._connected.set()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        word = msg.payload.decode("utf-8", "replace").strip().lower()
        with self._lock:
            before = self._on
            if word in ON_WORDS:
                self._meter()
                self._on = True
            elif word in OFF_WORDS:
                self._meter()
                self._on = False
            elif word in TOGGLE_WORDS:
                self._meter()
                self._on = not self._on
            elif word:
                log.warning("demo plug: %s %r is not ON, OFF or TOGGLE; the relay stays as it is", msg.topic, word)
            changed = self._on != before
        self._report()
        if changed:
            self._telemetry()

    def _report(self) -> None:
        state = "ON" if self.on else "OFF"
        self.client.publish(self._t("stat", "RESULT"), json.dumps({"POWER": state}), qos=0)
        self.client.publish(self._t("stat", "POWER"), state, qos=0, retain=True)

    def _meter(self) -> None:
        """Bring the meter up to now (call with the lock held)."""
        now = time.monotonic()
        kwh = self.energy.power * (now - self._metered) / 3_600_000
        self.energy.total += kwh
        self.energy.today += kwh
        self._metered = now
        self.energy.voltage = round(230 + self._rng.gauss(0, 1.2), 1)
        self.energy.power = round(self.load + self._rng.gauss(0, 0.8), 1) if self._on else 0.0

    def _telemetry(self) -> None:
        with self._lock:
            self._meter()
            e = self.energy
            current = e.power / e.voltage if e.voltage else 0.0
            payload = {
                "Time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "ENERGY": {
                    "Total": round(e.total, 3),
                    "Today": round(e.today, 3),
                    "Power": e.power,
                    "Voltage": round(e.voltage),
                    "Current": round(current, 3),
                    "Factor": 0.98 if e.power else 0.0,
                },
            }
        self.client.publish(self._t("tele", "SENSOR"), json.dumps(payload), qos=1)


class Thermometer:
    """A DS18B20 as the kernel's w1_therm driver shows it: `<root>/28-…/temperature`
    (milli-°C) and `w1_slave` (the CRC line, then `t=`), next to `w1_bus_master1`.

    The temperature follows a slow wave plus a little noise, in the sensor's
    1/16 °C steps, and changes every `interval` seconds. Files are replaced
    atomically, so a reader never sees half a number.
    """

    SENSOR_ID = "28-0316a2795cff"

    def __init__(self, root: Path, interval: float = 5.0, base: float = 18.0, amplitude: float = 3.0, period: float = 900.0):
        self.root = Path(root)
        self.interval = interval
        self.base, self.amplitude, self.period = base, amplitude, period
        self.celsius = base
        self._rng = random.Random(self.SENSOR_ID)
        self._due = 0.0

    @property
    def folder(self) -> Path:
        """The sensor's own folder, `<root>/28-…`."""
        return self.root / self.SENSOR_ID

    def lay_out(self) -> None:
        """Create the folders and a first reading."""
        (self.root / "w1_bus_master1").mkdir(parents=True, exist_ok=True)
        self.folder.mkdir(exist_ok=True)
        (self.folder / "name").write_text(self.SENSOR_ID + "\n")
        self.write(self._wave(time.time()))

    def tick(self, now: float) -> None:
        """Write a new reading when `interval` has passed since the last (`now` in seconds)."""
        if now >= self._due:
            self._due = now + self.interval
            self.write(self._wave(now))

    def write(self, celsius: float) -> None:
        """Write this temperature (rounded to 1/16 °C) into `temperature` and `w1_slave`."""
        raw = round(celsius * 16)  # the sensor's 12-bit register
        milli = raw * 1000 // 16  # as the kernel's w1_therm converts it
        self.celsius = milli / 1000
        lsb, msb = raw & 0xFF, (raw >> 8) & 0xFF
        scratch = f"{lsb:02x} {msb:02x} 4b 46 7f ff 0c 10 1c"
        self._replace("w1_slave", f"{scratch} : crc=1c YES\n{scratch} t={milli}\n")
        self._replace("temperature", f"{milli}\n")

    def _wave(self, now: float) -> float:
        return self.base + self.amplitude * math.sin(2 * math.pi * now / self.period) + self._rng.gauss(0, 0.05)

    def _replace(self, name: str, text: str) -> None:
        tmp = self.folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.folder / name)
