"""The gateway's XMPP link: connecting, noticing a dead link, and one way back.

slixmpp can reconnect by itself in several places (its connect loop's own
backoff, the XEP-0199 keepalive's `reconnect()`); two of them racing after a
stall gave overlapping streams, parse errors and a new session instead of a
resumed one. Here there is one path: every loss of the link ends in the
`disconnected` event (or `connection_failed`), and `_schedule` picks the wait
by cause:

- a drop: about 1, 2, 4 … s, capped at a minute; the count starts over only
  once a session has stayed up for STABLE_AFTER seconds, so a link that drops
  right after every login does not hammer the server;
- `<conflict/>`: another client logged in with the same JID and resource (a
  second gateway from a cloned SD card): minutes, doubling, said once in the
  log, in systemd's status and to the admins (a hub problem);
- a refused login: slowly, logged once per cause; a password fixed on the
  server starts working without a restart.

A dead link (a stalled server, a silent partition) is noticed by our own
XEP-0199 pings, every `keepalive` seconds, each answered within
`ping_timeout`. The connection is then aborted without closing the stream, so
the server keeps the session and the next connection resumes it (XEP-0198).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable

import slixmpp
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream import StanzaBase

from ..config import XmppSection
from ..hub import Hub

log = logging.getLogger("iot_gateway.xmpp")

PROBLEM = "xmpp"  # the component name in the hub's problems
BACKOFF_MAX = 60.0  # seconds: the longest wait after a plain drop
STABLE_AFTER = 60.0  # seconds a session must stay up before the backoff starts over
CONFLICT_FIRST = 120.0  # seconds after another client took our resource, doubling ...
CONFLICT_MAX = 1800.0  # ... up to this
CONFLICT_QUIET = 600.0  # seconds up without a conflict before the twin counts as gone (at least)
AUTH_FIRST = 60.0  # seconds after a refused login, doubling ...
AUTH_MAX = 600.0  # ... up to this
NEGOTIATE_TIMEOUT = 30.0  # seconds from TCP connect to a session, else the attempt is dropped
SASL_LOGGER = "slixmpp.features.feature_mechanisms.mechanisms"


def jitter(seconds: float) -> float:
    """`seconds` ±25 %, so gateways that lost the same server do not come back in step."""
    return seconds * random.uniform(0.75, 1.25)


class Link:
    """Connects the session's slixmpp client and brings it back by one path; knows why it is offline."""

    def __init__(self, client: slixmpp.ClientXMPP, xcfg: XmppSection, hub: Hub):
        self.client = client
        self.xcfg = xcfg
        self.hub = hub
        self.stopping = False
        self.reason: str | None = None  # why the link is down, for systemd's status; None: no known cause
        self.waits: deque[float] = deque(maxlen=50)  # the reconnect waits chosen, newest last
        self.up_at: float | None = None  # time.monotonic() when the current session came up
        self._attempt = 0  # drops since the last session that stayed up STABLE_AFTER
        self._conflicts = 0  # conflicts since the last quiet stretch
        self._auth_fails = 0
        self._cause: str | None = None  # "conflict", "auth:<condition>", "unreachable:<error>"
        self._logged: str | None = None  # the cause last logged: each is logged once
        self._reconnect: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        c = client
        c.add_event_handler("connected", self._on_connected)
        c.add_event_handler("session_start", self._on_up)
        c.add_event_handler("session_resumed", self._on_up)
        c.add_event_handler("disconnected", self._on_disconnected)
        c.add_event_handler("failed_auth", self._on_failed_auth)
        c.add_event_handler("connection_failed", self._on_connection_failed)
        c.add_event_handler("stream_error", self._on_stream_error)
        c.add_event_handler("ssl_invalid_chain", self._on_untrusted)
        # After a refused password slixmpp adds "No appropriate login method.", which misleads.
        logging.getLogger(SASL_LOGGER).addFilter(self._quiet_sasl)

    @property
    def who(self) -> str:
        """`jid/resource`, as the server and a twin see it."""
        return f"{self.xcfg.jid}/{self.xcfg.resource}"

    # ------------------------------------------------------------ start, stop

    def connect(self) -> None:
        """Start connecting (again)."""
        self.stopping = False
        addr = self.xcfg.address
        if addr is None:
            self.client.connect()
        else:
            self.client.connect(addr[0], addr[1])

    def close(self) -> None:
        """No reconnect from now on; stop the pings and timers."""
        self.stopping = True
        for task in (self._reconnect, self._keepalive):
            if task is not None:
                task.cancel()
        self._cancel_timers()
        self.client.cancel_connection_attempt()
        logging.getLogger(SASL_LOGGER).removeFilter(self._quiet_sasl)

    def _quiet_sasl(self, record: logging.LogRecord) -> bool:
        return not (self._cause or "").startswith("auth:") or "No appropriate login method" not in record.getMessage()

    # ------------------------------------------------------------ events

    def _on_connected(self, _event: object) -> None:
        self._arm("negotiate", NEGOTIATE_TIMEOUT, self._negotiation_stalled)

    def _negotiation_stalled(self) -> None:
        if self.up_at is None and self.client.transport is not None:
            log.warning("connected to the XMPP server, but no session after %g s; trying again", NEGOTIATE_TIMEOUT)
            self.client.abort()

    def _on_up(self, _event: object) -> None:
        self._cancel_timers()
        self.up_at = time.monotonic()
        if self._logged is not None and self._logged != "conflict":
            log.warning("XMPP session up again as %s", self.who)
            self._logged = None
        self._cause = None
        self.reason = None
        self._arm("stable", STABLE_AFTER, self._stable)
        if self._conflicts:
            last = self.waits[-1] if self.waits else 0.0
            self._arm("quiet", max(CONFLICT_QUIET, 2 * last), self._twin_gone)
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive = asyncio.ensure_future(self._ping_loop())

    def _stable(self) -> None:
        self._attempt = 0
        self._auth_fails = 0

    def _twin_gone(self) -> None:
        log.warning("no other client has taken %s for a while: the conflict is over", self.who)
        self._conflicts = 0
        self._logged = None
        self.hub.set_problem(PROBLEM, None)

    def _on_disconnected(self, reason: object) -> None:
        self._cancel_timers()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        was_up, self.up_at = self.up_at is not None, None
        if self.stopping:
            return
        if was_up and self._cause != "conflict":
            log.warning("disconnected from the XMPP server: %s", reason or "connection lost")
        self._schedule()

    def _on_stream_error(self, error: StanzaBase) -> None:
        condition = error["condition"]
        if condition == "conflict":
            self._cause = "conflict"
            self.reason = f"XMPP offline: another gateway is using {self.who}"
            self._say(
                "conflict",
                logging.ERROR,
                f"another gateway is using {self.who}: the server closed this session because another "
                "client logged in with the same JID and resource (a copy of this gateway, e.g. from a "
                "cloned SD card?). Trying again only every few minutes; give each gateway its own "
                "account or [xmpp] resource",
            )
            self.hub.set_problem(PROBLEM, f"another gateway is using {self.who}")
        else:
            text = error["text"]
            self._say(f"stream:{condition}", logging.WARNING,
                      f"the XMPP server closed the stream: {condition}" + (f" ({text})" if text else ""))

    def _on_failed_auth(self, stanza: StanzaBase) -> None:
        condition = stanza["condition"] or "not-authorized"
        self._cause = f"auth:{condition}"
        if condition == "not-authorized":
            self.reason = f"XMPP login refused: wrong password for {self.xcfg.jid}"
            what = (
                "fix [xmpp] password, password_file or $IOT_GATEWAY_XMPP_PASSWORD, "
                "or the account's password on the server"
            )
        else:
            self.reason = f"XMPP login refused for {self.xcfg.jid}: {condition}"
            what = "check the account on the server"
        self._say(self._cause, logging.ERROR,
                  f"{self.reason}: {what}. Retrying every few minutes; no restart needed once it is fixed")

    def _on_untrusted(self, err: object) -> None:
        """The server's TLS certificate did not verify: never log in, say why and how to fix it."""
        self._cause = f"tls:{err}"
        self.reason = f"XMPP offline: the server's TLS certificate is not trusted ({err})"
        self._say(
            self._cause,
            logging.ERROR,
            f"the XMPP server's TLS certificate is not trusted: {err}. If the server uses a private CA, "
            "set [xmpp] ca_file to that CA's certificate",
        )
        self.client.disconnect()  # slixmpp does this itself only when nobody handles the event

    def _on_connection_failed(self, err: object) -> None:
        # Take retries over from slixmpp, whose own backoff grows to 5 minutes.
        self.client.cancel_connection_attempt()
        self._cause = f"unreachable:{err}"
        self.reason = f"XMPP offline: cannot reach the server: {err}"
        self._say(self._cause, logging.WARNING, f"cannot reach the XMPP server: {err}")
        self._schedule()

    # ------------------------------------------------------------ the one way back

    def _schedule(self) -> None:
        if self.stopping or (self._reconnect is not None and not self._reconnect.done()):
            return
        wait = self._next_wait()
        self.waits.append(wait)
        log.info("reconnecting in %.1f s", wait)
        self._reconnect = asyncio.ensure_future(self._reconnect_after(wait))

    def _next_wait(self) -> float:
        if self._cause == "conflict":
            self._conflicts += 1
            return jitter(min(CONFLICT_MAX, CONFLICT_FIRST * 2 ** min(self._conflicts - 1, 10)))
        if (self._cause or "").startswith("auth:"):
            self._auth_fails += 1
            return jitter(min(AUTH_MAX, AUTH_FIRST * 2 ** min(self._auth_fails - 1, 10)))
        self._attempt += 1
        return min(BACKOFF_MAX, jitter(2 ** min(self._attempt - 1, 6)))

    async def _reconnect_after(self, wait: float) -> None:
        await asyncio.sleep(wait)
        c = self.client
        if not self.stopping and c.transport is None and not c.is_connecting():
            self.connect()

    async def _ping_loop(self) -> None:
        ping = self.client.plugin["xep_0199"]
        timeout = self.xcfg.ping_timeout
        while True:
            await asyncio.sleep(self.xcfg.keepalive)
            try:
                await ping.ping(timeout=timeout)
            except IqTimeout:
                log.warning(
                    "the XMPP server did not answer a ping within %g s: the link is dead "
                    "(a stalled server or a network partition); reconnecting", timeout,
                )
                # No closing </stream>: the server keeps the session for XEP-0198 resumption.
                self.client.abort()
                return
            except IqError:
                pass  # an error reply still shows the link works

    # ------------------------------------------------------------ helpers

    def _say(self, cause: str, level: int, text: str) -> None:
        """Log `text` once per cause: the same trouble again on every retry is not news."""
        if cause == self._logged:
            log.debug("%s", text)
            return
        self._logged = cause
        log.log(level, "%s", text)

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timers(self) -> None:
        for h in self._timers.values():
            h.cancel()
        self._timers.clear()
