"""The audit trail: every actuator change and every refused attempt, with who did it."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from .auth import Actor
from .values import Value, fmt

log = logging.getLogger("iot_gateway.audit")


@dataclass(frozen=True, slots=True)
class Entry:
    """One audited attempt to set a field."""

    time: float
    actor: Actor
    ref: str
    old: Value | None
    new: Value | None
    # "applied", "sent" (went out; the device reports no state to confirm it), "unconfirmed", "refused" or "failed"
    outcome: str
    reason: str = ""

    def line(self) -> str:
        """One readable line for logs and chat."""
        text = f"{self.actor.jid} via {self.actor.via}: {self.ref} "
        if self.outcome == "applied":
            return text + f"{fmt(self.old)} -> {fmt(self.new)}"
        if self.outcome == "sent":
            return text + f"{fmt(self.new)} sent (no state reported to confirm it)"
        return text + f"{self.outcome} ({fmt(self.new)}): {self.reason}"


class AuditLog:
    """Keeps the latest entries in memory and writes each one to the audit logger."""

    def __init__(self, size: int = 1000):
        self.entries: deque[Entry] = deque(maxlen=size)

    def record(
        self,
        actor: Actor,
        ref: str,
        old: Value | None,
        new: Value | None,
        outcome: str,
        reason: str = "",
    ) -> Entry:
        """Add an entry and log it (warning level for refusals and failures)."""
        entry = Entry(time.time(), actor, ref, old, new, outcome, reason)
        self.entries.append(entry)
        log.log(logging.INFO if outcome in ("applied", "sent") else logging.WARNING, "%s", entry.line())
        return entry
