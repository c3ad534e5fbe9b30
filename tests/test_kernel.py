"""The `kernel` driver on a temporary folder laid out exactly as the kernel lays out /sys:
1-Wire thermometers (`temperature` and `w1_slave`), IIO devices (DHT11/22, BME280)
and hwmon chips (SHT3x), their failures, and a thermometer read over real XMPP.

Failing reads are real: a file that is a symlink to /proc/self/mem makes read()
fail with EIO, exactly as a DHT's file does when the sensor does not answer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.auth import Actor
from gateway.config import ConfigError, parse
from gateway.hub import Health
from tests.conftest import XmppServer, gateway_config, start_gateway
from tests.contract import Contract, driver_contract
from tests.helpers import running, until

W1_ID = "28-0316a2795cff"


class FakeSys:
    """The three sysfs folders the driver reads, under a temp dir."""

    def __init__(self, root: Path):
        self.w1 = root / "w1"
        self.iio = root / "iio"
        self.hwmon = root / "hwmon"
        for d in (self.w1, self.iio, self.hwmon):
            d.mkdir(parents=True)
        (self.w1 / "w1_bus_master1").mkdir()  # the bus master is listed too, and is no sensor

    def roots(self) -> dict[str, str]:
        return {"w1_root": str(self.w1), "iio_root": str(self.iio), "hwmon_root": str(self.hwmon)}

    def ds18b20(self, sensor_id: str = W1_ID, milli: int | None = 21500, slave: str | None = None) -> Path:
        """A thermometer with a `temperature` file, or only a `w1_slave` file with this text."""
        d = self.w1 / sensor_id
        d.mkdir(exist_ok=True)
        if slave is not None:
            (d / "w1_slave").write_text(slave)
            return d / "w1_slave"
        (d / "temperature").write_text(f"{milli}\n")
        return d / "temperature"

    def chip(self, bus: str, folder: str, name: str, **files: str) -> Path:
        root = self.iio if bus == "iio" else self.hwmon
        d = root / folder
        d.mkdir()
        (d / "name").write_text(name + "\n")
        for fname, text in files.items():
            (d / fname).write_text(text + "\n")
        return d


def w1_slave(milli: int, crc_ok: bool = True) -> str:
    """The two lines of a DS18B20's `w1_slave`."""
    verdict = "YES" if crc_ok else "NO"
    return f"72 01 4b 46 7f ff 0e 10 57 : crc=57 {verdict}\n72 01 4b 46 7f ff 0e 10 57 t={milli}\n"


def fail_with_eio(path: Path) -> None:
    """Make reading `path` fail with EIO, as a sensor that does not answer does."""
    path.unlink()
    path.symlink_to("/proc/self/mem")


def kernel_device(sysfs: FakeSys, **extra: Any) -> dict[str, Any]:
    return {"id": "pi", "driver": "kernel", "interval": 1, **sysfs.roots(), **extra}


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSys:
    return FakeSys(tmp_path / "sys")


def value(gw: Gateway, ref: str) -> Any:
    dev, field = ref.split(".")
    latest = gw.hub.nodes[dev].fields[field].latest
    return None if latest is None else latest.value


# ---------------------------------------------------------------- discovery and config


