"""`kernel`: sensors the Linux kernel already drives, read from their files.

Raspberry Pi OS drives a DS18B20 (1-Wire), a DHT11/DHT22 or BME280 (IIO) and
an SHT3x (hwmon) once a device-tree overlay is enabled, and publishes each
reading as a file under /sys. Reading those files needs no hardware library
and no timing code of ours. A read can block (about 750 ms for a DS18B20), so
every read runs in a worker thread, all sensors of a device at once.

A sensor is named in the config as

- `w1:28-0316a2795cff`: the temperature of a 1-Wire thermometer;
- `iio:<name>:<channel>`: `in_<channel>_input` of the IIO device whose
  `name` file says `<name>` (or whose folder is `<name>`, e.g. `iio:device0`);
- `hwmon:<name>:<channel>`: `<channel>_input` of the hwmon chip `<name>`;

or by `path` to any file holding one number, with a `scale`. With
`sensors = "auto"`, every thermometer, IIO device and hwmon chip found with a
known reading becomes a field.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import grp
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import DeviceBase, FieldBase, unique_names
from gateway.hub import Health

from .base import Driver

log = logging.getLogger("iot_gateway.devices.kernel")

W1_ROOT = Path("/sys/bus/w1/devices")
IIO_ROOT = Path("/sys/bus/iio/devices")
HWMON_ROOT = Path("/sys/class/hwmon")

# 1-Wire family codes of thermometers the kernel's w1_therm driver serves.
W1_THERMOMETERS = ("10-", "22-", "28-", "3b-", "42-")
# A DS18B20 answers 85 °C before its first conversion: not a reading.
W1_POWER_ON = 85.0

SENSOR = re.compile(r"(w1):([0-9a-f]{2}-[0-9a-f]{12})|(iio|hwmon):([^:/\s]+):([a-z0-9_]+)")


@dataclass(frozen=True)
class Kind:
    """How to turn one kind of kernel file into a reading: scale, unit, decimals."""

    scale: float
    unit: str
    decimals: int


# IIO channels (Documentation/ABI/testing/sysfs-bus-iio): `in_<channel>_input`.
IIO_KINDS = {
    "temp": Kind(0.001, "°C", 1),  # milli-degrees Celsius
    "humidityrelative": Kind(0.001, "%", 1),  # milli-percent
    "pressure": Kind(10.0, "hPa", 1),  # the kernel says kPa; hPa is what weather uses
    "illuminance": Kind(1.0, "lx", 1),
}
# hwmon channels (Documentation/hwmon/sysfs-interface.rst): `<type><n>_input`.
HWMON_KINDS = {
    "temp": Kind(0.001, "°C", 1),  # milli-degrees Celsius
    "humidity": Kind(0.001, "%", 1),  # milli-percent
    "in": Kind(0.001, "V", 3),  # millivolts
    "curr": Kind(0.001, "A", 3),  # milliamperes
    "power": Kind(0.000001, "W", 2),  # microwatts
    "fan": Kind(1.0, "rpm", 0),
}
W1_KIND = Kind(0.001, "°C", 2)  # milli-degrees Celsius; a DS18B20 resolves 1/16 °C


# ---------------------------------------------------------------- config


class KernelField(FieldBase):
    """A field of a `kernel` device: a `sensor` id, or the `path` of a file holding a number."""

    sensor: str | None = None
    path: Path | None = None
    scale: float | None = None

    @field_validator("sensor")
    @classmethod
    def _sensor(cls, v: str | None) -> str | None:
        if v is not None and not SENSOR.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a sensor id: use w1:28-xxxxxxxxxxxx, iio:<name>:<channel> "
                "(e.g. iio:dht11:temp) or hwmon:<name>:<channel> (e.g. hwmon:sht3x:humidity1)"
            )
        return v

    @field_validator("scale")
    @classmethod
    def _scale(cls, v: float | None) -> float | None:
        if v == 0:
            raise ValueError("must not be 0")
        return v

    @model_validator(mode="after")
    def _source(self) -> "KernelField":
        if (self.sensor is None) == (self.path is None):
            raise ValueError("give exactly one of `sensor` and `path`")
        if self.writable:
            raise ValueError("kernel sensors are read-only: remove `writable`")
        if self.type not in ("numeric", "integer"):
            raise ValueError("kernel sensors are numeric: use type = \"numeric\" or \"integer\"")
        if self.sensor is not None:
            kind = _kind(self.sensor)
            if kind is None:
                raise ValueError(f"{self.sensor!r}: unknown channel (known: {_known_channels()})")
            # The kernel documents each channel's unit: a field says it unless told otherwise.
            self.unit = self.unit or kind.unit
            self.decimals = kind.decimals if self.decimals is None else self.decimals
        return self


class KernelDevice(DeviceBase):
    """`driver = "kernel"`: 1-Wire, IIO and hwmon sensors read from their files under /sys."""

    driver: Literal["kernel"]
    interval: float = Field(10.0, ge=1, le=86_400)
    sensors: Literal["auto"] | None = None
    names: dict[str, str] = {}
    retries: int = Field(3, ge=1, le=10)
    # Reads in a row a sensor that failed now and then must read well before the device is ok again.
    health_window: int = Field(3, ge=1, le=100)
    w1_root: Path = W1_ROOT
    iio_root: Path = IIO_ROOT
    hwmon_root: Path = HWMON_ROOT
    fields: list[KernelField] = []

    _unique = field_validator("fields")(unique_names)

    @field_validator("names")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v.values():
            if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
                raise ValueError(f"{name!r} is not a field name (letters, digits, _ and -)")
        return v

    @model_validator(mode="after")
    def _discover(self) -> "KernelDevice":
        if self.sensors == "auto":
            have = {f.sensor for f in self.fields}
            for name, sensor in discover(self.w1_root, self.iio_root, self.hwmon_root):
                if sensor in have:
                    continue
                name = self.names.get(name, self.names.get(sensor, name))
                self.fields.append(KernelField(name=name, sensor=sensor))
            unique_names(self.fields)
        if not self.fields:
            where = f"{self.w1_root}, {self.iio_root} or {self.hwmon_root}"
            raise ValueError(
                f'no sensor found under {where}: is the overlay enabled? (docs/kernel-sensors.md)'
                if self.sensors == "auto"
                else 'give `fields`, or `sensors = "auto"` to find them'
            )
        return self


def _kind(sensor: str) -> Kind | None:
    """The scale, unit and decimals of a sensor id's readings, or None if unknown."""
    if sensor.startswith("w1:"):
        return W1_KIND
    bus, _, channel = sensor.split(":")
    if bus == "iio":
        return IIO_KINDS.get(channel)
    kind = re.fullmatch(r"([a-z]+)\d*", channel)
    return HWMON_KINDS.get(kind.group(1)) if kind else None


