"""What the SD card sees: bytes written to the state folder per hour of history.

An hour of three devices at one reading per second (10,800 readings) goes
through the gateway's `HistoryStore` with a given flush interval, SQLite
`synchronous` and per-second limit, in a child process whose
`/proc/self/io` `write_bytes` (bytes it made the kernel send to the disk) is
read before and after. The hour is compressed: readings carry the stamps of a
real hour, and a batch is written every `flush_every` seconds of those stamps.
With `synchronous = FULL` every commit is fsynced, so the bytes are those of
real time; with NORMAL, pages dirtied twice before the kernel's writeback are
counted once here, so NORMAL looks a little better than it is.
Baseline: the raw size of the readings (field name, 8-byte time, value text).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .results import Result, Target

DEVICES = 3
SECONDS = 3600
MB = 1_000_000
# (name, flush every s, synchronous, readings per field per second written, target)
SETTINGS = [
    ("sd_writes", 60.0, "full", 2, Target("<", 4.48)),  # the defaults; issue 24: no more than before the buckets
    ("sd_writes.before", 2.0, "normal", 0, None),  # the settings before issue 13 (today's pages)
]


def _io_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


async def _hour(folder: Path, flush_every: float, sync: str, per_second: int) -> dict[str, int]:
    from gateway.history import HistoryStore, encode
    from gateway.hub import FieldSpec, Hub

    hub = Hub(1000)
    for d in range(DEVICES):
        hub.add_node(f"dev{d}", f"dev{d}", "simulated", [FieldSpec("temp")])
    hub.bind(asyncio.get_running_loop())
    store = HistoryStore(hub, folder / "history.db", flush_every=3600, sync=sync, per_second=per_second)
    await store.start()
    await store.flush()
    before = _io_write_bytes()
    raw = 0
    t0 = float(int(time.time()) // 60 * 60 - SECONDS)  # the last hour: buckets close as readings come, as in real time
    next_flush = flush_every
    for s in range(SECONDS):
        for d in range(DEVICES):
            value = round(20 + (s % 100) / 10, 2)
            hub.push(f"dev{d}", "temp", value, at=t0 + s)
            raw += len(f"dev{d}.temp") + 8 + len(encode(value))
        if s + 1 >= next_flush:
            next_flush += flush_every
            store._release(None)  # the stamps are not now: release what the second held back
            await store.flush(everything=False)  # as the periodic batches do
    await store.stop()
    return {"written": _io_write_bytes() - before, "raw": raw}


def child(argv: list[str]) -> None:
    """In the child process: one compressed hour, its numbers as JSON on stdout."""
    folder, flush_every, sync, per_second = Path(argv[0]), float(argv[1]), argv[2], int(argv[3])
    print(json.dumps(asyncio.run(_hour(folder, flush_every, sync, per_second))))


async def sd_writes(work: Path) -> list[Result]:
    """Bytes written per hour with the defaults, and with the settings before issue 13."""
    results = []
    for name, flush_every, sync, per_second, target in SETTINGS:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.sdwrites", tmp, str(flush_every), sync, str(per_second),
                stdout=subprocess.PIPE,
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"bench.sdwrites child exited with code {proc.returncode}")
            got = json.loads(out)
        results.append(
            Result(
                name,
                got["written"] / MB,
                "MB/h",
                f"raw readings, {DEVICES} devices at 1/s (flush every {flush_every:g} s, "
                f"synchronous {sync.upper()}, {per_second or 'all'} per field per s)",
                got["raw"] / MB,
                target,
            )
        )
    return results


if __name__ == "__main__":
    child(sys.argv[1:])