def test_auto_finds_every_known_reading_with_units(sysfs: FakeSys) -> None:
    sysfs.ds18b20()
    sysfs.ds18b20("28-00000a1b2c3d", slave=w1_slave(19000))
    sysfs.chip("iio", "iio:device0", "dht11", in_temp_input="21000", in_humidityrelative_input="45500")
    sysfs.chip("iio", "iio:device1", "bme280", in_temp_input="20500", in_pressure_input="100.523",
               in_humidityrelative_input="40100", in_temp_oversampling_ratio="2")
    sysfs.chip("hwmon", "hwmon0", "cpu_thermal", temp1_input="48000")
    sysfs.chip("hwmon", "hwmon1", "sht3x", temp1_input="22100", humidity1_input="51000",
               temp1_max="60000", update_interval="1000")
    config = parse({"devices": [kernel_device(sysfs, sensors="auto", names={W1_ID: "water", "dht11_temp": "air"})]})
    fields = {f.name: (f.sensor, f.unit, f.decimals) for f in config.devices[0].fields}
    assert fields == {
        "water": (f"w1:{W1_ID}", "°C", 2),
        "28-00000a1b2c3d": ("w1:28-00000a1b2c3d", "°C", 2),
        "air": ("iio:dht11:temp", "°C", 1),
        "dht11_humidityrelative": ("iio:dht11:humidityrelative", "%", 1),
        "bme280_temp": ("iio:bme280:temp", "°C", 1),
        "bme280_pressure": ("iio:bme280:pressure", "hPa", 1),
        "bme280_humidityrelative": ("iio:bme280:humidityrelative", "%", 1),
        "cpu_thermal_temp1": ("hwmon:cpu_thermal:temp1", "°C", 1),
        "sht3x_temp1": ("hwmon:sht3x:temp1", "°C", 1),
        "sht3x_humidity1": ("hwmon:sht3x:humidity1", "%", 1),
    }


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ({"fields": [{"name": "t", "sensor": "w1:28-xyz"}]}, "devices.0.fields.0.sensor: 'w1:28-xyz' is not a sensor id"),
        ({"fields": [{"name": "t", "sensor": "iio:dht11:colour"}]}, "devices.0.fields.0: 'iio:dht11:colour': unknown channel"),
        ({"fields": [{"name": "t", "sensor": f"w1:{W1_ID}", "path": "/x"}]}, "give exactly one of `sensor` and `path`"),
        ({"fields": [{"name": "t", "path": "/x", "writable": True}]}, "kernel sensors are read-only"),
        ({"fields": [{"name": "t", "path": "/x", "scale": float("nan")}]}, "devices.0.fields.0.scale: must be a finite number, got nan"),
        ({"sensors": "auto"}, "no sensor found under"),
        ({}, "give `fields`, or `sensors = \"auto\"`"),
        ({"sensors": "auto", "names": {W1_ID: "bad name"}}, "devices.0.names: 'bad name' is not a field name"),
    ],
)
def test_bad_kernel_config_is_refused_with_its_path(sysfs: FakeSys, device: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse({"devices": [kernel_device(sysfs, **device)]})
    assert any(expected in line for line in err.value.errors), err.value.errors


# ---------------------------------------------------------------- readings and failures


async def test_readings_are_scaled_as_the_kernel_documents(sysfs: FakeSys, tmp_path: Path) -> None:
    sysfs.ds18b20(milli=21500)
    sysfs.ds18b20("28-00000a1b2c3d", slave=w1_slave(-1250))
    sysfs.chip("iio", "iio:device0", "bme280", in_pressure_input="100.523", in_humidityrelative_input="40100")
    sysfs.chip("hwmon", "hwmon3", "sht3x", temp1_input="22100", in0_input="3300")
    raw = sysfs.iio / "raw_value"
    raw.write_text("512\n")
    device = kernel_device(sysfs, sensors="auto", fields=[{"name": "adc", "path": str(raw), "scale": 0.5, "unit": "mV"}])
    names = (W1_ID, "28-00000a1b2c3d", "bme280_pressure", "bme280_humidityrelative", "sht3x_temp1", "sht3x_in0", "adc")
    async with running(tmp_path, device) as gw:
        # Each sensor is read on its own thread: the node is ok at the first reading, not the last.
        await until(lambda: all(value(gw, f"pi.{n}") is not None for n in names), "the first read of every sensor")
        assert gw.hub.nodes["pi"].health.state is Health.OK
        assert value(gw, f"pi.{W1_ID}") == pytest.approx(21.5)
        assert value(gw, "pi.28-00000a1b2c3d") == pytest.approx(-1.25)
        assert value(gw, "pi.bme280_pressure") == pytest.approx(1005.23)
        assert value(gw, "pi.bme280_humidityrelative") == pytest.approx(40.1)
        assert value(gw, "pi.sht3x_temp1") == pytest.approx(22.1)
        assert value(gw, "pi.sht3x_in0") == pytest.approx(3.3)
        assert value(gw, "pi.adc") == pytest.approx(256.0)


async def test_crc_failure_is_stale_with_the_reason_then_recovers(sysfs: FakeSys, tmp_path: Path) -> None:
    slave = sysfs.ds18b20(slave=w1_slave(23000, crc_ok=False))
    async with running(tmp_path, kernel_device(sysfs, sensors="auto", retries=2)) as gw:
        node = gw.hub.nodes["pi"]
        await until(lambda: node.health.state is Health.STALE, "stale after the retries")
        assert "CRC check failed" in node.health.reason and "(2 tries)" in node.health.reason
        assert value(gw, f"pi.{W1_ID}") is None  # a bad CRC is never a reading
        slave.write_text(w1_slave(23000))
        await until(lambda: node.health.state is Health.OK, "back to ok after health_window good reads", 15)
        assert value(gw, f"pi.{W1_ID}") == pytest.approx(23.0)


async def test_one_sensor_failing_now_and_then_keeps_the_device_degraded_not_flapping(
    sysfs: FakeSys, tmp_path: Path
) -> None:
    bad = "28-00000000000b"
    sysfs.ds18b20("28-00000000000a", slave=w1_slave(20000))
    slave = sysfs.ds18b20(bad, slave=w1_slave(21000))
    sysfs.ds18b20("28-00000000000c", slave=w1_slave(22000))
    # One read per poll, and polls driven by the test (a long interval keeps the driver's own loop asleep).
    device = kernel_device(sysfs, sensors="auto", retries=1, interval=3600, health_window=3)
    async with running(tmp_path, device) as gw:
        node, driver = gw.hub.nodes["pi"], gw.drivers["pi"]
        await until(lambda: node.health.state is Health.OK, "the first read")
        seen: list[str] = []
        gw.hub.subscribe(health=lambda n, old: seen.append(n.health.state.value))
        for i in range(9):  # its CRC fails every other read, the last one too
            slave.write_text(w1_slave(21000, crc_ok=i % 2 == 1))
            await driver.poll()
            assert node.health.state is Health.STALE, (i, seen)
        assert seen == ["stale"], seen  # one change, not one per read
        status = await gw.commands.run("status", Actor("a@x", "admin", "test"))
        flat = " ".join(status.split())  # the reason is wrapped under the device's row
        assert f"{bad} (w1:{bad}): CRC check failed (noisy 1-Wire bus?) (1 try)" in flat and "0/1 devices OK" in flat, status
        assert value(gw, "pi.28-00000000000a") == pytest.approx(20.0)  # the good ones read on
        slave.write_text(w1_slave(21000))
        for i in range(3):  # it recovers: ok once it has read well for the window
            await driver.poll()
            assert node.health.state is (Health.OK if i == 2 else Health.STALE), (i, seen)
        assert seen == ["stale", "ok"], seen


async def test_power_on_85_is_not_a_reading(sysfs: FakeSys, tmp_path: Path) -> None:
    temp = sysfs.ds18b20(milli=85000)
    async with running(tmp_path, kernel_device(sysfs, sensors="auto", retries=2)) as gw:
        node = gw.hub.nodes["pi"]
        await until(lambda: node.health.state is Health.STALE, "stale on the power-on value")
        assert "85 °C power-on value" in node.health.reason
        assert value(gw, f"pi.{W1_ID}") is None
        temp.write_text("84500\n")
        await until(lambda: value(gw, f"pi.{W1_ID}") is not None, "a real reading")
        temp.write_text("85000\n")  # next to 84.5 °C, 85 °C is a plausible reading: kept
        await until(lambda: value(gw, f"pi.{W1_ID}") == pytest.approx(85.0), "85 after 84.5")


async def test_eio_is_retried_then_stale_and_other_sensors_carry_on(sysfs: FakeSys, tmp_path: Path) -> None:
    chip = sysfs.chip("iio", "iio:device0", "dht11", in_temp_input="21000", in_humidityrelative_input="45000")
    sysfs.ds18b20(milli=19000)
    fail_with_eio(chip / "in_temp_input")
    async with running(tmp_path, kernel_device(sysfs, sensors="auto", retries=3)) as gw:
        node = gw.hub.nodes["pi"]
        await until(lambda: node.health.state is Health.STALE, "stale after three EIO")
        assert "dht11_temp (iio:dht11:temp): reading in_temp_input failed: Input/output error (3 tries)" in node.health.reason
        assert value(gw, "pi.dht11_humidityrelative") == pytest.approx(45.0)
        assert value(gw, f"pi.{W1_ID}") == pytest.approx(19.0)
        (chip / "in_temp_input").unlink()
        (chip / "in_temp_input").write_text("21000\n")
        await until(lambda: node.health.state is Health.OK, "ok once the DHT has answered for health_window reads", 15)
        assert value(gw, "pi.dht11_temp") == pytest.approx(21.0)


async def test_a_sensor_that_vanishes_is_offline_and_comes_back(sysfs: FakeSys, tmp_path: Path) -> None:
    sysfs.ds18b20(milli=20000)
    chip = sysfs.chip("hwmon", "hwmon2", "sht3x", temp1_input="22000")
    async with running(tmp_path, kernel_device(sysfs, sensors="auto")) as gw:
        node = gw.hub.nodes["pi"]
        await until(lambda: node.health.state is Health.OK, "the first read")
        shutil.rmtree(sysfs.w1 / W1_ID)
        await until(lambda: node.health.state is Health.OFFLINE, "offline once unplugged")
        assert f"{W1_ID} is gone" in node.health.reason
        # The chip comes back under another hwmon number, as after a re-probe: found by name.
        shutil.rmtree(chip)
        sysfs.chip("hwmon", "hwmon7", "sht3x", temp1_input="23000")
        sysfs.ds18b20(milli=20500)
        await until(lambda: node.health.state is Health.OK, "ok once plugged back")
        await until(lambda: value(gw, "pi.sht3x_temp1") == pytest.approx(23.0), "the re-probed chip read")
        assert value(gw, f"pi.{W1_ID}") == pytest.approx(20.5)


async def test_reads_run_concurrently_off_the_event_loop(sysfs: FakeSys, tmp_path: Path) -> None:
    """Two sensors whose reads block (FIFOs with no writer yet): both wait at once, the loop runs on."""
    fifos = [sysfs.iio / "slow_a", sysfs.iio / "slow_b"]
    for f in fifos:
        os.mkfifo(f)
    fields = [{"name": f.name, "path": str(f)} for f in fifos]
    writers: dict[Path, int] = {}

    def reader_waiting(fifo: Path) -> bool:
        """Open the write end if a reader waits for it (without blocking); keep it open."""
        if fifo not in writers:
            try:
                writers[fifo] = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO  # no reader yet
                return False
        return True

    async with running(tmp_path, kernel_device(sysfs, fields=fields)) as gw:
        try:
            # The first reader stays blocked in read() while we hold its write end open and
            # write nothing: the second can only be waiting too if the reads run side by side.
            # Meanwhile `until` itself sleeps on the event loop, which therefore runs on.
            await until(lambda: all([reader_waiting(f) for f in fifos]), "both reads waiting at once")
            for text, fifo in (("7\n", fifos[1]), ("5\n", fifos[0])):
                os.write(writers[fifo], text.encode())
                os.close(writers.pop(fifo))
            await until(lambda: value(gw, "pi.slow_a") == 5.0 and value(gw, "pi.slow_b") == 7.0, "both values")
        finally:
            for fd in writers.values():
                os.close(fd)
    # Reads begun before the stop may still wait in the driver's threads: let them end.
    for fifo in fifos:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_permission_denied_names_the_file_and_the_group(sysfs: FakeSys) -> None:
    """As an unprivileged user (the test runs as root), a 0640 root:<group> file is refused."""
    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to read as another user")
    temp = sysfs.ds18b20(milli=20000)
    temp.chmod(0o640)
    os.chown(temp, 0, 0)
    for d in (temp.parent, *temp.parents):
        if str(d) in ("/", "/tmp"):
            break
        d.chmod(d.stat().st_mode | 0o005)  # others may traverse the folders, not read the file
    code = "import devices.kernel as k, pathlib, sys\ntry:\n    k.read_file(pathlib.Path(sys.argv[1]), 0.001)\nexcept k.SensorError as e:\n    print(e.health.value, e)\n"
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code, str(temp)],
        capture_output=True, text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == f"error cannot read {temp}: permission denied; add the gateway's user to group 'root'", out.stderr


