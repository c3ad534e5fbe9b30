"""`gpio`: Raspberry Pi pins, an MCP3008 ADC and the Pi's own sensors, through gpiozero.

Every blocking gpiozero call (opening pins, reading files or SPI, setting
outputs, closing) runs on one worker thread per device, so the event loop
never waits on hardware and a close never races a read. Input edges arrive on
gpiozero's own threads and go to the hub with `push`, which is thread-safe.

A field whose pin cannot be opened puts the device in `error`, with the
field and pin named in the reason; the device's other fields keep working.
Polled fields that fail to read are retried every `interval` and the error
clears by itself once they read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib.metadata import entry_points
from typing import Any, TypeVar

from gpiozero import (
    LED,
    MCP3008,
    CPUTemperature,
    Device,
    DigitalInputDevice,
    DiskUsage,
    LineSensor,
    LoadAverage,
    MotionSensor,
    OutputDevice,
    PWMOutputDevice,
    Servo,
)
from gpiozero.pins import Factory
from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

from gateway.hub import Health
from gateway.values import Value

from .base import Context, Driver
from .gpio_config import (
    GPIO_ANALOG_OUT,
    GPIO_INPUTS,
    GPIO_NEEDS_PIN,
    GPIO_POLLED,
    GPIO_SETTABLE,
    GpioDevice,
    GpioField,
)

log = logging.getLogger("iot_gateway.gpio")

T = TypeVar("T")


class GpioError(Exception):
    """A GPIO field cannot be used; the message names the field and, for pins, the pin."""


class GpioDriver(Driver[GpioDevice]):
    """Opens one gpiozero device per field and keeps the hub up to date with them."""

    def __init__(self, device: GpioDevice, ctx: Context):
        super().__init__(device, ctx)
        self.factory: Factory | None = None
        """The pin factory the fields use: the device's own (`pin_factory`) or gpiozero's default."""
        self._own_factory = False
        self._factory_error: str | None = None
        self._clock: Factory | None = None
        self._fields = {f.name: f for f in device.fields}
        self._parts: dict[str, Any] = {}
        self._errors: dict[str, str] = {}
        self._locks = {f.name: threading.Lock() for f in device.fields if f.kind in GPIO_INPUTS}
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._running = False

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open every field, push initial values, set outputs to their start values."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"gpio-{self.id}")
        self._running = True
        await self._call(self._open_pins)
        first: dict[str, float] = {}
        polled = [f for f in self.device.fields if f.kind in GPIO_POLLED]
        for f in polled:
            value = await self._sample(f)
            if value is not None:
                first[f.name] = value
        self._report()
        await self._call(self._push_pins)
        for name, value in first.items():
            self.push(name, value)
        for f in polled:
            self._tasks.append(asyncio.create_task(self._poll(f), name=f"gpio:{self.id}.{f.name}"))

    async def stop(self) -> None:
        """Outputs to their safe values, then release every pin. Idempotent; never raises."""
        self._running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(pool, self._close_all)
        except Exception:
            log.exception("%s: error while releasing pins", self.id)
        finally:
            pool.shutdown(wait=False)

    async def write(self, field: str, value: Value) -> None:
        """Set an output, LED, PWM output or servo, then push the new value."""
        if not self._running or self._pool is None:
            raise GpioError(f"{self.id} is stopped")
        await self._call(self._set, self._fields[field], value)
        self.push(field, value)

    # ------------------------------------------------------------ worker thread

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            raise GpioError(f"{self.id} is stopped")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _open_pins(self) -> None:
        fields = [f for f in self.device.fields if f.kind in GPIO_NEEDS_PIN]
        if not fields and not any(f.kind == "mcp3008" for f in self.device.fields):
            return  # the Pi's own sensors need no pin factory
        try:
            self.factory = self._load_factory()
            self.about = f"GPIO pin factory {factory_name(self.factory)}"
            log.info("%s: %s", self.id, self.about)
        except Exception as e:
            self._factory_error = _reason(e) + access_hint(_reason(e))
            if not fields:
                log.error("%s: %s", self.id, self._factory_error)
                return
            # One reason for all of them: the factory's error can be long.
            names = ", ".join(f.name for f in fields)
            pins = ", ".join(str(f.pin) for f in fields)
            reason = f"{names}: pin{'s' if len(fields) > 1 else ''} {pins} cannot be opened: {self._factory_error}"
            self._errors.update((f.name, reason) for f in fields)
            log.error("%s: %s", self.id, reason)
            return
        for f in fields:
            try:
                self._parts[f.name] = self._open_pin(f, self.factory)
            except Exception as e:
                hint = _mock_pwm_hint(f, self.factory)
                self._errors[f.name] = f"{f.name}: pin {f.pin} cannot be opened: {_reason(e)}{hint or access_hint(_reason(e))}"
                log.error("%s: %s", self.id, self._errors[f.name])

    def _load_factory(self) -> Factory:
        name = self.device.pin_factory
        if name is None:
            # gpiozero picks GPIOZERO_PIN_FACTORY or the first library that loads; its
            # fallbacks arrive as warnings, which make the error worth reading.
            with warnings.catch_warnings(record=True) as tried:
                warnings.simplefilter("always")
                try:
                    Device.ensure_pin_factory()
                except Exception as e:
                    detail = "; ".join(str(w.message) for w in tried)
                    raise GpioError(
                        f"no pin factory could be loaded ({_reason(e)}"
                        + (f" {detail}" if detail else "")
                        + "); set GPIOZERO_PIN_FACTORY or pin_factory"
                    ) from e
            return Device.pin_factory
        self._own_factory = True
        if name == "mock":
            pwm = any(f.kind in GPIO_ANALOG_OUT for f in self.device.fields)
            return MockFactory(pin_class=MockPWMPin if pwm else MockPin)
        for ep in entry_points(group="gpiozero_pin_factories"):
            if ep.name == name:
                try:
                    return ep.load()()
                except Exception as e:
                    raise GpioError(f"pin factory {name!r} cannot be loaded: {_reason(e)}") from e
        raise GpioError(f"pin factory {name!r} is not installed")

    def _open_pin(self, f: GpioField, factory: Factory) -> Any:
        kind = f.kind
        if kind in ("button", "digital_input"):
            # gpiozero's Button is this plus a hold timer we do not use, whose thread
            # makes closing a pressed button wait up to hold_time (1 s) on shutdown.
            dev = DigitalInputDevice(
                f.pin,
                pull_up=f.pull,
                active_state=f.active_state,
                bounce_time=f.bounce_time,
                pin_factory=factory,
            )
        elif kind in ("motion_sensor", "line_sensor"):
            cls = MotionSensor if kind == "motion_sensor" else LineSensor
            dev = cls(f.pin, pull_up=f.pull, active_state=f.active_state, pin_factory=factory)
        elif kind in ("output", "led"):
            cls = OutputDevice if kind == "output" else LED
            return cls(f.pin, active_high=f.active_high, initial_value=f.start_value, pin_factory=factory)
        elif kind == "pwm_output":
            return PWMOutputDevice(
                f.pin,
                active_high=f.active_high,
                initial_value=f.start_value,
                frequency=f.frequency,
                pin_factory=factory,
            )
        elif kind == "servo":
            return Servo(
                f.pin,
                initial_value=f.start_value,
                min_pulse_width=f.min_pulse_width,
                max_pulse_width=f.max_pulse_width,
                pin_factory=factory,
            )
        else:  # pragma: no cover - the config only lets pin kinds through
            raise GpioError(f"{f.name}: kind {kind!r} has no pin")
        # A line sensor is "active" when it sees no line; report line_detected instead.
        active = kind != "line_sensor"
        dev.when_activated = partial(self._edge, f.name, active)
        dev.when_deactivated = partial(self._edge, f.name, not active)
        return dev

    def _edge(self, name: str, value: bool) -> None:
        # gpiozero's thread (or whoever drove a mock pin).
        with self._locks[name]:
            self.push(name, value)

    def _push_pins(self) -> None:
        for name, dev in self._parts.items():
            f = self._fields[name]
            if f.kind in GPIO_INPUTS:
                # Under the lock, so that an edge seen meanwhile is pushed after this value.
                with self._locks[name]:
                    value = dev.line_detected if f.kind == "line_sensor" else dev.is_active
                    self.push(name, bool(value))
            elif f.kind in GPIO_SETTABLE:
                self.push(name, f.start_value)

    def _read(self, f: GpioField) -> float:
        dev = self._parts.get(f.name)
        if dev is None:
            dev = self._parts[f.name] = self._open_polled(f)
        if f.kind == "mcp3008":
            return float(dev.value) * f.scale
        if f.kind == "cpu_temperature":
            return float(dev.temperature)
        if f.kind == "load_average":
            return float(dev.load_average)
        return float(dev.usage)

    def _open_polled(self, f: GpioField) -> Any:
        if f.kind == "mcp3008":
            if self.factory is None:
                raise GpioError(self._factory_error or "no pin factory")
            return MCP3008(channel=f.channel, port=0, device=f.spi_device, pin_factory=self.factory)
        # The Pi's own sensors use a pin factory only as a clock; without a usable
        # one (not a Pi) gpiozero's mock factory serves, so they work on any Linux.
        clock = self.factory or self._clock or MockFactory()
        if self.factory is None:
            self._clock = clock
        if f.kind == "cpu_temperature":
            return CPUTemperature(sensor_file=f.source, pin_factory=clock)
        if f.kind == "load_average":
            return LoadAverage(load_average_file=f.source, minutes=f.minutes, pin_factory=clock)
        return DiskUsage(filesystem=f.source, pin_factory=clock)

    def _set(self, f: GpioField, value: Value) -> None:
        dev = self._parts.get(f.name)
        if dev is None:
            raise GpioError(self._errors.get(f.name, f"{f.name} is not open"))
        dev.value = value

    def _close_all(self) -> None:
        for name, dev in list(self._parts.items()):
            f = self._fields[name]
            if f.kind in GPIO_SETTABLE:
                try:
                    dev.value = f.safe
                    self.push(name, f.safe)
                except Exception:
                    log.exception("%s: cannot set %s to its safe value", self.id, name)
            try:
                dev.close()
            except Exception:
                log.exception("%s: error closing %s", self.id, name)
        self._parts.clear()
        for factory, own in ((self.factory, self._own_factory), (self._clock, True)):
            if factory is not None and own:
                try:
                    factory.close()
                except Exception:
                    log.exception("%s: error closing the pin factory", self.id)
        self.factory = self._clock = None
        self._own_factory = False

    # ------------------------------------------------------------ polling and health

    async def _poll(self, f: GpioField) -> None:
        while True:
            await asyncio.sleep(f.interval)
            value = await self._sample(f)
            if value is not None:
                self.push(f.name, value)
            self._report()

    async def _sample(self, f: GpioField) -> float | None:
        """Read a polled field on the worker thread; record or clear its error."""
        try:
            value = await self._call(self._read, f)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = f"{f.name}: cannot read {_source(f)}: {_reason(e)}"
            if self._errors.get(f.name) != reason:
                log.warning("%s: %s", self.id, reason)
            self._errors[f.name] = reason
            return None
        if self._errors.pop(f.name, None) is not None:
            log.info("%s: %s reads again", self.id, f.name)
        return value

    def _report(self) -> None:
        reasons = list(dict.fromkeys(self._errors.values()))
        if reasons:
            self.health(Health.ERROR, "; ".join(reasons))
        else:
            self.health(Health.OK)


def _source(f: GpioField) -> str:
    if f.kind == "mcp3008":
        return f"MCP3008 channel {f.channel} on SPI 0.{f.spi_device}"
    return f.source


def _reason(e: BaseException) -> str:
    """An exception as a short sentence: OSError's strerror, else its message or type."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def access_hint(reason: str) -> str:
    """What to do when a pin library cannot open the GPIO chip (lgpio says "can not open
    gpiochip"; others "Permission denied" on /dev/gpiochip* or /dev/gpiomem): "" for other errors."""
    low = reason.lower()
    if "gpiochip" not in low and "gpiomem" not in low and "permission denied" not in low:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    return (
        f" (check that /dev/gpiochip0 exists and that user {user} may open it: "
        f"`ls -l /dev/gpiochip*`, `sudo usermod -aG gpio {user}`, then restart the service)"
    )


def factory_name(factory: Factory) -> str:
    """A pin factory as `pin_factory` and GPIOZERO_PIN_FACTORY name it: lgpio, rpigpio, pigpio, native, mock."""
    return type(factory).__name__.removesuffix("Factory").lower()


def _mock_pwm_hint(f: GpioField, factory: Factory) -> str:
    if f.kind in GPIO_ANALOG_OUT and isinstance(factory, MockFactory) and not issubclass(
        factory.pin_class, MockPWMPin
    ):
        return " (the mock pin factory needs GPIOZERO_MOCK_PIN_CLASS=mockpwmpin for PWM)"
    return ""


DRIVER = GpioDriver
