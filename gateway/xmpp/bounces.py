"""Messages to contacts that came back as errors ("bounces"), held and sent again later.

A contact on another server is reached through s2s: when their server is down, the gateway's own
server accepts each message (and acknowledges it, XEP-0198) and only then answers with
`<message type='error'>` (`remote-server-not-found`). Here such an error is matched by stanza id to
what was sent, logged once per contact and cause, and what bounced is held per contact (bounded,
oldest dropped and counted) until the contact is reachable again: their presence comes back, a
message of theirs arrives, or a ping to their server succeeds (tried every PROBE_EVERY seconds). Then the contact is told how many
messages were delayed and gets them again, in order, stamped (XEP-0203) with when they happened.

Errors that will not heal by waiting (`forbidden`, `service-unavailable` from a contact who blocked
the gateway, …) are not retried: what bounced is dropped (counted), and the contact stays listed in
`status` until their presence comes back.

Nothing here sends or parses XML beyond reading an error's id, sender and condition: the session
(gateway/xmpp.py) gives the callables that send and ping. Errors are input from outside: one only
counts for the contact it comes from, and only a transient one for a message we sent can make the
gateway hold anything.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..values import age
from ..watches import Alert

log = logging.getLogger("iot_gateway.bounces")

SENT_MEMORY = 1000  # ids of recent messages to contacts, so an error reply can be matched
HELD_MAX = 100  # messages held per unreachable contact; the oldest go first (counted)
MAX_TEXT = 120  # characters of a remote server's error text kept for the log and `status`
PROBE_EVERY = 30.0  # seconds between pings to an unreachable contact's server
# Conditions that say "not now" rather than "never" (RFC 6120 8.3.3): retried. Every other
# condition, unless the error's type is `wait`, is taken as final.
TRANSIENT = frozenset({
    "remote-server-not-found", "remote-server-timeout", "recipient-unavailable",
    "resource-constraint", "internal-server-error",
})
# The contact's server cannot be reached: whoever the message went to, the contact is cut off.
SERVER_DOWN = frozenset({"remote-server-not-found", "remote-server-timeout"})


@dataclass
class Sent:
    """A message the gateway sent one contact, remembered in case it bounces."""

    seq: int  # order of sending: what bounced goes out again in this order
    jid: str  # the contact's bare JID
    text: str
    time: float  # when it happened (an alert's time) or was first sent
    alert: bool  # an alert (counted in the note); else an answer
    note: bool = False  # our own "N alerts were delayed" note: not held again


@dataclass
class Unreachable:
    """A contact whose server (or the contact) refused or could not take our messages."""

    since: float
    cause: str  # the error's condition, and its text if any (`remote-server-not-found (certificate …)`)
    final: bool  # will not heal by waiting: nothing held, nothing retried
    held: list[Sent] = field(default_factory=list)
    dropped: int = 0  # held messages pushed out by newer ones, or dropped as the error was final
    logged: set[str] = field(default_factory=set)


class Bounces:
    """Error replies matched to what the gateway sent; held messages sent again when the contact is back.

    `resend(sent)` sends one held message again (stamped); `note(jid, text)` tells a contact how many
    follow; `probe(domain)` pings a server and says whether it answered; `online()`: is the session up;
    `present(jid)`: whether the contact has a client online now (their presence says so).
    """

    def __init__(
        self,
        resend: Callable[[Sent], None],
        note: Callable[[str, str], None],
        probe: Callable[[str], Awaitable[bool]],
        online: Callable[[], bool],
        present: Callable[[str], bool] = lambda jid: False,
    ):
        self._resend = resend
        self._note = note
        self._probe = probe
        self._online = online
        self._present = present
        self._sent: OrderedDict[str, Sent] = OrderedDict()
        self._seq = 0
        self.unreachable: dict[str, Unreachable] = {}
        self._prober: asyncio.Task[None] | None = None

    def next_seq(self) -> int:
        """A sequence number for a message about to be sent or held."""
        self._seq += 1
        return self._seq

    def sent(self, msg_id: str, jid: str, text: str, when: float, alert: bool, note: bool = False) -> None:
        """Remember a message sent to contact `jid` under stanza id `msg_id`."""
        if not msg_id or msg_id in self._sent:
            return
        self._sent[msg_id] = Sent(self.next_seq(), jid.lower(), text, when, alert, note)
        while len(self._sent) > SENT_MEMORY:
            self._sent.popitem(last=False)

    def holding(self, jid: str) -> bool:
        """True while messages for `jid` are held rather than sent (their server is down)."""
        u = self.unreachable.get(jid.lower())
        return u is not None and not u.final

    def hold(self, jid: str, text: str, when: float, alert: bool) -> None:
        """Hold a message for an unreachable contact, to go out when they are back."""
        u = self.unreachable[jid.lower()]
        self._keep(u, Sent(self.next_seq(), jid.lower(), text, when, alert))

    def bounced(self, sender: str, msg_id: str, condition: str, etype: str, text: str = "") -> None:
        """An error reply from `sender` (a JID) to our message `msg_id`: its condition, type and text."""
        frm, _, resource = sender.lower().partition("/")
        sent = self._sent.get(msg_id)
        if sent is None or sent.jid != frm:
            # Not a reply to anything we sent that contact: it holds nothing and marks nobody.
            log.debug("error from %s to an unknown message %r (%s): ignored", frm, msg_id[:40], condition[:40])
            return
        if condition not in SERVER_DOWN and (resource or self._present(frm)):
            # One of the contact's clients is gone (a hibernated session that expired, XEP-0198,
            # bounces what it held, from the bare JID when sent to it): their account still takes
            # messages, and a client of theirs online got it too. Nothing to hold.
            log.info("message to %s not delivered to one of their clients (%s)", frm, condition[:40])
            return
        del self._sent[msg_id]
        final = condition not in TRANSIENT and etype != "wait"
        # The text comes from a remote server: one short line of it.
        said = " ".join(text.split())[:MAX_TEXT]
        cause = f"{condition} ({said})" if said else condition
        u = self.unreachable.get(frm)
        if u is None or u.final != final:
            # A final error after transient ones: what was held will not be sent either (counted).
            dropped = u.dropped + len(u.held) if u is not None else 0
            u = self.unreachable[frm] = Unreachable(time.time(), cause, final, dropped=dropped)
        u.cause = cause
        if condition not in u.logged:
            u.logged.add(condition)
            if final:
                log.warning("cannot reach %s: %s (will not retry; what bounced is dropped)", frm, cause)
            else:
                log.warning("cannot reach %s: %s; holding what bounced until they are back", frm, cause)
        if final:
            u.dropped += 0 if sent.note else 1
            return
        if not sent.note:
            self._keep(u, sent)
        self._start_probe()

    def _keep(self, u: Unreachable, sent: Sent) -> None:
        seqs = [s.seq for s in u.held]
        u.held.insert(bisect.bisect(seqs, sent.seq), sent)
        while len(u.held) > HELD_MAX:
            u.held.pop(0)
            u.dropped += 1

    def reachable(self, jid: str) -> None:
        """`jid` is back (their presence came, or their server answered a ping): send what was held."""
        u = self.unreachable.pop(jid.lower(), None)
        if u is None:
            return
        if u.final:
            log.info("%s is back (was: %s)", jid, u.cause)
            return
        alerts = sum(1 for s in u.held if s.alert)
        others = len(u.held) - alerts
        log.info("%s is reachable again: sending %d held messages", jid, len(u.held))
        if u.held or u.dropped:
            self._note(jid, _delayed_note(u, alerts, others))
        for s in u.held:
            self._resend(s)

    def describe(self) -> list[str]:
        """One line per contact the gateway cannot reach, for `status`."""
        now = time.time()
        lines = []
        for jid, u in self.unreachable.items():
            since = dt.datetime.fromtimestamp(u.since, dt.timezone.utc).strftime("%H:%M:%S UTC")
            what = "not retried" if u.final else f"{len(u.held)} held"
            dropped = f", {u.dropped} dropped" if u.dropped else ""
            lines.append(f"cannot reach {jid} since {since} ({age(now - u.since)} ago): {u.cause}; {what}{dropped}")
        return lines

    def _start_probe(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.ensure_future(self._probe_loop())

    async def _probe_loop(self) -> None:
        """While contacts wait for their server: ping each such server now and then."""
        while any(not u.final for u in self.unreachable.values()):
            await asyncio.sleep(PROBE_EVERY)
            if not self._online():
                continue
            waiting = [jid for jid, u in self.unreachable.items() if not u.final]
            for domain in dict.fromkeys(j.partition("@")[2] or j for j in waiting):
                if await self._probe(domain):
                    for jid in waiting:
                        if (jid.partition("@")[2] or jid) == domain:
                            self.reachable(jid)

    def stop(self) -> None:
        """Stop probing (the session is stopping)."""
        if self._prober is not None:
            self._prober.cancel()


def _delayed_note(u: Unreachable, alerts: int, others: int) -> str:
    since = dt.datetime.fromtimestamp(u.since, dt.timezone.utc).strftime("%H:%M:%S UTC")
    parts = [_count(alerts, "alert")] if alerts else []
    if others:
        parts.append(_count(others, "other message" if alerts else "message"))
    follow = "follows" if alerts + others == 1 else "follow"
    text = f"Delayed: your server could not be reached from here since {since} ({u.cause})."
    if parts:
        text += f" {' and '.join(parts)} {follow}, each stamped with when it happened."
    if u.dropped:
        text += f" {_count(u.dropped, 'older one')} could not be kept (at most {HELD_MAX})."
    return text


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def alert_for(sent: Sent) -> Alert:
    """A held message as an alert to its one contact, to go out again through the alert path."""
    return Alert(sent.text, sent.time, (sent.jid,))
