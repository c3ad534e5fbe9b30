"""The gpio driver on gpiozero's MockFactory: inputs, outputs, PWM, servo, MCP3008,
the Pi's own sensors, pin errors, and a contact driving it all over real XMPP.

Tests reach the pins through the same factory the driver uses: with
GPIOZERO_PIN_FACTORY=mock the driver takes gpiozero's default
`Device.pin_factory`, which the `pins` fixture creates fresh for each test and
resets afterwards. A device with its own `pin_factory = "mock"` has its factory
at `gateway.drivers[id].factory`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device, OutputDevice
from gpiozero.pins.mock import MockFactory, MockPWMPin, MockSPIDevice

from devices import gpio as gpio_driver
from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import ConfigError, load, parse
from gateway.hub import DeviceError, Health, Hub
from gateway.values import BadValue
from gateway.xmpp.session import Session
from tests.conftest import XmppServer, gateway_config
from tests.contract import Contract, driver_contract

OLIVE = Actor("olive@localhost", "operator", "test")
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- fixtures and helpers


def _mock_default(monkeypatch: pytest.MonkeyPatch, pin_class: str) -> Iterator[MockFactory]:
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    monkeypatch.setenv("GPIOZERO_MOCK_PIN_CLASS", pin_class)
    Device.pin_factory = None
    Device.ensure_pin_factory()
    factory = Device.pin_factory
    assert isinstance(factory, MockFactory)
    yield factory
    factory.reset()
    Device.pin_factory = None


@pytest.fixture
def pins(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockFactory]:
    """gpiozero's default pin factory: a fresh MockFactory with PWM-capable pins."""
    yield from _mock_default(monkeypatch, "mockpwmpin")


@pytest.fixture
def plain_pins(monkeypatch: pytest.MonkeyPatch) -> Iterator[MockFactory]:
    """A MockFactory with plain pins, as gpiozero's mock SPI slave needs."""
    yield from _mock_default(monkeypatch, "mockpin")


