"""What an idle gateway costs a Pi: CPU and wake-ups with three devices at 1 reading/s.

The gateway runs as a process (`python -m gateway run`) connected to the bench's
Prosody, next to a bare slixmpp client connected the same way over the same
seconds, the baseline. CPU time is the sum of /proc/PID/task/*/schedstat (ns, every
thread); wake-ups are the threads' voluntary context switches: each time a thread
blocks (the event loop in epoll_wait, a worker on its queue) it costs one when it wakes.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .clients import BenchError, Client
from .footprint import production_python
from .lab import ROOT, GatewayProcess, Lab
from .results import Result, Target

SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "60"))  # the figure is over 60 s
SETTLE = 5.0  # after presence: roster pushes, caps and the first samples are done
DEVICES = 3
BARE = "a bare slixmpp client, connected to the same Prosody over the same seconds"
# The baseline: log in, send presence, then nothing but what slixmpp itself does.
BARE_CODE = """
import asyncio, sys, slixmpp
jid, address, ca = sys.argv[1:4]
password = sys.stdin.readline().strip()
c = slixmpp.ClientXMPP(jid, password)
c.ca_certs = ca
c.enable_direct_tls = False
c.add_event_handler("session_start", lambda _e: (c.send_presence(), print("ready", flush=True)))
host, port = address.rsplit(":", 1)
c.connect(host, int(port))
asyncio.get_event_loop().run_forever()
"""


def devices_idle() -> list[dict[str, Any]]:
    """Three simulated devices, one reading per second each, as a small greenhouse would send.

    Their intervals differ by a few %, so their readings drift apart, as real sensors' do,
    instead of sharing every wake-up of the event loop."""
    return [
        {
            "id": f"dev{n}",
            "driver": "simulated",
            "interval": (0.95, 1.02, 1.05)[n],
            "fields": [{"name": "temp", "unit": "°C", "decimals": 1, "base": 20 + n, "amplitude": 1, "noise": 0.1}],
        }
        for n in range(DEVICES)
    ]


@dataclass(frozen=True)
class Usage:
    """CPU seconds and voluntary context switches of a process so far, over its live threads."""

    cpu: float
    switches: int

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.cpu - other.cpu, self.switches - other.switches)


def usage(pid: int) -> Usage:
    """The CPU time and wake-ups of every thread of `pid` (threads that ended are not counted)."""
    cpu_ns = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            cpu_ns += int((task / "schedstat").read_text().split()[0])
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between listing and reading
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                switches += int(line.split()[1])
    return Usage(cpu_ns / 1e9, switches)


def per_thread(pid: int) -> dict[str, int]:
    """Voluntary context switches so far of the event loop (the main thread) and of the others."""
    out = {"event loop": 0, "other threads": 0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                out["event loop" if task.name == str(pid) else "other threads"] += int(line.split()[1])
    return out


def start_bare(lab: Lab, python: str) -> subprocess.Popen[bytes]:
    """The baseline client process, logged in as bob; returns once its session has started."""
    proc = subprocess.Popen(
        [python, "-c", BARE_CODE, lab.jid("bob"), lab.prosody.address, str(lab.prosody.ca_file)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write((lab.passwords["bob"] + "\n").encode())
    proc.stdin.flush()
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise BenchError("the bare slixmpp client of idle_cpu could not log in")
    return proc


async def idle_cpu(lab: Lab, alice: Client, work: Path) -> list[Result]:
    """idle_cpu (% of one core) and wakeups (per second) of the gateway over SECONDS."""
    data = lab.config("idle", devices_idle())
    del data["mqtt"]  # no mqtt device: the broker's client would only add its own timer
    gw = GatewayProcess(work / "idle", data, production_python())
    bare = None
    try:
        await alice.presence_after(lab.jid("gateway"), gw.start(), timeout=60)
        bare = await asyncio.to_thread(start_bare, lab, gw.python)
        await asyncio.sleep(SETTLE)
        assert gw.proc is not None
        g0, b0, t0 = usage(gw.proc.pid), usage(bare.pid), per_thread(gw.proc.pid)
        await asyncio.sleep(SECONDS)
        g, b, t = usage(gw.proc.pid) - g0, usage(bare.pid) - b0, per_thread(gw.proc.pid)
        if gw.proc.poll() is not None:
            raise BenchError(f"the idle gateway exited; see {gw.log}")
    finally:
        gw.stop()
        if bare is not None:
            bare.kill()
            bare.wait(10)
    threads = ", ".join(f"{name} {(n - t0.get(name, 0)) / SECONDS:.2f}/s" for name, n in sorted(t.items()))
    print(f"\n  idle wake-ups by thread: {threads}", end=" ", flush=True)
    return [
        Result(
            "idle_cpu",
            100 * g.cpu / SECONDS,
            "%",
            f"{BARE} ({SECONDS:g} s)",
            100 * b.cpu / SECONDS,
            Target("<", 0.2),
        ),
        Result("wakeups", g.switches / SECONDS, "/s", BARE, b.switches / SECONDS),
    ]
