"""What `plot` costs: a day of readings at one per second drawn, uploaded and delivered (and the
picture's size), and the memory after its first plot and STEADY seconds after the last, each
against the same gateway before any plot. The drawing runs in a child process that ends WORKER_IDLE s after a plot, so
the memory is read for the gateway alone and for it with its children (what the Pi pays)."""

from __future__ import annotations

import asyncio
import ssl
import statistics
import urllib.request
from pathlib import Path
from typing import Any

from .clients import BenchError, Client
from .lab import GatewayProcess, Lab, fill_history, tree_rss
from .results import Result, Target

READINGS = 86_400  # 24 h at 1 reading/s
ROUNDS = 5
SETTLE = 2.0  # seconds after presence before the memory is read
STEADY = 30.0  # seconds after the last plot before the steady memory is read


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
        first, url = await _plot(alice, jid)
        await asyncio.sleep(SETTLE)  # upload buffers settle
        rss = gw.rss()
        pid = gw.proc.pid if gw.proc is not None else 0
        with_drawing = tree_rss(pid)
        plots = [(await _plot(alice, jid))[0] for _ in range(ROUNDS)]
        png = await asyncio.to_thread(_download, url, lab.prosody.ca_file)
        await asyncio.sleep(STEADY)
        steady = tree_rss(pid)
    finally:
        gw.stop()
    baseline = f"history sim.temp 24h (text) on the same gateway, {READINGS:,} readings"
    before = "the same gateway process before its first plot (after the history runs)"
    print(f"plot memory: idle {base_rss:.1f} MB, after a plot {rss:.1f} MB (+ the drawing process: "
          f"{with_drawing:.1f} MB), {STEADY:g} s after the last plot {steady:.1f} MB", flush=True)
    return [
        Result("plot_render", statistics.median(plots) * 1000, "ms", baseline, statistics.median(texts) * 1000),
        Result("plot_render.first", first * 1000, "ms", baseline, statistics.median(texts) * 1000),
        Result("plot_render.png", len(png) / 1000, "kB"),
        Result("plot_rss", rss, "MB", before, base_rss),
        Result("plot_rss.with_drawing", with_drawing, "MB", before + "; with its children", base_rss),
        Result("plot_rss.steady", steady, "MB", f"{before}; {STEADY:g} s after the last plot, with its children",
               base_rss, Target("over<=", 10)),
    ]


async def _plot(alice: Client, jid: str) -> tuple[float, str]:
    seconds, reply = await alice.ask(jid, "plot sim.temp 24h")
    if not reply.startswith("https://"):
        raise BenchError(f"`plot` gave no picture: {reply[:200]}")
    return seconds, reply


def _download(url: str, ca_file: Path) -> bytes:
    """The uploaded picture, over HTTPS trusting the lab's CA."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
        return resp.read()


async def _history(alice: Client, jid: str) -> float:
    seconds, reply = await alice.ask(jid, "history sim.temp 24h")
    if "readings" not in reply:
        raise BenchError(f"`history` did not answer: {reply[:200]}")
    return seconds
