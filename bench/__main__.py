"""The gateway's benchmarks, each against a baseline measured in the same run.

`python -m bench [--nagle] [NAME ...]` runs them all (or those named) against a
Prosody and a Mosquitto it starts on loopback, prints a table, and after a full
run writes bench/results.json."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from .federation import federation
from .fleet import fleet_20
from .history import history_year
from .footprint import gateway_200, scale_10k_fields, startup_and_rss
from .idle import idle_cpu
from .ingest import mqtt_ingest, serial_ingest
from .lab import Lab
from .latency import alert_latency, chat_latency, readout_latency
from .omemo import omemo_cost
from .plot import plot_cost
from .results import RESULTS, Result, cpu_model, table, write
from .sdwrites import sd_writes
from .webchat import missing as webchat_missing, webchat_latency

NAMES = (
    "mqtt_ingest",
    "serial_ingest",
    "rss_200_fields",
    "startup",
    "readout_latency",
    "chat_latency",
    "alert_latency",
    "scale_10k_fields",
    "plot_render",
    "plot_rss",
    "idle_cpu",
    "fleet_20",
    "sd_writes",
    "omemo",
    "federation",
    "history_year",
    "webchat",
)
ON_G200 = NAMES[2:7]  # the benchmarks that share the 200-field gateway process


async def step(name: str, results: list[Result], work: Awaitable[Result | list[Result]]) -> None:
    """Run one benchmark, say how long it took, and collect its results."""
    print(f"{name} ...", end=" ", flush=True)
    start = time.monotonic()
    got = await work
    results.extend(got if isinstance(got, list) else [got])
    print(f"{time.monotonic() - start:.0f} s", flush=True)


async def run(lab: Lab, work: Path, only: set[str]) -> list[Result]:
    """The benchmarks in `only` (all when empty), in an order that lets them share gateways."""
    results: list[Result] = []

    def wanted(*names: str) -> bool:
        return not only or bool(only & set(names))

    if wanted("mqtt_ingest"):
        await step("mqtt_ingest", results, mqtt_ingest(lab, work))
    if wanted("serial_ingest"):
        await step("serial_ingest", results, serial_ingest(lab, work))
    if wanted("sd_writes"):
        await step("sd_writes", results, sd_writes(work))
    if wanted("history_year"):
        await step("history_year", results, history_year(work))
    if wanted("fleet_20"):
        await step("fleet_20", results, fleet_20(lab, work))
    if wanted("federation"):
        await step("federation", results, federation(lab, work))
    if wanted("webchat"):
        lacking = webchat_missing()
        if lacking is None:
            await step("webchat", results, webchat_latency(lab, work))
        else:
            print(f"webchat skipped: {lacking}", flush=True)
    if wanted("omemo"):
        alice = await lab.client("alice").start()
        try:
            await step("omemo", results, omemo_cost(lab, alice, work))
        finally:
            await alice.stop()
    if not wanted(*ON_G200, "scale_10k_fields", "plot_render", "plot_rss", "idle_cpu"):
        return results
    alice = await lab.client("alice").start()
    gw = gateway_200(lab, work)
    try:
        if wanted(*ON_G200):
            # Timed starts; the last one stays up for the latency benchmarks.
            await step("rss_200_fields, startup", results, startup_and_rss(lab, alice, gw))
        if wanted("readout_latency"):
            await step("readout_latency", results, readout_latency(lab, alice))
        if wanted("chat_latency"):
            await step("chat_latency", results, chat_latency(lab, alice))
        if wanted("alert_latency"):
            await step("alert_latency", results, alert_latency(lab, alice))
        gw.stop()
        if wanted("scale_10k_fields"):
            await step("scale_10k_fields", results, scale_10k_fields(lab, alice, work))
        if wanted("plot_render", "plot_rss"):
            await step("plot_render, plot_rss", results, plot_cost(lab, alice, work))
        if wanted("idle_cpu"):
            await step("idle_cpu, wakeups", results, idle_cpu(lab, alice, work))
    finally:
        gw.stop()
        await alice.stop()
    return results


def machine() -> str:
    """One line about where the numbers come from."""
    cpu = cpu_model()
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def main(argv: list[str]) -> int:
    """Start the servers, run the benchmarks, print the table, write the results of a full run."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(NAMES)}")
    parser.add_argument(
        "--nagle", action="store_true", help="leave Nagle's algorithm on in Prosody (its default)"
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(NAMES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; there are: {', '.join(NAMES)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="iot-gateway-bench-") as tmp:
        lab = Lab(Path(tmp), nagle=args.nagle)
        lab.start()
        try:
            results = asyncio.run(run(lab, Path(tmp), set(args.names)))
        finally:
            lab.stop()
    command = " ".join(["python -m bench", *argv])
    print(f"\n`{command}` on {machine()}:\n")
    print(table(results))
    met = [r.met for r in results if r.met is not None]
    print(f"\n{met.count(True)} of {len(met)} targets met", end="")
    if argv:
        print(f"; {RESULTS.name} is only written by a full run with the defaults")
    else:
        write(results)
        print(f"; written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
