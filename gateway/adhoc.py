"""Ad-hoc commands (XEP-0050) for GUI clients such as Gajim and Psi:
`Read sensors`, `Set actuator` (a typed, bounded data form) and `Status`.

Same roles as chat: viewers may read, operators and admins may set; strangers
get `forbidden`. Sets go through the hub, which checks and audits them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from slixmpp.exceptions import XMPPError
from slixmpp.stanza import Iq

from .auth import Actor, Forbidden, Permission, allowed, require
from .hub import Field, HubError
from .values import BadValue, Value, age, check_bounds, coerce, fmt

if TYPE_CHECKING:
    from .xmpp import Session

log = logging.getLogger("iot_gateway.adhoc")

XDV_TYPES = {"integer": "xs:integer", "numeric": "xs:double", "string": "xs:string"}


class AdHoc:
    """Registers the gateway's ad-hoc commands on the session's client."""

    def __init__(self, session: "Session"):
        self.session = session
        self.hub = session.hub
        c = session.client
        for plugin in ("xep_0004", "xep_0050", "xep_0122"):
            c.register_plugin(plugin)
        cmds = c.plugin["xep_0050"]
        cmds.add_command(node="read", name="Read sensors", handler=self._read)
        cmds.add_command(node="set", name="Set actuator", handler=self._set_form)
        cmds.add_command(node="status", name="Status", handler=self._status)

    def _actor(self, iq_or_session: Any, perm: Permission) -> Actor:
        frm = iq_or_session["from"]
        contact = self.session.config.contact(frm.bare)
        if contact is None:
            log.info("ad-hoc command refused for stranger %s", frm.bare)
            raise XMPPError("forbidden", text="Not allowed for your account.")
        actor = Actor(contact.jid, contact.role, "adhoc")
        if not allowed(contact.role, perm):
            try:
                require(actor, perm)
            except Forbidden as e:
                if perm is Permission.SET:  # an attempt to change actuators: audited
                    self.hub.audit.record(actor, "(set form)", None, None, "refused", str(e))
                raise XMPPError("forbidden", text=f"{e}.") from None
        return actor

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
                form.add_field(var=f.ref, ftype="text-single", label=f.ref, value=text)
        sess.update(payload=form, next=None, has_next=False)
        return sess

    async def _status(self, iq: Iq, sess: dict[str, Any]) -> dict[str, Any]:
        actor = self._actor(iq, Permission.READ)
        text = await self.session.commands.run("status", actor, styled=False)
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
                field = form.add_field(var=f.ref, ftype="boolean", label=label,
                                       value=bool(current) if current is not None else None)
            else:
                field = form.add_field(var=f.ref, ftype="text-single", label=label,
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