def gpio(dev_id: str, *fields: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A gpio device entry for a config."""
    return {"id": dev_id, "driver": "gpio", "fields": list(fields), **extra}


@asynccontextmanager
async def running(tmp_path: Path, *devices: dict[str, Any]) -> AsyncIterator[Gateway]:
    """A started gateway (no XMPP) with these devices; stopped on exit."""
    config = parse({"gateway": {"state_dir": str(tmp_path / "state")}, "devices": list(devices)})
    gw = Gateway(config)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


def value(hub: Hub, ref: str) -> Any:
    """The latest value of a field, or None."""
    latest = hub.field(ref).latest
    return None if latest is None else latest.value


def values(hub: Hub, ref: str) -> list[Any]:
    """Every value a field has had, oldest first."""
    return [r.value for r in hub.field(ref).history]


async def until(check: Callable[[], bool], timeout: float = 2.0) -> float:
    """Wait until `check()` is true; return how long it took. Fails after `timeout` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return loop.time() - start


class FakeMCP3008(MockSPIDevice):
    """The chip side of an MCP3008 on SPI 0.0: answers each channel with `raw[channel]` (0..1023)."""

    def __init__(self, factory: MockFactory, raw: list[int]):
        super().__init__(11, 10, 9, 8, pin_factory=factory)
        self.raw = raw
        self.state = "idle"

    def on_start(self) -> None:
        super().on_start()
        self.state = "idle"

    def on_bit(self) -> None:
        if self.state == "idle" and self.rx_buf[-1]:
            self.state, self.rx_buf = "command", []
        elif self.state == "command" and len(self.rx_buf) == 4:
            # single/differential bit + 3 channel bits; then 2 idle bits and 10 data bits.
            self.tx_word(self.raw[self.rx_word() & 0b111], 12)
            self.state = "data"


# ---------------------------------------------------------------- inputs


async def test_button_and_digital_input_push_each_edge_at_once(pins: MockFactory, tmp_path: Path) -> None:
    device = gpio(
        "pins",
        {"name": "door", "kind": "button", "pin": 17, "bounce_time": 0.05},
        {"name": "contact", "kind": "digital_input", "pin": 22, "active_state": True},
    )
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        door, contact = pins.pin(17), pins.pin(22)
        # A button pulls up and is pressed when low; the contact floats, active high.
        assert (door.pull, door.bounce, contact.pull) == ("up", 0.05, "floating")
        assert hub.node("pins").health.state is Health.OK
        assert (value(hub, "pins.door"), value(hub, "pins.contact")) == (False, False)

        # Driven from another thread, as gpiozero's own callback thread would.
        await asyncio.to_thread(door.drive_low)
        took = await until(lambda: value(hub, "pins.door") is True)
        assert took < 1.0
        await asyncio.to_thread(door.drive_high)
        await until(lambda: value(hub, "pins.door") is False)
        await asyncio.to_thread(contact.drive_high)
        await until(lambda: value(hub, "pins.contact") is True)

        assert values(hub, "pins.door") == [False, True, False]
        assert values(hub, "pins.contact") == [False, True]


async def test_motion_and_line_sensors(pins: MockFactory, tmp_path: Path) -> None:
    device = gpio(
        "pins",
        {"name": "pir", "kind": "motion_sensor", "pin": 4},
        {"name": "line", "kind": "line_sensor", "pin": 5},
    )
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        pir, line = pins.pin(4), pins.pin(5)
        assert (pir.pull, line.pull) == ("down", "down")
        # Low output: no motion; a line sensor reads low over a line (gpiozero's line_detected).
        assert (value(hub, "pins.pir"), value(hub, "pins.line")) == (False, True)
        await asyncio.to_thread(pir.drive_high)
        await asyncio.to_thread(line.drive_high)
        await until(lambda: value(hub, "pins.pir") is True and value(hub, "pins.line") is False)
        await asyncio.to_thread(pir.drive_low)
        await until(lambda: value(hub, "pins.pir") is False)
        assert values(hub, "pins.pir") == [False, True, False]
        assert values(hub, "pins.line") == [True, False]


# ---------------------------------------------------------------- outputs


async def test_outputs_are_set_through_the_hub_and_go_safe_at_start_and_stop(
    pins: MockFactory, tmp_path: Path
) -> None:
    device = gpio(
        "pins",
        {"name": "relay", "kind": "output", "pin": 27},
        {"name": "lamp", "kind": "led", "pin": 23, "initial_value": True},
        {"name": "pump", "kind": "output", "pin": 24, "active_high": False, "safe_value": True},
    )
    relay, lamp, pump = pins.pin(27), pins.pin(23), pins.pin(24)
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        # Start: safe values, except where initial_value says otherwise; pump is active low.
        assert (relay.state, lamp.state, pump.state) == (False, True, False)
        assert [value(hub, f"pins.{n}") for n in ("relay", "lamp", "pump")] == [False, True, True]

        assert await hub.write("pins.relay", "on", OLIVE) == (False, True)
        assert relay.state == 1
        assert value(hub, "pins.relay") is True
        assert await hub.write("pins.pump", "off", OLIVE) == (True, False)
        assert pump.state == 1
        assert await hub.write("pins.lamp", False, OLIVE) == (True, False)
        assert lamp.state == 0

        driver = gw.drivers["pins"]
        await gw.stop()
        # Stop: every output back to its safe value, and the hub knows it.
        assert (relay.state, lamp.state, pump.state) == (False, False, False)
        assert [value(hub, f"pins.{n}") for n in ("relay", "lamp", "pump")] == [False, False, True]
        await driver.stop()  # a second stop is harmless
        with pytest.raises(DeviceError, match="pins refused the write: pins is stopped"):
            await hub.write("pins.relay", "on", OLIVE)
        assert relay.state == 0
        assert hub.audit.entries[-1].outcome == "failed"


async def test_pwm_and_servo_values_and_bounds(pins: MockFactory, tmp_path: Path) -> None:
    device = gpio(
        "pins",
        {"name": "fan", "kind": "pwm_output", "pin": 18, "frequency": 200, "safe_value": 0.25},
        {"name": "arm", "kind": "servo", "pin": 12},
    )
    fan, arm = pins.pin(18), pins.pin(12)
    assert isinstance(fan, MockPWMPin)
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        assert (fan.frequency, fan.state) == (200, 0.25)
        # A servo runs at 50 Hz; 0 is a 1.5 ms pulse, -1 1 ms, +1 2 ms.
        assert arm.frequency == 50
        assert arm.state == pytest.approx(0.075)
        assert (value(hub, "pins.fan"), value(hub, "pins.arm")) == (0.25, 0.0)

        assert await hub.write("pins.fan", "0.8", OLIVE) == (0.25, 0.8)
        assert fan.state == pytest.approx(0.8)
        await hub.write("pins.arm", 1, OLIVE)
        assert arm.state == pytest.approx(0.1)
        await hub.write("pins.arm", -1, OLIVE)
        assert arm.state == pytest.approx(0.05)
        assert value(hub, "pins.arm") == -1.0

        # Out of bounds: refused by the hub before the pin is touched.
        fan_changes, arm_changes = len(fan.states), len(arm.states)
        with pytest.raises(BadValue, match=r"pins.fan 1.5 is above the maximum 1"):
            await hub.write("pins.fan", 1.5, OLIVE)
        with pytest.raises(BadValue, match=r"pins.arm -2 is below the minimum -1"):
            await hub.write("pins.arm", -2, OLIVE)
        assert (len(fan.states), len(arm.states)) == (fan_changes, arm_changes)
        assert fan.state == pytest.approx(0.8)
        assert [e.outcome for e in list(hub.audit.entries)[-2:]] == ["refused", "refused"]
    # Stop: the fan went to its safe 0.25 before its pin was released (PWM off).
    assert [s.state for s in fan.states[-2:]] == [0.25, 0.0]
    assert value(hub, "pins.fan") == 0.25


async def test_a_timed_set_with_no_reading_yet_goes_back_to_the_safe_value(pins: MockFactory, tmp_path: Path) -> None:
    device = gpio("pins", {"name": "fan", "kind": "pwm_output", "pin": 18, "safe_value": 0.25})
    async with running(tmp_path, device) as gw:
        assert gw.hub.field("pins.fan").spec.safe == 0.25  # the config's safe value, on the hub's field
        gw.hub.field("pins.fan").latest = None  # as if the output had not reported yet
        assert await gw.commands.run("set pins.fan 0.8 for 1s", OLIVE) == "pins.fan: — → 0.8, back to 0.25 in 1 s"
        assert pins.pin(18).state == pytest.approx(0.8)
        await until(lambda: value(gw.hub, "pins.fan") == 0.25, timeout=5)
        assert pins.pin(18).state == pytest.approx(0.25)


async def test_a_device_can_have_its_own_mock_pin_factory(pins: MockFactory, tmp_path: Path) -> None:
    device = gpio(
        "bench",
        {"name": "relay", "kind": "output", "pin": 27},
        {"name": "dim", "kind": "pwm_output", "pin": 18},
        pin_factory="mock",
    )
    async with running(tmp_path, device) as gw:
        own = gw.drivers["bench"].factory
        assert isinstance(own, MockFactory) and own is not pins
        assert own.pin_class is MockPWMPin
        await gw.hub.write("bench.relay", True, OLIVE)
        await gw.hub.write("bench.dim", 0.5, OLIVE)
        assert (own.pin(27).state, own.pin(18).state) == (True, 0.5)
        assert pins.pin(27).state == 0  # the default factory's pin is another pin


# ---------------------------------------------------------------- pin errors


async def test_busy_or_bad_pin_is_a_device_error_naming_it_and_other_fields_work(
    pins: MockFactory, tmp_path: Path
) -> None:
    other_program = OutputDevice(26)  # holds pin 26 as another user of the pins would
    try:
        shed = gpio("shed", {"name": "fan", "kind": "output", "pin": 27})
        barn = gpio(
            "barn",
            {"name": "fan", "kind": "output", "pin": 27},
            {"name": "heater", "kind": "output", "pin": 26},
            {"name": "bad", "kind": "led", "pin": "GPIO99"},
            {"name": "door", "kind": "button", "pin": 17},
            {"name": "light", "kind": "led", "pin": 16},
        )
        async with running(tmp_path, shed, barn) as gw:
            hub = gw.hub
            assert hub.node("shed").health.state is Health.OK
            health = hub.node("barn").health
            assert health.state is Health.ERROR
            reasons = health.reason.split("; ")
            assert len(reasons) == 3
            assert reasons[0].startswith("fan: pin 27 cannot be opened: pin GPIO27 is already in use by")
            assert reasons[1].startswith("heater: pin 26 cannot be opened: pin GPIO26 is already in use by")
            assert reasons[2] == "bad: pin GPIO99 cannot be opened: GPIO99 is not a valid pin name"

            # The good fields of the same device carry on.
            await asyncio.to_thread(pins.pin(17).drive_low)
            await until(lambda: value(hub, "barn.door") is True)
            await hub.write("barn.light", True, OLIVE)
            assert pins.pin(16).state == 1

            with pytest.raises(DeviceError, match="barn refused the write: fan: pin 27 cannot be opened"):
                await hub.write("barn.fan", True, OLIVE)
            assert pins.pin(27).state == 0  # shed's fan was not touched
            assert value(hub, "barn.fan") is None
            assert hub.node("barn").health.state is Health.ERROR
    finally:
        other_program.close()


async def test_pin_factory_that_cannot_load_is_a_clear_error(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.write_text("48250\n")
    device = gpio(
        "pi",
        {"name": "relay", "kind": "output", "pin": 27},
        {"name": "door", "kind": "button", "pin": 17},
        {"name": "cpu", "kind": "cpu_temperature", "path": str(temp)},
        pin_factory="pigpio",
    )
    async with running(tmp_path, device) as gw:
        health = gw.hub.node("pi").health
        assert health.state is Health.ERROR
        # One reason naming every field and pin; the factory's error follows.
        assert health.reason.startswith("relay, door: pins 27, 17 cannot be opened: pin factory 'pigpio' cannot be loaded")
        assert ";" not in health.reason
        # The Pi's own sensors need no pins and still work.
        assert value(gw.hub, "pi.cpu") == 48.25
        with pytest.raises(DeviceError, match="relay, door: pins 27, 17 cannot be opened"):
            await gw.hub.write("pi.relay", True, OLIVE)


async def test_default_pin_factory_that_cannot_load_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "nosuch")
    monkeypatch.setattr(Device, "pin_factory", None)
    async with running(tmp_path, gpio("pins", {"name": "fan", "kind": "output", "pin": 27})) as gw:
        health = gw.hub.node("pins").health
        assert health.state is Health.ERROR
        assert health.reason == (
            "fan: pin 27 cannot be opened: no pin factory could be loaded "
            "(Unable to find pin factory 'nosuch'); set GPIOZERO_PIN_FACTORY or pin_factory"
        )


# ---------------------------------------------------------------- polled kinds


async def test_pi_sensors_are_polled_every_interval(pins: MockFactory, tmp_path: Path) -> None:
    temp, loadavg = tmp_path / "temp", tmp_path / "loadavg"
    temp.write_text("45678\n")
    loadavg.write_text("0.50 0.25 0.10 1/100 1234\n")
    device = gpio(
        "pi",
        {"name": "cpu", "kind": "cpu_temperature", "path": str(temp), "interval": 0.1},
        {"name": "load", "kind": "load_average", "path": str(loadavg), "minutes": 1, "interval": 0.1},
        {"name": "disk", "kind": "disk_usage", "path": str(tmp_path), "interval": 0.1},
    )
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        assert (value(hub, "pi.cpu"), value(hub, "pi.load")) == (45.678, 0.5)
        vfs = os.statvfs(tmp_path)
        used = vfs.f_blocks - vfs.f_bfree
        assert value(hub, "pi.disk") == pytest.approx(100 * used / (used + vfs.f_bavail), abs=1)
        assert hub.field("pi.cpu").spec.unit == "°C" and hub.field("pi.disk").spec.unit == "%"

        temp.write_text("51000\n")
        loadavg.write_text("1.75 0.30 0.10 1/100 1234\n")
        await until(lambda: value(hub, "pi.cpu") == 51.0 and value(hub, "pi.load") == 1.75)
        await until(lambda: len(hub.field("pi.disk").history) >= 4)
        times = [r.time for r in hub.field("pi.disk").history]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.08 < g < 1.0 for g in gaps), gaps
        assert hub.node("pi").health.state is Health.OK


