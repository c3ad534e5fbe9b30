"""Small helpers several test modules share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from gateway.app import Gateway
from gateway.config import parse


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Wait for `pred()` to hold, polling the loop; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(tmp_path: Path, *devices: dict[str, Any]) -> AsyncIterator[Gateway]:
    """A started gateway (no XMPP) with these devices and its state under `tmp_path`; stopped on exit."""
    config = parse({"gateway": {"state_dir": str(tmp_path / "state")}, "devices": list(devices)})
    gw = Gateway(config)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


async def answering(peer: Any, jid: str, prefix: str, alive: Callable[[], bool] = lambda: True) -> str:
    """Ask a gateway process `status` until its answer starts with `prefix` (it needs a moment to
    come online); return the last answer. Fails at once if `alive()` turns false, else after 20 s.
    Late replies to the polling are drained before returning."""
    status = ""
    for _ in range(40):
        try:
            status = await peer.ask(jid, "status", timeout=0.5)
        except TimeoutError:
            assert alive(), "the gateway process has exited"
            continue
        if status.startswith(prefix):
            break
    await asyncio.sleep(0.5)  # let replies to earlier polls (and "sent while offline" ones) arrive
    peer.drain()
    return status
