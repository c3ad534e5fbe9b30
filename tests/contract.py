"""The contract every driver keeps, checked the same way for each (their tests call it):

- started, its device is healthy;
- a set of a writable field is applied (the device reported it) or only `sent` (nothing can
  report it), as the driver declares, and the hub holds the value;
- when the device fails, its health says so with a reason, and what was read stays;
  mended, it is healthy again;
- stopped, an output with a safe value is at that value.

Each driver's tests give the device's own ways to fail and to read the real output
(a MockFactory pin, a socat pty, a sysfs file, a Mosquitto client), so the contract
runs against the real thing.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.auth import Actor
from gateway.hub import Health, Hub
from tests.helpers import until

ADMIN = Actor("contract@example.org", "admin", "test")
Step = Callable[[], Awaitable[Any] | Any]


@dataclass
class Contract:
    """What a driver's test tells the contract about its running device."""

    hub: Hub
    device: str
    stop: Step  # how the test stops the device's driver (or the whole gateway)
    # Writable fields, a value to set each, and whether the driver confirms it (False: `sent` only).
    writes: list[tuple[str, Any, bool]] = field(default_factory=list)
    fail: Step | None = None  # make the device fail (unplug it, let it vanish, say it is offline)
    mend: Step | None = None  # and come back
    # A field with a safe value, how to read the real output, and that value.
    safe: tuple[str, Callable[[], Any], Any] | None = None
    timeout: float = 10.0


async def _run(step: Step) -> None:
    result = step()
    if inspect.isawaitable(result):
        await result


async def driver_contract(c: Contract) -> None:
    """Check the contract on a started device, which it stops at the end (with `c.stop`)."""
    hub = c.hub
    node = hub.nodes[c.device]
    await until(lambda: node.health.state is Health.OK, f"{c.device} healthy after start", c.timeout)
    for name, value, confirmed in c.writes:
        written = await hub.write(f"{c.device}.{name}", value, ADMIN)
        assert written.sent is not confirmed, f"{c.device}.{name}: confirmed={confirmed}, but sent={written.sent}"
        assert hub.field(f"{c.device}.{name}").latest.value == written[1]
    if c.fail is not None:
        read = [f.ref for f in node.fields.values() if f.latest is not None]
        await _run(c.fail)
        await until(lambda: node.health.state is not Health.OK, f"{c.device} unhealthy after failing", c.timeout)
        assert node.health.reason, f"{c.device}: health {node.health.state} without a reason"
        assert all(hub.field(ref).latest is not None for ref in read), f"{c.device}: readings were lost"
        if c.mend is not None:
            await _run(c.mend)
            await until(lambda: node.health.state is Health.OK, f"{c.device} healthy again", c.timeout)
    await _run(c.stop)
    if c.safe is not None:
        name, read, value = c.safe
        assert read() == value, f"{c.device}.{name} is {read()!r} after stop, not its safe value {value!r}"