async def test_unreadable_sensor_is_an_error_for_that_field_and_recovers(pins: MockFactory, tmp_path: Path) -> None:
    missing, loadavg = tmp_path / "thermal" / "temp", tmp_path / "loadavg"
    loadavg.write_text("0.50 0.25 0.10 1/100 1234\n")
    device = gpio(
        "pi",
        {"name": "cpu", "kind": "cpu_temperature", "path": str(missing), "interval": 0.1},
        {"name": "load", "kind": "load_average", "path": str(loadavg), "interval": 0.1},
    )
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        health = hub.node("pi").health
        assert health.state is Health.ERROR
        assert health.reason == f"cpu: cannot read {missing}: No such file or directory"
        assert value(hub, "pi.cpu") is None
        assert value(hub, "pi.load") == 0.25  # minutes = 5 by default

        missing.parent.mkdir()
        missing.write_text("39000\n")
        await until(lambda: value(hub, "pi.cpu") == 39.0)
        await until(lambda: hub.node("pi").health.state is Health.OK)


async def test_mcp3008_channel_is_polled_and_scaled(plain_pins: MockFactory, tmp_path: Path) -> None:
    chip = FakeMCP3008(plain_pins, [0, 512, 0, 0, 0, 0, 0, 0])
    device = gpio(
        "adc", {"name": "level", "kind": "mcp3008", "channel": 1, "scale": 3.3, "interval": 0.1, "unit": "V"}
    )
    async with running(tmp_path, device) as gw:
        hub = gw.hub
        # gpiozero maps raw 0..1023 onto 0..1: raw 512 is 0.5007.
        assert value(hub, "adc.level") == pytest.approx(0.5007 * 3.3, abs=1e-3)
        chip.raw[1] = 1023
        await until(lambda: value(hub, "adc.level") == pytest.approx(3.3))
        assert hub.node("adc").health.state is Health.OK
    chip.close()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "error"),
    [
        ({"kind": "button", "pin": 17, "frequency": 50}, "`frequency` does not apply to kind 'button' (only to: pwm_output)"),
        ({"kind": "motion_sensor", "pin": 4, "bounce_time": 0.1}, "`bounce_time` does not apply to kind 'motion_sensor' (only to: button, digital_input)"),
        ({"kind": "button", "pin": 17, "pull_up": False, "active_state": True}, "`active_state` is only for floating inputs"),
        ({"kind": "output", "pin": 27, "safe_value": 0.5}, "`safe_value` for kind 'output' must be true or false, got 0.5"),
        ({"kind": "pwm_output", "pin": 18, "initial_value": 2}, "`initial_value` for kind 'pwm_output' must be a number from 0 to 1, got 2"),
        ({"kind": "servo"}, "kind 'servo' needs a `pin`"),
        ({"kind": "mcp3008", "pin": 8}, "`pin` does not apply to kind 'mcp3008'"),
        ({"kind": "led", "pin": True}, 'must be a GPIO number like 17 or a name like "GPIO17"'),
    ],
)
def test_config_refuses_options_that_do_not_fit_the_kind(field: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse({"devices": [gpio("pins", {"name": "x", **field})]})
    assert len(e.value.errors) == 1
    assert error in e.value.errors[0]


def test_example_config_is_valid() -> None:
    config = load(ROOT / "config" / "gpio.example.toml")
    kinds = {f.kind for d in config.devices if d.driver == "gpio" for f in d.fields}
    assert kinds == {
        "button", "motion_sensor", "line_sensor", "digital_input", "output", "led",
        "pwm_output", "servo", "mcp3008", "cpu_temperature", "load_average", "disk_usage",
    }


# ---------------------------------------------------------------- over XMPP


async def test_contact_sets_an_output_and_reads_an_input_over_xmpp(
    pins: MockFactory, xmpp_server: XmppServer, tmp_path: Path
) -> None:
    device = gpio(
        "shed",
        {"name": "fan", "kind": "output", "pin": 27},
        {"name": "door", "kind": "button", "pin": 17},
        {"name": "dimmer", "kind": "pwm_output", "pin": 18},
    )
    config = gateway_config(xmpp_server, tmp_path, devices=[device])
    gw = Gateway(config)
    await gw.start()
    session = Session(config, gw.hub, gw.commands, xmpp_server.passwords["gateway"])
    session.connect()
    olive = await xmpp_server.peer("olive").start()
    jid = xmpp_server.jid("gateway")
    try:
        await asyncio.wait_for(session.online.wait(), 10)
        assert await olive.ask(jid, "set shed.fan on") == "shed.fan: off → on"
        assert pins.pin(27).state == 1
        assert await olive.ask(jid, "set shed.dimmer 1.5") == "Error: shed.dimmer 1.5 is above the maximum 1."
        assert pins.pin(18).state == 0
        assert await olive.ask(jid, "set shed.dimmer 0.4") == "shed.dimmer: 0 → 0.4"
        assert pins.pin(18).state == pytest.approx(0.4)

        assert (await olive.ask(jid, "read shed.door")).startswith("shed.door = off")
        await asyncio.to_thread(pins.pin(17).drive_low)
        await until(lambda: value(gw.hub, "shed.door") is True)
        assert (await olive.ask(jid, "read shed.door")).startswith("shed.door = on")
    finally:
        await olive.stop()
        await session.stop()
        await gw.stop()
    assert pins.pin(27).state == 0  # safe value on stop


async def test_the_driver_contract(pins: MockFactory, tmp_path: Path) -> None:
    """tests/contract.py: a set is applied on the pin, and stop puts the output back to its safe value."""
    relay = pins.pin(27)
    config = parse({"gateway": {"state_dir": str(tmp_path / "state")}, "devices": [
        gpio("pins", {"name": "relay", "kind": "output", "pin": 27}),
    ]})
    gw = Gateway(config)
    await gw.start()
    try:
        await driver_contract(Contract(
            gw.hub, "pins", gw.stop, writes=[("relay", True, True)], safe=("relay", lambda: relay.state, 0)
        ))
    except BaseException:
        await gw.stop()
        raise


async def test_a_gpio_chip_the_user_cannot_open_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """lgpio on a Pi without the gpio group says only "can not open gpiochip": the health says what to do."""

    class LgpioError(Exception):
        """lgpio's own exception type (lgpio.error)."""

    class Refused:
        name = "lgpio"

        def load(self) -> Any:
            def factory() -> None:
                raise LgpioError("'can not open gpiochip'")

            return factory

    monkeypatch.setattr(gpio_driver, "entry_points", lambda group: [Refused()])
    device = gpio("pi", {"name": "relay", "kind": "output", "pin": 27}, pin_factory="lgpio")
    async with running(tmp_path, device) as gw:
        reason = gw.hub.node("pi").health.reason
        assert "pin factory 'lgpio' cannot be loaded: 'can not open gpiochip'" in reason
        assert "sudo usermod -aG gpio" in reason and "/dev/gpiochip0" in reason
