"""The gateway's memory as a small Pi sees it: `python -m bench.pimemory` prints VmRSS idle, after a
`plot … 24h` over a day of readings (or `python -m bench.pimemory N`: N readings; the gateway alone, and with its drawing process) and STEADY seconds after it, with
OMEMO off and, when its packages are installed, on. Meant for the Pi userland under QEMU
(`../shared/tools/pi-userland.sh` with RUN=...; docs/raspberry-pi.md has the table): it builds no
venv, the gateway runs with this interpreter, and the waits are long enough for emulation.
MiB here (2^20 bytes), as `free` and `top` on a Pi count."""

from __future__ import annotations

import asyncio
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .clients import Client, within
from .lab import MB, GatewayProcess, Lab, children, fill_history, rss
from .plot import READINGS, STEADY, devices

MIB = 1024 * 1024
SETTLE = 5.0  # seconds after presence (or a plot) before the memory is read
WAIT = 600.0  # seconds for presence or a plot under emulation


def mib(mb: float) -> float:
    """MB (10^6 bytes, as bench.lab reads them) in MiB."""
    return mb * MB / MIB


def python_floor() -> float:
    """VmRSS in MiB of an idle `python -c` here: under QEMU user-mode emulation every figure
    includes the emulator's own memory (its translated-code cache), and this shows how much."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(SETTLE)
        return mib(rss(proc.pid))
    finally:
        proc.kill()
        proc.wait()


async def measure(lab: Lab, alice: Client, work: Path, omemo: str, readings: int) -> list[float]:
    """[idle, after a plot, after a plot with the drawing process, STEADY s later with children] in MiB."""
    data = lab.config(f"pi-{omemo}", devices(), history_size=readings)
    data["xmpp"]["omemo"] = omemo
    fill_history(Path(data["gateway"]["state_dir"]), ["sim.temp"], readings, every=1.0)
    gw = GatewayProcess(work / f"pi-{omemo}", data)
    jid = lab.jid("gateway")
    try:
        await alice.presence_after(jid, gw.start(), timeout=WAIT)
        await asyncio.sleep(SETTLE)
        idle = gw.rss()
        reply = alice.chat_from(jid)
        alice.send(jid, "plot sim.temp 24h")
        body = (await within(reply, "the plot", WAIT)).msg["body"]
        if not body.startswith("https://"):
            print(f"omemo={omemo}: no picture: {body[:200]}", flush=True)
        await asyncio.sleep(SETTLE)
        pid = gw.proc.pid if gw.proc is not None else 0
        after = gw.rss()
        with_drawing = after + sum(rss(kid) for kid in children(pid))
        await asyncio.sleep(STEADY)
        steady = gw.rss() + sum(rss(kid) for kid in children(pid))
    finally:
        gw.stop()
    return [mib(v) for v in (idle, after, with_drawing, steady)]


async def run(lab: Lab, work: Path, readings: int) -> None:
    alice = await lab.client("alice").start()
    try:
        policies = ["off"]
        try:
            import slixmpp_omemo  # noqa: F401

            policies.append("accept")
        except ImportError:
            print("OMEMO packages not installed here: measured without OMEMO only", flush=True)
        print(f"{platform.machine()}, Python {platform.python_version()}, {readings:,} readings; VmRSS in MiB; "
              f"an idle `python -c`: {python_floor():.1f}", flush=True)
        print("| omemo | idle | after a plot | with the drawing process | 30 s later (with children) |")
        print("|-------|------|--------------|--------------------------|----------------------------|")
        for policy in policies:
            row = await measure(lab, alice, work, policy, readings)
            print(f"| {policy} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)
    finally:
        await alice.stop()


def main() -> int:
    """Start Prosody and Mosquitto, measure, print the table; argv[1]: readings in the history
    (default a day at 1/s, as bench plot_rss)."""
    readings = int(sys.argv[1]) if len(sys.argv) > 1 else READINGS
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="iot-gateway-pimemory-") as tmp:
        lab = Lab(Path(tmp))
        lab.start()
        try:
            asyncio.run(run(lab, Path(tmp), readings))
        finally:
            lab.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
