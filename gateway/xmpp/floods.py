"""Rate limits per contact and per remote server, and a bounded budget for refusing strangers.

A contact may send `[gateway] rate_limit` commands per `rate_window` seconds. A server on the other
end of s2s speaks for every account on it (and can forge any of them): the contacts on one remote
domain together may send `domain_rate_limit` commands per window (default 5 × `rate_limit`). The
gateway's own domain has no such budget: its accounts are the gateway's own server's.

Strangers get one fixed refusal line each, but a remote server can invent JIDs without end: per
remote domain (own domain included) at most `domain_rate_limit` refusals (lines, refused
subscriptions) go out per window; beyond it strangers from that domain are ignored without an
answer, and the log says so once per window instead of once per message. Strangers have a budget
of their own, so a stranger flooding from a public provider never silences the contacts there.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque

from ..config import GatewaySection

log = logging.getLogger("iot_gateway.floods")

MEMORY = 1000  # keys (JIDs, domains) remembered by a window; the least recently seen go first


class Window:
    """Sliding-window event counters by key, for the `MEMORY` keys seen last."""

    def __init__(self, memory: int = MEMORY):
        self.memory = memory
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def used(self, key: str, now: float, seconds: float) -> int:
        """Events counted for `key` in the `seconds` before `now` (time.monotonic())."""
        q = self._events.get(key)
        if q is None:
            return 0
        self._events.move_to_end(key)
        while q and now - q[0] > seconds:
            q.popleft()
        return len(q)

    def count(self, key: str, now: float) -> None:
        """Count one event for `key` at `now`."""
        q = self._events.get(key)
        if q is None:
            q = self._events[key] = deque()
            while len(self._events) > self.memory:
                self._events.popitem(last=False)
        self._events.move_to_end(key)
        q.append(now)


def domain_of(jid: str) -> str:
    """The domain of a bare or full JID, in lower case."""
    bare = jid.partition("/")[0]
    return bare.rpartition("@")[2].lower()


class Floods:
    """The gateway's rate limits: `allow(jid)` for a contact's command, `refuse_stranger(jid)` for
    whether a stranger may be sent a refusal. `own` is the gateway's own domain."""

    def __init__(self, g: GatewaySection, own: str):
        self.g = g
        self.own = own.lower()
        # Limits are read from `g` at each use: a config changed while running (tests) takes effect.
        self.contacts = Window()
        self.domains = Window()
        self.strangers = Window()
        self._silenced: dict[str, int] = {}  # domain → strangers ignored unanswered in this episode

    def allow(self, jid: str) -> str | None:
        """Count a contact's command: None if within the limits, else the notice to send (once)."""
        now, domain, g = time.monotonic(), domain_of(jid), self.g
        if self.contacts.used(jid, now, g.rate_window) >= g.rate_limit:
            return f"Slow down: at most {g.rate_limit} commands per {g.rate_window:g} s. Ignoring your messages until then."
        if domain != self.own and self.domains.used(domain, now, g.rate_window) >= g.domain_limit:
            return (f"Slow down: the accounts on {domain} together sent more than {g.domain_limit} commands in "
                    f"{g.rate_window:g} s. Ignoring messages from {domain} until then.")
        self.contacts.count(jid, now)
        if domain != self.own:
            self.domains.count(domain, now)
        return None

    def refuse_stranger(self, jid: str) -> bool:
        """Whether a refusal may be sent to stranger `jid` now (counted), or they are ignored silently."""
        now, domain = time.monotonic(), domain_of(jid)
        if self.strangers.used(domain, now, self.g.rate_window) >= self.g.domain_limit:
            ignored = self._silenced.get(domain, 0)
            if not ignored:
                log.warning("strangers from %s: more than %d in %g s; ignoring them unanswered until it passes",
                            domain, self.g.domain_limit, self.g.rate_window)
                while len(self._silenced) >= MEMORY:
                    self._silenced.pop(next(iter(self._silenced)))
            self._silenced[domain] = ignored + 1
            return False
        ignored = self._silenced.pop(domain, 0)
        if ignored:
            log.warning("strangers from %s: %d ignored unanswered", domain, ignored)
        self.strangers.count(domain, now)
        return True
