"""Start-up time and memory of the gateway process, and a read-out at 10 000 fields."""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from gateway.config import GatewaySection

from .clients import BenchError, Client
from .lab import ROOT, GatewayProcess, Lab, fill_history, spawn_rss, spawn_time
from .results import Result, Target

IMPORTS = "import slixmpp, paho.mqtt.client, gpiozero, pydantic"
BASELINE = f"python -c {IMPORTS!r}"
STARTS = 7
SETTLE = 2.0  # seconds after presence before RSS is read: mqtt devices connected, first samples taken
HISTORY = 1000  # readings per field in memory: the default history_size, full
# Readings per field in history.db: the default history_raw_rows, full, as a gateway leaves it after
# a day (a start loads the last HISTORY of each from among them).
STORED = GatewaySection.model_fields["history_raw_rows"].default
SCALE_DEVICES = 1000
SCALE_FIELDS = 10  # per device
SCALE_READOUTS = 5


# The production install: the project's dependencies without the test extra. The test tools
# change what the gateway imports: slixmpp colours its debug log with pygments when it is
# installed (pytest brings it), 30 more modules and about 50 ms at every start.
PRODUCTION = ROOT / ".venv" / "production"
PRODUCTION_EXTRAS = ("plot", "omemo")


def production_python() -> str:
    """The python of a venv holding what `pip install '.[plot,omemo]'` installs (no test extra), built once
    and again when pyproject.toml changes. The gateway runs from the source tree with it."""
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    stamp = PRODUCTION / ".installed"
    digest = hashlib.sha256(pyproject + repr(PRODUCTION_EXTRAS).encode()).hexdigest()
    python = PRODUCTION / "bin" / "python"
    if stamp.exists() and stamp.read_text() == digest and python.exists():
        return str(python)
    project = tomllib.loads(pyproject.decode())["project"]
    # With the extras `make install` puts on a 64-bit Pi: plots and OMEMO (the omemo benchmark needs them).
    deps = [*project["dependencies"], *(d for extra in PRODUCTION_EXTRAS for d in project["optional-dependencies"][extra])]
    print(f"(building {PRODUCTION.relative_to(ROOT)}: {', '.join(deps)}) ", end="", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PRODUCTION)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *deps], check=True, capture_output=True)
    except subprocess.CalledProcessError as e:
        raise BenchError(
            f"could not build the production venv {PRODUCTION}: {e.stderr.decode(errors='replace')[-500:]}"
        ) from None
    stamp.write_text(digest)
    return str(python)


def devices_200() -> list[dict[str, Any]]:
    """40 devices with 5 fields each, of every driver but serial (ptys belong to serial_ingest):
    18 simulated, 20 MQTT sensors (one JSON message per device), 2 GPIO on gpiozero's mock pins."""
    sims = [
        {
            "id": f"sim{n:02d}",
            "driver": "simulated",
            "interval": 5.0,
            "fields": [
                {"name": f"f{k}", "unit": "°C", "decimals": 1, "base": 18 + k, "amplitude": 2, "noise": 0.1}
                for k in range(5)
            ],
        }
        for n in range(18)
    ]
    mqtt = [
        {
            "id": f"mq{n:02d}",
            "driver": "mqtt",
            "fields": [
                {"name": name, "type": kind, "unit": unit, "topic": f"bench/mq{n:02d}", "json_path": name}
                for name, kind, unit in (
                    ("temperature", "numeric", "°C"),
                    ("humidity", "numeric", "%"),
                    ("pressure", "numeric", "hPa"),
                    ("battery", "integer", "%"),
                    ("linkquality", "integer", ""),
                )
            ],
        }
        for n in range(20)
    ]
    gpio = [
        {
            "id": f"gpio{n}",
            "driver": "gpio",
            "pin_factory": "mock",
            "fields": [
                {"name": "door", "kind": "button", "pin": 4 + 5 * n},
                {"name": "window", "kind": "digital_input", "pin": 5 + 5 * n},
                {"name": "leak", "kind": "digital_input", "pin": 6 + 5 * n},
                {"name": "smoke", "kind": "digital_input", "pin": 7 + 5 * n},
                {"name": "siren", "kind": "led", "pin": 8 + 5 * n},
            ],
        }
        for n in range(2)
    ]
    return sims + mqtt + gpio


