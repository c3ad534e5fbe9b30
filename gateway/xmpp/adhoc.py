"""Ad-hoc commands (XEP-0050) for GUI clients such as Gajim and Psi:
`Read sensors`, `Set actuator` (a typed, bounded data form) and `Status`.

Same roles as chat: viewers may read, operators and admins may set; strangers
get `forbidden`. Sets go through the hub, which checks and audits them.

slixmpp's xep_0050 keeps sessions in a plain dict keyed by session id and runs
any step whose id matches, whoever sends it; it keeps even finished sessions,
and it empties the command list when the session is bound. `BoundCommands`, a
subclass registered under its own name, fixes that in three overrides: every
step is checked against the starter (full JID) and their current role before
dispatch, sessions live in a bounded, expiring `SessionStore`, and the commands
are registered on every bind and listed per requester (a disco#items node
handler). A subclass rather than patching the stock instance: the one dispatch
method and `session_bind` are overridden in plain sight, the rest is inherited.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from slixmpp import JID
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0004 import Form
from slixmpp.plugins.xep_0030.stanza import DiscoItems
from slixmpp.plugins.xep_0050 import XEP_0050, Command
from slixmpp.stanza import Iq

from ..auth import Actor, Forbidden, Permission, allowed, require
from ..hub import Field, HubError
from ..values import BadValue, Value, age, check_bounds, coerce, fmt
from .frontend import Door, FrontEnd


log = logging.getLogger("iot_gateway.adhoc")

XDV_TYPES = {"integer": "xs:integer", "numeric": "xs:double", "string": "xs:string"}

SESSION_IDLE = 300.0  # seconds without a step before an open session is dropped
SESSIONS_PER_JID = 10  # open sessions per account; a new one drops that account's oldest
SESSIONS_TOTAL = 500  # open sessions in all; a new one drops the least recently used

SessionDict = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Offer:
    """A command the gateway offers: node, name, first-step handler, permission needed."""

    node: str
    name: str
    handler: Callable[[Iq, SessionDict], Any]
    perm: Permission


@dataclass(slots=True)
class _Entry:
    session: SessionDict
    owner: str  # bare JID of the starter
    last: float  # clock() at the last step


class SessionStore(MutableMapping[str, SessionDict]):
    """Open ad-hoc sessions, bounded per account and in total, dropped after `idle` seconds.

    The xep_0050 plugin stores a session after every step; a session without a
    next step (finished) is not kept. Expired sessions are dropped whenever the
    store is read or written. Deleting a missing id is a no-op: the plugin
    deletes after an awaited handler, by which time the session may be gone.
    """

    def __init__(
        self,
        idle: float = SESSION_IDLE,
        per_jid: int = SESSIONS_PER_JID,
        max_total: int = SESSIONS_TOTAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.idle = idle
        self.per_jid = per_jid
        self.max_total = max_total
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first

    def prune(self) -> None:
        """Drop the sessions idle for longer than `idle`."""
        limit = self.clock() - self.idle
        while self._entries:
            sid, entry = next(iter(self._entries.items()))
            if entry.last > limit:
                break
            del self._entries[sid]
            log.info("ad-hoc session %s of %s expired", sid, entry.owner)

    def __getitem__(self, sid: str) -> SessionDict:
        self.prune()
        return self._entries[sid].session

    def __setitem__(self, sid: str, session: SessionDict) -> None:
        self.prune()
        if session.get("next") is None:
            self._entries.pop(sid, None)
            return
        entry = self._entries.pop(sid, None)
        if entry is None:
            owner = JID(session["from"]).bare
            mine = [k for k, e in self._entries.items() if e.owner == owner]
            for old in mine[: max(0, len(mine) - self.per_jid + 1)]:
                del self._entries[old]
            while self._entries and len(self._entries) >= self.max_total:
                self._entries.popitem(last=False)
            entry = _Entry(session, owner, 0.0)
        entry.session = session
        entry.last = self.clock()
        self._entries[sid] = entry

    def __delitem__(self, sid: str) -> None:
        self._entries.pop(sid, None)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def _refuse(iq: Iq, session: SessionDict) -> None:
    raise XMPPError("forbidden", text="Not allowed.")


def _hidden(jid: JID, offer: Offer) -> bool:
    return False


class BoundCommands(XEP_0050):
    """XEP-0050 whose sessions are bound to their starter, bounded and expiring,
    whose commands survive every bind, and whose command list depends on who asks.

    Set `check_step` (raises XMPPError to refuse a step) and `may_list` (whether
    a requester sees an offer); both refuse everything until set.
    """

    name = "iot_adhoc"
    description = "XEP-0050: Ad-Hoc Commands, bound to their caller"
    dependencies = {"xep_0030", "xep_0004"}
    default_config = {"session_db": None}

    def plugin_init(self) -> None:
        super().plugin_init()
        self.sessions = SessionStore()
        self.offers: dict[str, Offer] = {}
        self.check_step: Callable[[Iq, SessionDict], None] = _refuse
        self.may_list: Callable[[JID, Offer], bool] = _hidden

    def offer(self, offer: Offer) -> None:
        """Offer a command from now on, and again after every bind."""
        self.offers[offer.node] = offer
        if self.xmpp.session_bind_event.is_set():
            self._register(offer)

    def session_bind(self, jid: Any) -> None:
        """Announce the feature and register the commands for the JID just bound."""
        super().session_bind(jid)  # this empties the static command list
        self.commands.clear()
        for offer in self.offers.values():
            self._register(offer)
        # A copy: boundjid changes in place on the next bind.
        me = JID(self.xmpp.boundjid.full)
        self.xmpp.plugin["xep_0030"].set_node_handler(
            "get_items", jid=me, node=Command.namespace, handler=self._list
        )

    def _register(self, offer: Offer) -> None:
        self.add_command(jid=self.xmpp.boundjid, node=offer.node, name=offer.name, handler=offer.handler)

    def _list(self, jid: JID, node: str, ifrom: JID | None, data: Any) -> DiscoItems:
        """disco#items on the commands node: the commands `ifrom` may run (none for strangers)."""
        items = DiscoItems()
        items["node"] = Command.namespace
        for offer in self.offers.values():
            if ifrom is not None and self.may_list(ifrom, offer):
                items.add_item(self.xmpp.boundjid.full, offer.node, offer.name)
        return items

    async def _handle_command_all(self, iq: Iq) -> None:
        sid = iq["command"]["sessionid"]
        if not sid:
            await self._handle_command_start(iq)
            return
        # The stock plugin starts a new session for an unknown id; a step meant
        # for an expired session must not become a fresh command.
        session = self.sessions.get(sid)
        if session is None:
            raise XMPPError(
                "bad-request", etype="modify", extension="bad-sessionid", extension_ns=Command.namespace,
                text="Unknown or expired session; run the command again.",
            )
        self.check_step(iq, session)
        if iq["command"]["node"] != session["node"]:
            raise XMPPError(
                "bad-request", etype="modify", extension="bad-sessionid", extension_ns=Command.namespace,
                text=f"Session {sid} belongs to another command.",
            )
        if iq["command"]["action"] not in ("execute", "next", "prev", "complete", "cancel"):
            raise XMPPError("bad-request", etype="modify", extension="malformed-action",
                            extension_ns=Command.namespace, text="Unknown action.")
        await super()._handle_command_all(iq)