# ---------------------------------------------------------------- through XMPP


async def test_thermometer_in_chat_and_its_removal_in_presence(xmpp_server: XmppServer, sysfs: FakeSys, tmp_path: Path) -> None:
    temp = sysfs.ds18b20(milli=21500)
    config = gateway_config(xmpp_server, tmp_path, devices=[kernel_device(sysfs, sensors="auto", names={W1_ID: "water"})])
    gw = await start_gateway(config, xmpp_server.passwords["gateway"])
    alice = await xmpp_server.peer("alice").start()
    try:
        await until(lambda: value(gw.gateway, "pi.water") is not None, "the first read")
        assert "21.50 °C" in await alice.ask_for(gw.jid, "read pi.water", "pi.water")
        temp.write_text("24750\n")
        await until(lambda: value(gw.gateway, "pi.water") == pytest.approx(24.75), "the new value")
        assert "24.75 °C" in await alice.ask_for(gw.jid, "read pi.water", "pi.water")

        alice.client.send_presence_subscription(pto=gw.jid)
        await alice.presence_from(gw.jid, lambda p: p["type"] == "available" and p["show"] == "")
        shutil.rmtree(sysfs.w1 / W1_ID)
        pres = await alice.presence_from(gw.jid, lambda p: p["show"] == "xa")
        assert f"pi: offline: water: {W1_ID} is gone" in pres["status"]
    finally:
        await alice.stop()
        await gw.stop()


async def test_the_driver_contract(sysfs: FakeSys, tmp_path: Path) -> None:
    """tests/contract.py: a thermometer that vanishes makes the device unhealthy with a reason,
    what was read stays, and plugged back it is healthy again."""
    sysfs.ds18b20(milli=20000)
    config = parse({"gateway": {"state_dir": str(tmp_path / "state")}, "devices": [kernel_device(sysfs, sensors="auto")]})
    gw = Gateway(config)
    await gw.start()
    try:
        await driver_contract(Contract(
            gw.hub, "pi", gw.stop, fail=lambda: shutil.rmtree(sysfs.w1 / W1_ID), mend=lambda: sysfs.ds18b20(milli=20500),
        ))
    except BaseException:
        await gw.stop()
        raise
