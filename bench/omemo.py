"""What OMEMO costs a Pi: start-up time and memory of the gateway with `[xmpp] omemo` on and off,
and the import of the crypto stack alone."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from .clients import BenchError, Client
from .footprint import IMPORTS, production_python
from .lab import GatewayProcess, Lab, spawn_rss, spawn_time
from .results import Result

STARTS = 5
SETTLE = 2.0  # seconds after presence (and OMEMO ready) before RSS is read
READY = "OMEMO ready"  # the gateway's log line once its device and bundles are published


def devices() -> list[dict[str, Any]]:
    """Three simulated devices: a small gateway, so OMEMO's share stands out."""
    return [
        {"id": f"sim{n}", "driver": "simulated", "interval": 1.0, "fields": [{"name": "temp", "unit": "°C"}]}
        for n in range(3)
    ]


async def ready_after(log: Path, offset: int, started: float, timeout: float = 60) -> float:
    """Seconds from `started` until READY appears in `log` past byte `offset` (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if READY.encode() in log.read_bytes()[offset:]:
            return time.perf_counter() - started
        await asyncio.sleep(0.01)
    raise BenchError(f"no {READY!r} in {log} after {timeout:g} s")


async def omemo_cost(lab: Lab, alice: Client, work: Path) -> list[Result]:
    """Median over STARTS alternating starts of each: presence at alice, OMEMO ready, RSS."""
    python = production_python()
    gws = {}
    for policy in ("off", "accept"):
        data = lab.config(f"omemo-{policy}", devices())
        data["xmpp"]["omemo"] = policy
        gws[policy] = GatewayProcess(work / f"omemo-{policy}", data, python)
    jid = lab.jid("gateway")
    times: dict[str, list[float]] = {"off": [], "accept": [], "ready": []}
    sizes: dict[str, list[float]] = {"off": [], "accept": []}
    try:
        for policy, gw in gws.items():  # first starts (roster, a new OMEMO device), not timed
            started = gw.start()
            try:
                await alice.presence_after(jid, started, timeout=60)
            except TimeoutError:
                tail = gw.log.read_text(errors="replace")[-1500:] if gw.log.exists() else "(no log)"
                raise BenchError(f"the gateway ({policy}) was not online after 60 s; its log ends:\n{tail}") from None
            if policy == "accept":
                await ready_after(gw.log, 0, started)
            gw.stop()
        for _ in range(STARTS):
            for policy, gw in gws.items():
                offset = gw.log.stat().st_size
                started = gw.start()
                times[policy].append(await alice.presence_after(jid, started, timeout=60) - started)
                if policy == "accept":
                    times["ready"].append(await ready_after(gw.log, offset, started))
                await asyncio.sleep(SETTLE)
                sizes[policy].append(gw.rss())
                gw.stop()
    finally:
        for gw in gws.values():
            gw.stop()
    imports = f"{IMPORTS}, slixmpp.plugins.xep_0060, sqlite3"
    base_t = [await asyncio.to_thread(spawn_time, imports, python) for _ in range(STARTS)]
    with_t = [await asyncio.to_thread(spawn_time, imports + ", slixmpp_omemo", python) for _ in range(STARTS)]
    base_m = [await asyncio.to_thread(spawn_rss, imports, python) for _ in range(STARTS)]
    with_m = [await asyncio.to_thread(spawn_rss, imports + ", slixmpp_omemo", python) for _ in range(STARTS)]
    med = statistics.median
    off = "the same gateway (3 simulated devices) with omemo = \"off\""
    return [
        Result("omemo.startup", med(times["accept"]), "s", f"{off}: spawn to presence", med(times["off"])),
        Result("omemo.ready", med(times["ready"]), "s", f"{off}: spawn to presence", med(times["off"])),
        Result("omemo.rss", med(sizes["accept"]), "MB", off, med(sizes["off"])),
        Result("omemo.import", med(with_t), "s", f"python -c '{imports}'", med(base_t)),
        Result("omemo.import_rss", med(with_m), "MB", f"python -c '{imports}'", med(base_m)),
    ]
