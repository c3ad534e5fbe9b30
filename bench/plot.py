"""What `plot` costs: a day of readings at one per second drawn, uploaded and delivered, and the
gateway's memory after its first plot, each against the same gateway without plots."""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path
from typing import Any

from .clients import BenchError, Client
from .lab import GatewayProcess, Lab, fill_history
from .results import Result

READINGS = 86_400  # 24 h at 1 reading/s
ROUNDS = 5
SETTLE = 2.0  # seconds after presence before the memory is read


def devices() -> list[dict[str, Any]]:
    """One simulated sensor that adds nothing during the run (its history comes from the database)."""
    return [
        {
            "id": "sim",
            "driver": "simulated",
            "interval": 3600,
            "fields": [{"name": "temp", "unit": "°C", "decimals": 1, "base": 20, "amplitude": 0, "noise": 0}],
        }
    ]


async def plot_cost(lab: Lab, alice: Client, work: Path) -> list[Result]:
    """`plot sim.temp 24h` until the picture arrives vs `history sim.temp 24h` on the same gateway;
    VmRSS after the first plot vs before it."""
    data = lab.config("gplot", devices(), history_size=READINGS)
    fill_history(Path(data["gateway"]["state_dir"]), ["sim.temp"], READINGS, every=1.0)
    gw = GatewayProcess(work / "gplot", data)
    jid = lab.jid("gateway")
    try:
        await alice.presence_after(jid, gw.start(), timeout=60)
        texts = [await _history(alice, jid) for _ in range(1 + ROUNDS)][1:]
        await asyncio.sleep(SETTLE)
        base_rss = gw.rss()  # having answered the same request in text
        first = await _plot(alice, jid)
        await asyncio.sleep(SETTLE)  # the executor thread and upload buffers settle
        rss = gw.rss()
        plots = [await _plot(alice, jid) for _ in range(ROUNDS)]
    finally:
        gw.stop()
    baseline = f"history sim.temp 24h (text) on the same gateway, {READINGS:,} readings"
    return [
        Result("plot_render", statistics.median(plots) * 1000, "ms", baseline, statistics.median(texts) * 1000),
        Result("plot_render.first", first * 1000, "ms", baseline, statistics.median(texts) * 1000),
        Result("plot_rss", rss, "MB", "the same gateway process before its first plot (after the history runs)", base_rss),
    ]


async def _plot(alice: Client, jid: str) -> float:
    seconds, reply = await alice.ask(jid, "plot sim.temp 24h")
    if not reply.startswith("https://"):
        raise BenchError(f"`plot` gave no picture: {reply[:200]}")
    return seconds


async def _history(alice: Client, jid: str) -> float:
    seconds, reply = await alice.ask(jid, "history sim.temp 24h")
    if "readings" not in reply:
        raise BenchError(f"`history` did not answer: {reply[:200]}")
    return seconds