class AdHoc(FrontEnd):
    """Offers the gateway's ad-hoc commands on the session's client."""

    def __init__(self, session: Door):
        super().__init__(session)
        c = session.client
        for plugin in ("xep_0004", "xep_0122"):
            c.register_plugin(plugin)
        # Not the stock xep_0050 as well: both would answer every command.
        c.plugin.register(BoundCommands)
        self.plugin: BoundCommands = c.plugin[BoundCommands.name]
        self.plugin.check_step = self._check_step
        self.plugin.may_list = self._may_list
        for offer in (
            Offer("read", "Read sensors", self._read, Permission.READ),
            Offer("set", "Set actuator", self._set_form, Permission.SET),
            Offer("status", "Status", self._status, Permission.READ),
        ):
            self.plugin.offer(offer)

    def _may_list(self, jid: JID, offer: Offer) -> bool:
        contact = self.session.config.contact(jid.bare)
        return contact is not None and allowed(contact.role, offer.perm)

    def _check_step(self, iq: Iq, sess: SessionDict) -> None:
        """A step after the first: only from the starter's full JID, with the role it needs now."""
        offer = self.plugin.offers.get(sess["node"])
        perm = offer.perm if offer is not None else Permission.ADMIN
        frm, starter = iq["from"], sess["from"]
        if frm.full != starter.full:
            log.warning("ad-hoc %s session %s of %s: %s step from %s refused",
                        sess["node"], sess["id"], starter, iq["command"]["action"], frm)
            contact = self.session.config.contact(frm.bare)
            if contact is not None and perm is not Permission.READ:  # a submitted form is an attempted set
                who = "another client of this account" if frm.bare == starter.bare else "someone else"
                self.hub.refuse(Actor(contact.jid, contact.role, "adhoc"), self._submitted(iq),
                                f"ad-hoc session started by {who}")
            raise XMPPError("forbidden", text="This session is not yours; run the command yourself.")
        self._actor(iq, perm)

    def _actor(self, iq_or_session: Any, perm: Permission) -> Actor:
        frm = iq_or_session["from"]
        contact = self.session.config.contact(frm.bare)
        if contact is None:
            log.info("ad-hoc command refused for stranger %s", frm.bare)
            raise XMPPError("forbidden", text="Not allowed for your account.")
        actor = Actor(contact.jid, contact.role, "adhoc")
        if not allowed(contact.role, perm):
            try:
                if perm is Permission.SET:
                    # Asking for the form is not a write; submitting one is: the hub decides and
                    # audits each field it names.
                    self.hub.authorize(actor, self._submitted(iq_or_session))
                require(actor, perm)
            except Forbidden as e:
                log.info("ad-hoc %s refused for %s: %s", perm.value, contact.jid, e)
                raise XMPPError("forbidden", text=f"{e}.") from None
        return actor

    def _submitted(self, iq_or_session: Any) -> list[tuple[str, Any]]:
        """The (field, value) pairs a step's submitted form would set: the writable fields it
        names, or one `(set form)` entry for a form that names none (not one per bogus name)."""
        if not isinstance(iq_or_session, Iq) or iq_or_session["command"].xml.find(f"{{{Form.namespace}}}x") is None:
            return []
        values = iq_or_session["command"]["form"].get_values()
        writable = {f.ref for f in self._writable()}
        attempts = [(ref, v) for ref, v in values.items() if ref in writable and v not in (None, "")]
        return attempts or ([("(set form)", "")] if values else [])

    def _form(self, ftype: str, title: str) -> Any:
        return self.session.client.plugin["xep_0004"].make_form(ftype=ftype, title=title)

    # ------------------------------------------------------------ read & status

    def _read(self, iq: Iq, sess: dict[str, Any]) -> dict[str, Any]:
        self._actor(iq, Permission.READ)
        now = time.time()
        form = self._form("result", "Sensor values")
        for node in self.hub.nodes.values():
            for f in node.fields.values():
                if f.latest is None:
                    text = "no reading yet"
                else:
                    unit = f" {f.spec.unit}" if f.spec.unit else ""
                    text = f"{fmt(f.latest.value, f.spec.decimals)}{unit} ({age(now - f.latest.time)} ago)"
                if not node.health.healthy:
                    text += f" [{node.health.describe()}]"
                form.add_field(var=f.ref, ftype="text-single", label=f.ref, desc=f.spec.description, value=text)
        sess.update(payload=form, next=None, has_next=False)
        return sess

    async def _status(self, iq: Iq, sess: dict[str, Any]) -> dict[str, Any]:
        actor = self._actor(iq, Permission.READ)
        text = await self.session.commands.run("status", actor)
        sess.update(payload=None, next=None, has_next=False, notes=[("info", text)])
        return sess

    # ------------------------------------------------------------ set

    def _writable(self) -> list[Field]:
        return [f for n in self.hub.nodes.values() for f in n.fields.values() if f.spec.writable]

    def _set_form(self, iq: Iq, sess: dict[str, Any]) -> dict[str, Any]:
        self._actor(iq, Permission.SET)
        fields = self._writable()
        if not fields:
            sess.update(payload=None, next=None, notes=[("info", "No writable fields.")])
            return sess
        form = self._form("form", "Set actuators")
        form["instructions"] = "Change the values to set; unchanged fields are left alone."
        for f in fields:
            current = f.latest.value if f.latest else None
            label = f.ref + (f" ({f.spec.unit})" if f.spec.unit else "")
            if f.spec.type == "boolean":
                field = form.add_field(var=f.ref, ftype="boolean", label=label, desc=f.spec.description,
                                       value=bool(current) if current is not None else None)
            else:
                field = form.add_field(var=f.ref, ftype="text-single", label=label, desc=f.spec.description,
                                       value="" if current is None else str(current))
                field["validate"]["datatype"] = XDV_TYPES[f.spec.type]
                if f.spec.min is not None or f.spec.max is not None:
                    validate = field["validate"]
                    validate.set_range(True, minimum=_num(f.spec.min), maximum=_num(f.spec.max))
                    # slixmpp writes "None" for a missing bound; XEP-0122 wants the attribute absent.
                    rng = validate.xml.find(f"{{{validate.namespace}}}range")
                    for attr in ("min", "max"):
                        if rng is not None and rng.attrib.get(attr) == "None":
                            del rng.attrib[attr]
        sess.update(payload=form, next=self._set_submit, has_next=False, allow_complete=True)
        return sess

    async def _set_submit(self, payload: Any, sess: dict[str, Any]) -> dict[str, Any]:
        actor = self._actor(sess, Permission.SET)
        values = payload.get_values() if payload is not None and not isinstance(payload, list) else {}
        # Validate every submitted value before writing any, so a bad one changes nothing.
        todo: list[tuple[Field, Value]] = []
        errors: list[str] = []
        for f in self._writable():
            if f.ref not in values or values[f.ref] in (None, ""):
                continue
            try:
                value = coerce(f.spec.type, values[f.ref])
                check_bounds(value, f.spec.min, f.spec.max)
            except BadValue as e:
                errors.append(f"{f.ref} {e}")
                continue
            if f.latest is None or f.latest.value != value:
                todo.append((f, value))
        unknown = sorted(set(values) - {f.ref for f in self._writable()})
        errors += [f"{name}: not a writable field" for name in unknown]
        if errors:
            sess.update(payload=None, next=None, has_next=False,
                        notes=[("error", "Nothing was changed: " + "; ".join(errors))])
            return sess
        done: list[str] = []
        for f, value in todo:
            try:
                old, new = await self.hub.write(f.ref, value, actor)
                done.append(f"{f.ref}: {fmt(old)} → {fmt(new)}")
            except (Forbidden, HubError, BadValue) as e:
                errors.append(f"{f.ref}: {e}")
        notes = [("info", "; ".join(done) or "Nothing to change.")]
        if errors:
            notes.append(("error", "; ".join(errors)))
        sess.update(payload=None, next=None, has_next=False, notes=notes)
        return sess


def _num(v: float | None) -> str | None:
    if v is None:
        return None
    return str(int(v)) if float(v).is_integer() else repr(v)