def _known_channels() -> str:
    return "iio: " + ", ".join(IIO_KINDS) + "; hwmon: " + ", ".join(f"{k}N" for k in HWMON_KINDS)


def discover(w1_root: Path, iio_root: Path, hwmon_root: Path) -> list[tuple[str, str]]:
    """Every known reading under the three roots, as (field name, sensor id), sorted."""
    found: list[tuple[str, str]] = []
    for d in _listdir(w1_root):
        if d.startswith(W1_THERMOMETERS):
            found.append((d, f"w1:{d}"))
    for bus, root, pattern in (
        ("iio", iio_root, re.compile(r"in_([a-z]+)_input")),
        ("hwmon", hwmon_root, re.compile(r"([a-z]+\d*)_input")),
    ):
        seen: dict[str, int] = {}
        for d in _listdir(root):
            chip = _chip_name(root / d) or d
            seen[chip] = seen.get(chip, 0) + 1
            prefix = chip if seen[chip] == 1 else f"{chip}_{seen[chip]}"
            for fname in _listdir(root / d):
                m = pattern.fullmatch(fname)
                if m and _kind(f"{bus}:{chip}:{m.group(1)}") is not None:
                    label = re.sub(r"[^A-Za-z0-9_-]", "_", f"{prefix}_{m.group(1)}")
                    found.append((label, f"{bus}:{d if seen[chip] > 1 else chip}:{m.group(1)}"))
    return found


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _chip_name(folder: Path) -> str | None:
    try:
        return (folder / "name").read_text().strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------- reading


