"""A contact's new OMEMO devices, told to the admins in one notice per contact per hour.

A web client (Converse.js) is a new OMEMO device in every browser session: one
notice per device would bury the admins. The trust decision itself is taken at
once, as before (blind trust, or distrust once a device of that contact is
verified); only the notice waits. The first new device of a contact is told
after a few seconds (time for the rest of a burst to arrive); the ones that
come within the hour after a notice are gathered into the next, at the end of
that hour. Each device is logged at once. Kept in memory: a restart forgets
the hour and drops a held notice (its devices are in the log and in `devices`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("iot_gateway.omemo")

GATHER = 3.0  # seconds to wait for the rest of a burst before the first notice of a contact
EVERY = 3600.0  # seconds between two notices about one contact's devices
LISTED = 20  # devices named in one notice; the rest are counted
HELD = 500  # devices held per contact (a flood of devices on a contact's account is counted, not kept)


@dataclass(frozen=True)
class NewDevice:
    """One new device of a contact, with the trust decision already taken."""

    id: int
    fingerprint: str  # as clients show it: eight groups of eight hex digits
    trusted: bool  # blindly trusted; False: distrusted until an admin trusts it


class TrustNotices:
    """Gathers new devices per contact; `tell` (a coroutine function taking the text) reaches the admins."""

    def __init__(self, tell: Callable[[str], Awaitable[None]]) -> None:
        self.tell = tell
        self.gather = GATHER
        self.every = EVERY
        self._held: dict[str, dict[int, NewDevice]] = {}
        self._dropped: dict[str, int] = {}
        self._last: dict[str, float] = {}  # contact -> when its last notice went
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, jid: str, device: NewDevice) -> None:
        """Note a new device of contact `jid`; its notice goes with the contact's next one."""
        hexfp = "".join(device.fingerprint.split())
        log.warning("OMEMO: new device %d of %s %s, fingerprint %s", device.id, jid,
                    "trusted on first use" if device.trusted else "NOT trusted (another device of theirs is verified)",
                    hexfp)
        held = self._held.setdefault(jid, {})
        if device.id in held or len(held) < HELD:
            held[device.id] = device
        else:
            self._dropped[jid] = self._dropped.get(jid, 0) + 1
        if jid not in self._timers:
            wait = max(self.gather, self._last.get(jid, -self.every) + self.every - time.monotonic())
            self._timers[jid] = asyncio.get_running_loop().call_later(wait, self._flush, jid)

    def _flush(self, jid: str) -> None:
        self._timers.pop(jid, None)
        held = self._held.pop(jid, {})
        dropped = self._dropped.pop(jid, 0)
        if not held:
            return
        self._last[jid] = time.monotonic()
        asyncio.ensure_future(self.tell(notice(jid, list(held.values()), dropped)))

    def stop(self) -> None:
        """Drop the held notices (the gateway stops; each device was logged)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._held.clear()


def notice(jid: str, devices: list[NewDevice], dropped: int = 0) -> str:
    """The admins' notice about `devices` of `jid`, with the command that reverses each decision."""
    if len(devices) == 1 and not dropped:
        d = devices[0]
        if d.trusted:
            return (f"OMEMO: new device {d.id} of {jid}, trusted on first use. Fingerprint:\n{d.fingerprint}\n"
                    f"If it is not theirs: distrust {jid} {_hex(d.fingerprint)}")
        return (f"OMEMO: new device {d.id} of {jid} NOT trusted (another device of theirs is verified). "
                f"Fingerprint:\n{d.fingerprint}\nIf it is theirs: trust {jid} {_hex(d.fingerprint)}")
    lines = [f"OMEMO: {len(devices) + dropped} new devices of {jid}:"]
    for d in sorted(devices, key=lambda d: d.id)[:LISTED]:
        if d.trusted:
            lines += [f"{d.id}, trusted on first use:", d.fingerprint,
                      f"If it is not theirs: distrust {jid} {_hex(d.fingerprint)}"]
        else:
            lines += [f"{d.id}, NOT trusted (another device of theirs is verified):", d.fingerprint,
                      f"If it is theirs: trust {jid} {_hex(d.fingerprint)}"]
    more = len(devices) + dropped - min(len(devices), LISTED)
    if more:
        lines.append(f"and {more} more: see `devices {jid}`")
    return "\n".join(lines)


def _hex(fingerprint: str) -> str:
    return "".join(fingerprint.split()).lower()
