"""What every driver is: a small class with async start()/stop() that pushes
readings into the hub and accepts writes for its writable fields."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from gateway.configbase import DeviceBase
from gateway.hub import Health, Hub, NotWritable
from gateway.values import Value

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.state import StateDir

D = TypeVar("D", bound=DeviceBase)
log = logging.getLogger("iot_gateway.devices")


@dataclass
class Context:
    """What drivers get besides their own config: the hub, the whole config,
    and a place to share one resource (say, one MQTT client) among devices."""

    hub: Hub
    config: "Config"
    shared: dict[str, Any] = field(default_factory=dict)
    # Another process (the gateway) runs this config and owns its sessions; this one (a console
    # next to it) must take none of them: e.g. its own MQTT client id, with no persistent session.
    guest: bool = False
    # The state folder, for what a driver keeps across restarts (the node ids of discovered devices).
    state: "StateDir | None" = None


class Driver(Generic[D]):
    """Base class for device drivers.

    Subclasses implement `start()` and `stop()`, call `push()` for readings and
    `health()` for state changes, and override `write()` if they have writable
    fields. `write()` is only called with values already validated against
    the field's type and bounds.
    """

    def __init__(self, device: D, ctx: Context):
        self.device = device
        self.ctx = ctx
        self.hub = ctx.hub
        self.id = device.id
        self._tasks: set[asyncio.Task[Any]] = set()
        self.about = ""
        """One line for `status` on how the device is driven once started (the GPIO pin factory); "" for none."""

    async def start(self) -> None:
        """Open the device and begin pushing readings. Errors are reported as device health."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Release the device (outputs to their safe value). Must not raise."""
        raise NotImplementedError

    async def write(self, field: str, value: Value) -> None:
        """Apply a validated value to a writable field; raise with a reason on failure."""
        raise NotWritable(f"{self.id}.{field} is read-only")

    def push(self, field: str, value: Any, at: float | None = None) -> None:
        """Hand a reading to the hub (any thread)."""
        self.hub.push(self.id, field, value, at)

    def health(self, state: Health, reason: str = "") -> None:
        """Report the device's health to the hub (any thread)."""
        self.hub.set_health(self.id, state, reason)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run a background task for this device; if it dies of an error, the device goes to `error`."""
        task = asyncio.create_task(coro, name=f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel and await every task started with `spawn`."""
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("%s: driver task %s failed", self.id, task.get_name(), exc_info=exc)
        self.health(Health.ERROR, f"driver failed: {type(exc).__name__}: {exc}")