def gateway_200(lab: Lab, work: Path) -> GatewayProcess:
    """The gateway of rss_200_fields, startup and the latency benchmarks, its history full
    (memory and history.db's readings; the first start rolls them up)."""
    devices = devices_200()
    data = lab.config("g200", devices, history_size=HISTORY)
    refs = [f"{d['id']}.{f['name']}" for d in devices for f in d["fields"]]
    fill_history(Path(data["gateway"]["state_dir"]), refs, STORED)
    return GatewayProcess(work / "g200", data, production_python())


async def startup_and_rss(lab: Lab, alice: Client, gw: GatewayProcess) -> list[Result]:
    """Process start → presence at alice, and RSS after start, against the bare imports.

    Leaves the gateway running (from its last start) for the latency benchmarks.
    """
    jid = lab.jid("gateway")
    python = gw.python  # the baseline imports run on the same install as the gateway
    # A first start settles the roster (subscriptions both ways); not timed.
    await alice.presence_after(jid, gw.start(), timeout=60)
    gw.stop()
    times, base_times, sizes, base_sizes = [], [], [], []
    for n in range(STARTS):
        base_times.append(await asyncio.to_thread(spawn_time, IMPORTS, python))
        base_sizes.append(await asyncio.to_thread(spawn_rss, IMPORTS, python))
        started = gw.start()
        times.append(await alice.presence_after(jid, started, timeout=60) - started)
        await asyncio.sleep(SETTLE)
        sizes.append(gw.rss())
        if n < STARTS - 1:
            gw.stop()
    return [
        Result(
            "rss_200_fields",
            statistics.median(sizes),
            "MB",
            BASELINE,
            statistics.median(base_sizes),
            Target("over<=", 25),
        ),
        Result(
            "startup",
            statistics.median(times),
            "s",
            f"{BASELINE} until it exits",
            statistics.median(base_times),
            Target("over<=", 1.0),
        ),
    ]


def devices_10k() -> list[dict[str, Any]]:
    """1 000 simulated devices of 10 fields, each sampled once at start."""
    return [
        {
            "id": f"d{n:04d}",
            "driver": "simulated",
            "interval": 3600,
            "fields": [
                {"name": f"f{k}", "unit": "°C", "decimals": 2, "base": 20 + k, "amplitude": 0, "noise": 0}
                for k in range(SCALE_FIELDS)
            ],
        }
        for n in range(SCALE_DEVICES)
    ]


async def scale_10k_fields(lab: Lab, alice: Client, work: Path) -> list[Result]:
    """An XEP-0323 momentary read-out of all 10 000 fields, and the process's RSS afterwards."""
    data = lab.config("g10k", devices_10k())
    del data["mqtt"]
    gw = GatewayProcess(work / "g10k", data, production_python())
    try:
        await alice.presence_after(lab.jid("gateway"), gw.start(), timeout=60)
        expected = SCALE_DEVICES * SCALE_FIELDS
        times = []
        for _ in range(1 + SCALE_READOUTS):  # the first warms up
            seconds, fields = await alice.readout(lab.gateway_jid, timeout=60)
            if fields != expected:
                raise BenchError(f"the read-out of every node gave {fields} fields, not {expected}")
            times.append(seconds)
        size = gw.rss()
    finally:
        gw.stop()
    return [
        Result("scale_10k_fields.readout", statistics.median(times[1:]), "s", target=Target("<", 2.0)),
        Result("scale_10k_fields.rss", size, "MB", target=Target("<", 150)),
    ]
