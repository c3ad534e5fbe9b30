"""`simulated`: made-up readings for demos and tests.

Numeric fields follow a sine wave plus noise; writable fields echo back what
was set, as a relay with feedback would.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Literal

from pydantic import Field, field_validator

from gateway.configbase import DeviceBase, FieldBase, finite, unique_names
from gateway.hub import Health
from gateway.values import Value

from .base import Driver

class SimulatedField(FieldBase):
    """A field of the `simulated` driver: a wave plus noise, or an echoed writable value."""

    base: float = 20.0
    amplitude: float = 5.0
    period: float = Field(300.0, gt=0)
    noise: float = Field(0.2, ge=0)
    initial: bool | float | int | str | None = None

    _initial = field_validator("initial", mode="before")(finite)


class SimulatedDevice(DeviceBase):
    """`driver = "simulated"`: made-up readings, for demos and tests."""

    driver: Literal["simulated"]
    interval: float = Field(2.0, gt=0, le=3600)
    fields: list[SimulatedField] = Field(min_length=1)

    _unique = field_validator("fields")(unique_names)


DEFAULTS: dict[str, Value] = {"boolean": False, "integer": 0, "numeric": 0.0, "string": ""}


class SimulatedDriver(Driver[SimulatedDevice]):
    """Pushes every non-writable field each `interval`; echoes writes."""

    def __init__(self, device: SimulatedDevice, ctx):
        super().__init__(device, ctx)
        self._started = False
        self._rng = random.Random(device.id)
        self._fields = {f.name: f for f in device.fields}

    async def start(self) -> None:
        now = time.time()  # one timestamp for the whole first read-out
        for f in self.device.fields:
            if f.writable:
                self.push(f.name, f.initial if f.initial is not None else DEFAULTS[f.type], now)
        self._sample(now)
        self.health(Health.OK)
        self._started = True
        self.spawn(self._run(), "sample")

    async def stop(self) -> None:
        await self.cancel_tasks()

    async def write(self, field: str, value: Value) -> None:
        self.push(field, value)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.device.interval)
            self._sample()

    def _sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for f in self.device.fields:
            if not f.writable:
                self.push(f.name, self._value(f, now), now)

    def _value(self, f: SimulatedField, now: float) -> Value:
        wave = f.base + f.amplitude * math.sin(2 * math.pi * now / f.period)
        wave += self._rng.gauss(0, f.noise) if f.noise else 0.0
        if f.type == "boolean":
            return wave > f.base
        if f.type == "integer":
            return round(wave)
        if f.type == "string":
            return "high" if wave > f.base else "low"
        return round(wave, f.decimals if f.decimals is not None else 2)


DRIVER = SimulatedDriver
CONFIG = SimulatedDevice