class SensorError(Exception):
    """A read that gave no reading; `health` says how the device should look."""

    def __init__(self, health: Health, reason: str, retry: bool):
        super().__init__(reason)
        self.health = health
        self.retry = retry


def resolve(sensor: str, w1_root: Path, iio_root: Path, hwmon_root: Path) -> Path:
    """The file that holds a sensor's reading now (IIO and hwmon numbers can change at boot)."""
    m = SENSOR.fullmatch(sensor)
    assert m is not None
    if m.group(1):
        folder = w1_root / m.group(2)
        if not folder.is_dir():
            raise SensorError(Health.OFFLINE, f"{m.group(2)} is gone (no {folder})", retry=False)
        temp = folder / "temperature"
        return temp if temp.exists() else folder / "w1_slave"
    bus, name, channel = m.group(3), m.group(4), m.group(5)
    root = iio_root if bus == "iio" else hwmon_root
    fname = f"in_{channel}_input" if bus == "iio" else f"{channel}_input"
    for d in _listdir(root):
        if d == name or _chip_name(root / d) == name:
            return root / d / fname
    raise SensorError(Health.OFFLINE, f"{bus} device {name!r} is gone (not in {root})", retry=False)


def read_file(path: Path, scale: float) -> float:
    """One reading from a kernel file, scaled; SensorError says why there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SensorError(Health.OFFLINE, f"{path} is gone", retry=False) from None
    except PermissionError:
        raise SensorError(Health.ERROR, _permission(path), retry=False) from None
    except OSError as e:
        # EIO and ETIMEDOUT are what a DHT or a noisy 1-Wire bus give now and then.
        transient = e.errno in (errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.ENODATA)
        reason = f"reading {path.name} failed: {os.strerror(e.errno) if e.errno else e}"
        raise SensorError(Health.STALE if transient else Health.ERROR, reason, retry=transient) from None
    if path.name == "w1_slave":
        return _w1_slave(text, path) * scale
    try:
        return float(text.strip()) * scale
    except ValueError:
        raise SensorError(Health.ERROR, f"{path} holds {text.strip()[:40]!r}, not a number", retry=True) from None


def _w1_slave(text: str, path: Path) -> float:
    """The milli-°C of a `w1_slave` file: a CRC line ending YES or NO, then `t=<milli-°C>`."""
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].rstrip().endswith(("YES", "NO")):
        raise SensorError(Health.STALE, f"{path} is not in w1_slave format", retry=True)
    if not lines[0].rstrip().endswith("YES"):
        raise SensorError(Health.STALE, "CRC check failed (noisy 1-Wire bus?)", retry=True)
    m = re.search(r"t=(-?\d+)", lines[1])
    if m is None:
        raise SensorError(Health.STALE, f"{path} has no t= value", retry=True)
    return float(m.group(1))


def _permission(path: Path) -> str:
    try:
        group = grp.getgrgid(path.stat().st_gid).gr_name
        hint = f"; add the gateway's user to group {group!r}"
    except (OSError, KeyError):
        hint = ""
    return f"cannot read {path}: permission denied{hint}"


# ---------------------------------------------------------------- driver


class KernelDriver(Driver[KernelDevice]):
    """Reads every field's file each `interval`, all of them at once in worker threads."""

    def __init__(self, device: KernelDevice, ctx: Any):
        super().__init__(device, ctx)
        self._last: dict[str, float] = {}
        # Our own threads: a read stuck in the kernel must not take the loop's shared executor.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(8, len(device.fields)), thread_name_prefix=f"kernel-{device.id}"
        )
        self._pending: dict[str, tuple[asyncio.Future[float], float]] = {}
        # Sensors counted as failing: field name -> (the error, good reads in a row since).
        self._bad: dict[str, tuple[SensorError, int]] = {}

    async def start(self) -> None:
        self.spawn(self._run(), "poll")

    async def stop(self) -> None:
        await self.cancel_tasks()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await self.poll()
            await asyncio.sleep(max(0.0, self.device.interval - (loop.time() - started)))

    async def poll(self) -> None:
        """Read every field once (with retries) and report the device's health: the worst of its
        sensors, where one that failed a transient read counts as failing until it has read well
        `health_window` times in a row (a DS18B20 failing its CRC every other read keeps the
        device stale, named in the reason, instead of flipping it ok/stale at each read)."""
        results = await asyncio.gather(*(self._read(f) for f in self.device.fields))
        for f, error in zip(self.device.fields, results):
            bad = self._bad.get(f.name)
            if error is not None:
                # The episode keeps its first reason unless it gets worse: the same trouble is not news.
                if bad is None or _RANK[error.health] > _RANK[bad[0].health]:
                    bad = (error, 0)
                self._bad[f.name] = (bad[0], 0)
            elif bad is not None:
                good = bad[1] + 1
                if not bad[0].retry or good >= self.device.health_window:
                    del self._bad[f.name]  # a definite state (gone, forbidden) ends at once
                    log.info("%s.%s: reading well again", self.id, f.name)
                else:
                    self._bad[f.name] = (bad[0], good)
        failures = [e for e, _good in self._bad.values()]
        if not failures:
            self.health(Health.OK)
            return
        worst = max(failures, key=lambda e: _RANK[e.health])
        reasons = "; ".join(str(e) for e in failures)
        self.health(worst.health, reasons)

    async def _read(self, f: KernelField) -> SensorError | None:
        """Read one field, retrying transient errors within the interval; the error if all failed."""
        loop = asyncio.get_running_loop()
        pause = min(2.0, self.device.interval / (self.device.retries + 1))
        error: SensorError | None = None
        for attempt in range(self.device.retries):
            if attempt:
                await asyncio.sleep(pause)
            hung = self._pending.get(f.name)
            if hung is not None and not hung[0].done():
                since = loop.time() - hung[1]
                return SensorError(Health.STALE, f"{f.name}: a read has hung for {since:.0f} s", retry=True)
            future = loop.run_in_executor(self._pool, self._read_once, f)
            future.add_done_callback(_retrieve)  # a read finishing after stop() logs nothing
            self._pending[f.name] = (future, loop.time())
            try:
                value = await asyncio.shield(future)
            except SensorError as e:
                error = e
                if not e.retry:
                    break
                continue
            self._last[f.name] = value
            self.push(f.name, round(value) if f.type == "integer" else value, time.time())
            return None
        assert error is not None
        label = f.sensor or str(f.path)
        if error.retry:
            tries = f"{self.device.retries} {'try' if self.device.retries == 1 else 'tries'}"
            error = SensorError(error.health, f"{f.name} ({label}): {error} ({tries})", retry=True)
        else:
            error = SensorError(error.health, f"{f.name}: {error}", retry=False)
        return error

    def _read_once(self, f: KernelField) -> float:
        d = self.device
        if f.path is not None:
            return read_file(f.path, f.scale if f.scale is not None else 1.0)
        assert f.sensor is not None
        kind = _kind(f.sensor)
        assert kind is not None
        path = resolve(f.sensor, d.w1_root, d.iio_root, d.hwmon_root)
        value = read_file(path, f.scale if f.scale is not None else kind.scale)
        if f.sensor.startswith("w1:") and value == W1_POWER_ON:
            last = self._last.get(f.name)
            if last is None or abs(last - W1_POWER_ON) > 5:
                raise SensorError(Health.STALE, "85 °C power-on value, not a reading", retry=True)
        return value


def _retrieve(future: asyncio.Future[float]) -> None:
    if not future.cancelled():
        future.exception()


_RANK = {Health.OK: 0, Health.STARTING: 0, Health.STALE: 1, Health.ERROR: 2, Health.OFFLINE: 3}

DRIVER = KernelDriver
CONFIG = KernelDevice
