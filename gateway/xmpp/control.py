"""XEP-0325 (Internet of Things - Control, v0.5.1), server side.

`<set/>` in an IQ set or a message writes control parameters: each writable
field of a node is a parameter with the field's name. Every parameter of a
request is checked (node, name, type, bounds) before anything is written, and
every write goes through `Hub.write`, which authorizes, validates again and
audits it. `<getForm/>` returns an XEP-0004 control form with the current
values, XEP-0122 validation and the XEP-0336 notSame flag the XEP requires;
submitting that form in a `<set/>` sets several parameters at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slixmpp import JID, Iq, Message
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.xmlstream import ET, StanzaBase
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import MatchXPath

from ..auth import Actor, Forbidden, Permission, allowed
from ..hub import DeviceError, FieldSpec, Hub, Node, NodeEvent, NotWritable, UnknownField
from .sensordata import (
    answering,
    check_rate,
    MAX_NAME,
    NODE_ATTRS,
    TOKENS,
    XML_LANG,
    Refused,
    bad_request,
    check_attrs,
    local,
    role_of,
)
from .xsd import (
    check_color,
    check_date,
    check_datetime,
    check_duration,
    check_time,
    format_number,
    integer_kind,
    parse_boolean,
    parse_double,
    parse_integer,
)
from ..values import BadValue, Value, check_bounds, coerce
from .frontend import Door, FrontEnd


log = logging.getLogger("iot_gateway.xep0325")

NS = "urn:xmpp:iot:control"
XDATA = "jabber:x:data"
XDV = "http://jabber.org/protocol/xdata-validate"
XDD = "urn:xmpp:xdata:dynamic"

MAX_CHILDREN = 256  # <node/> elements and parameters in one request
MAX_ERRORS = 20  # paramError elements in one answer
SKIP_VARS = frozenset(("FORM_TYPE", "xdd session"))  # form fields that are not parameters
SET_ATTRS = frozenset(TOKENS + (XML_LANG,))
PARAM_ATTRS = frozenset(("name", "value"))

# The hub field types each typed parameter may set. XEP-0325 has no enum and
# no unit: enums are strings, and double goes to a numeric field in its unit.
TARGETS: dict[str, frozenset[str]] = {
    "boolean": frozenset({"boolean"}),
    "int": frozenset({"integer", "numeric"}),
    "long": frozenset({"integer", "numeric"}),
    "double": frozenset({"numeric"}),
    "string": frozenset({"string"}),
    "color": frozenset({"string"}),
    "date": frozenset({"string"}),
    "dateTime": frozenset({"string"}),
    "duration": frozenset({"string"}),
    "time": frozenset({"string"}),
}
LEXICAL: dict[str, Callable[[str], Value]] = {
    "boolean": parse_boolean,
    "int": lambda t: parse_integer(t, 32),
    "long": lambda t: parse_integer(t, 64),
    "double": parse_double,
    "string": lambda t: t,
    "color": check_color,
    "date": check_date,
    "dateTime": check_datetime,
    "duration": check_duration,
    "time": check_time,
}
FORM_PARAM = {"boolean": "boolean", "numeric": "double", "string": "string"}  # integer: int or long
DATATYPE = {"boolean": "xs:boolean", "int": "xs:int", "long": "xs:long", "double": "xs:double", "string": "xs:string"}
# XEP-0004's schema: <x/> holds instructions*, title?, field*, reported?, item*; <field/> holds
# desc?, required?, value*, option*. Extensions (XEP-0122 validate, XEP-0336 notSame) go last,
# where XEP-0325's examples put them.
FORM_ORDER = {f"{{{XDATA}}}{t}": i for i, t in enumerate(("instructions", "title", "field", "reported", "item"))}
FIELD_ORDER = {f"{{{XDATA}}}{t}": i for i, t in enumerate(("desc", "required", "value", "option"))}
FORM_TAG = f"{{{XDATA}}}x"
FORM_DEPTH = 3  # how deep in a stanza forms are looked for: iq/command/x, iq/query/x, message/set/x


@dataclass
class Param:
    """One parameter of a `<set/>`: a typed element, or a field of a submitted form (ptype "form")."""

    name: str
    ptype: str
    raw: str


@dataclass
class SetRequest:
    """A parsed `<set/>`."""

    node_ids: list[str] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    form: bool = False


@dataclass
class Plan:
    """What a valid `<set/>` writes: the nodes, then (ref, value) in request order."""

    nodes: list[Node]
    writes: list[tuple[str, Value]]
    name_nodes: bool  # the request named no node: the answer says which one was used


# ---------------------------------------------------------------- parsing


def _node_ids(el: ET.Element, what: str) -> list[str]:
    check_attrs(el, NODE_ATTRS, "<node/>")
    if "nodeId" not in el.attrib:
        raise bad_request(f"<node/> in {what} needs a nodeId attribute")
    if "sourceId" in el.attrib or "cacheType" in el.attrib:
        raise Refused("item-not-found", "this gateway has no data sources or cache types; name nodes by nodeId only")
    return [el.attrib["nodeId"]]


def parse_set(el: ET.Element) -> SetRequest:
    """Check a `<set/>` against the XEP's schema; Refused (bad-request, not-acceptable) otherwise."""
    if len(el) > MAX_CHILDREN:
        raise Refused("not-acceptable", f"too many elements in <set/>: at most {MAX_CHILDREN}", "modify")
    check_attrs(el, SET_ATTRS, "<set/>")
    req = SetRequest()
    for child in el:
        ns, tag = local(child.tag)
        if ns == NS and tag == "node":
            req.node_ids += _node_ids(child, "<set/>")
        elif ns == NS and tag in TARGETS:
            check_attrs(child, PARAM_ATTRS, f"<{tag}/>")
            if "name" not in child.attrib or "value" not in child.attrib:
                raise bad_request(f"<{tag}/> needs name and value attributes")
            req.params.append(Param(child.attrib["name"][:MAX_NAME], tag, child.attrib["value"]))
        elif ns == XDATA and tag == "x":
            req.form = True
            req.params += _form_params(child)
        else:
            raise bad_request(
                "<set/> may contain only <node/>, typed parameters (boolean, color, date, dateTime, "
                "double, duration, int, long, string, time) and a jabber:x:data form"
            )
    if len(req.params) > MAX_CHILDREN:
        raise Refused("not-acceptable", f"too many parameters: at most {MAX_CHILDREN}", "modify")
    if not req.params and not req.form:
        raise bad_request("<set/> names no parameter to set")
    return req


def _form_params(x: ET.Element) -> list[Param]:
    if x.get("type") != "submit":
        raise bad_request("a control form must be sent back with type='submit'")
    params = []
    for f in x.findall(f"{{{XDATA}}}field"):
        var = f.get("var")
        if not var:
            raise bad_request("a form field has no var")
        if var in SKIP_VARS:
            continue
        values = f.findall(f"{{{XDATA}}}value")
        if len(values) != 1:
            raise bad_request("each submitted control parameter needs exactly one <value/>")
        params.append(Param(var[:MAX_NAME], "form", values[0].text or ""))
    return params


def parse_get_form(el: ET.Element) -> list[str]:
    """The node ids of a `<getForm/>`."""
    if len(el) > MAX_CHILDREN:
        raise Refused("not-acceptable", f"too many <node/> elements: at most {MAX_CHILDREN}", "modify")
    check_attrs(el, SET_ATTRS, "<getForm/>")
    ids: list[str] = []
    for child in el:
        if local(child.tag) != (NS, "node"):
            raise bad_request("<getForm/> may contain only <node/> elements")
        ids += _node_ids(child, "<getForm/>")
    return ids


# ---------------------------------------------------------------- checking


def convert(param: Param, spec: FieldSpec) -> Value:
    """The value `param` sets on a field, checked for type, lexical form and bounds; BadValue otherwise."""
    ptype = param.ptype
    if ptype == "form":
        ptype = integer_kind(spec) if spec.type == "integer" else FORM_PARAM[spec.type]
    elif spec.type not in TARGETS[ptype]:
        raise BadValue(f"invalid parameter type: <{ptype}/> for a field of type {spec.type}")
    try:
        parsed = LEXICAL[ptype](param.raw)
    except ValueError as e:
        raise BadValue(f"invalid parameter value: {e}") from None
    value = coerce(spec.type, parsed)
    check_bounds(value, spec.min, spec.max)
    return value


def writable(node: Node) -> list[str]:
    """The names of a node's control parameters (its writable fields)."""
    return [f.name for f in node.fields.values() if f.spec.writable]


def _known_nodes(hub: Hub, ids: list[str]) -> list[Node]:
    unknown = [i for i in ids if i not in hub.nodes]
    if unknown:
        raise Refused("item-not-found", f"unknown nodeId; the nodes here are: {', '.join(hub.nodes) or 'none'}")
    return [hub.nodes[i] for i in dict.fromkeys(ids)]


def _one_node(hub: Hub, fits: list[Node], what: str) -> Node:
    if not fits:
        summary = "; ".join(f"{n.id}: {', '.join(writable(n))}" for n in hub.nodes.values() if writable(n))
        raise Refused("item-not-found", f"no node has {what}; control parameters here: {summary or 'none'}")
    if len(fits) > 1:
        raise bad_request(
            f"several nodes have {what} ({', '.join(n.id for n in fits)}); name them with <node nodeId='…'/>"
        )
    return fits[0]


def plan(hub: Hub, req: SetRequest) -> Plan:
    """Resolve nodes and check every parameter on every node; Refused unless all are valid."""
    names = list(dict.fromkeys(p.name for p in req.params))
    if req.node_ids:
        nodes, name_nodes = _known_nodes(hub, req.node_ids), False
    elif not names:
        nodes, name_nodes = [], False  # an empty form: nothing to do
    else:
        fits = [n for n in hub.nodes.values() if all(name in writable(n) for name in names)]
        nodes = [_one_node(hub, fits, "control parameters by those names")]
        name_nodes = len(hub.nodes) > 1
    missing: list[str] = []
    errors: dict[str, str] = {}
    writes: list[tuple[str, Value]] = []
    for node in nodes:
        for p in req.params:
            f = node.fields.get(p.name)
            if f is None:
                missing.append(f"{node.id} has no control parameter by that name; its parameters: {', '.join(writable(node)) or 'none'}")
            elif not f.spec.writable:
                missing.append(f"{f.ref} is read-only")
            else:
                try:
                    writes.append((f.ref, convert(p, f.spec)))
                except BadValue as e:
                    errors.setdefault(f.name, f"{f.ref}: {e}")
    if missing:
        raise Refused("item-not-found", "; ".join(dict.fromkeys(missing)))
    if errors:
        raise Refused("bad-request", "; ".join(errors.values()), "modify", [param_error(v, t) for v, t in list(errors.items())[:MAX_ERRORS]])
    return Plan(nodes, writes, name_nodes)


def param_error(var: str, text: str) -> ET.Element:
    """`<paramError var='…'>text</paramError>` for an IQ error."""
    el = ET.Element(f"{{{NS}}}paramError")
    el.set("var", var)
    el.text = text
    return el


# ---------------------------------------------------------------- forms


def _reorder(el: ET.Element, ranks: dict[str, int]) -> None:
    kids = list(el)
    ordered = sorted(kids, key=lambda c: ranks.get(c.tag, len(ranks)))  # stable: values keep their order
    if ordered != kids:
        el[:] = ordered


def schema_order(x: ET.Element) -> None:
    """Put a data form's elements in the order XEP-0004's schema requires, in place.

    slixmpp's Form writes them in the order they were set (`<value/>` before
    `<desc/>`, `<title/>` before `<instructions/>`), which the schema rejects.
    """
    _reorder(x, FORM_ORDER)
    for el in x:
        if el.tag == f"{{{XDATA}}}field":
            _reorder(el, FIELD_ORDER)
        elif el.tag in (f"{{{XDATA}}}reported", f"{{{XDATA}}}item"):
            for f in el:
                _reorder(f, FIELD_ORDER)


def _forms(el: ET.Element, depth: int) -> list[ET.Element]:
    found = []
    for c in el:
        if c.tag == FORM_TAG:
            found.append(c)
        elif depth > 1:
            found += _forms(c, depth - 1)
    return found


def forms_in_order(stanza: StanzaBase) -> StanzaBase:
    """Outgoing stanza filter: every data form the session sends, in schema order (see schema_order)."""
    for x in _forms(stanza.xml, FORM_DEPTH):
        schema_order(x)
    return stanza


def _bound(v: float | None, integer: bool, up: bool) -> str | None:
    if v is None:
        return None
    if integer:
        return str(math.floor(v) if up else math.ceil(v))
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def control_form(nodes: list[Node]) -> Form:
    """The control form of one node, or the parameters common to several (same name and type)."""
    form = Form()
    form["type"] = "form"
    form["title"] = ", ".join(n.name for n in nodes)
    for f in nodes[0].fields.values():
        same = [n.fields.get(f.name) for n in nodes]
        if any(s is None or not s.spec.writable or s.spec.type != f.spec.type for s in same):
            continue
        spec = f.spec
        lows = [s.spec.min for s in same if s.spec.min is not None]
        highs = [s.spec.max for s in same if s.spec.max is not None]
        lo, hi = (max(lows) if lows else None), (min(highs) if highs else None)
        values = {s.latest.value if s.latest is not None else None for s in same}
        value = values.pop() if len(values) == 1 else None
        if spec.type == "boolean":
            ftype, datatype = "boolean", "boolean"
        else:
            ftype = "text-single"
            datatype = integer_kind(spec) if spec.type == "integer" else FORM_PARAM[spec.type]
        if value is None:
            text = None
        elif spec.type == "boolean":
            text = bool(value)
        elif spec.type == "numeric":
            text = format_number(float(value), spec.decimals)
        else:
            text = str(value)
        label = f"{spec.name} ({spec.unit})" if spec.unit else spec.name
        fld = form.add_field(var=spec.name, ftype=ftype, label=label, desc=spec.description, value=text)
        validate = ET.SubElement(fld.xml, f"{{{XDV}}}validate")
        validate.set("datatype", DATATYPE[datatype])
        integer = spec.type == "integer"
        if lo is not None or hi is not None:
            rng = ET.SubElement(validate, f"{{{XDV}}}range")
            for attr, b in (("min", _bound(lo, integer, False)), ("max", _bound(hi, integer, True))):
                if b is not None:
                    rng.set(attr, b)
        else:
            ET.SubElement(validate, f"{{{XDV}}}basic")
        # XEP-0325 requires notSame on every parameter: an untouched field is not sent back.
        ET.SubElement(fld.xml, f"{{{XDD}}}notSame")
    schema_order(form.xml)
    return form


# ---------------------------------------------------------------- the XMPP side


class Control(FrontEnd):
    """The XEP-0325 server of a Session: typed sets, control forms, discovery."""

    def __init__(self, session: Door):
        super().__init__(session)
        c = self.client
        ns = c.default_ns
        c.register_handler(CoroutineCallback("XEP-0325 set", MatchXPath(f"{{{ns}}}iq/{{{NS}}}set"), self._on_set))
        c.register_handler(
            CoroutineCallback("XEP-0325 set message", MatchXPath(f"{{{ns}}}message/{{{NS}}}set"), self._on_message)
        )
        c.register_handler(CoroutineCallback("XEP-0325 getForm", MatchXPath(f"{{{ns}}}iq/{{{NS}}}getForm"), self._on_get_form))
        disco = c.plugin["xep_0030"]
        disco.add_feature(NS)
        disco.add_feature(XDV)
        for node in self.hub.nodes.values():
            self._on_node(NodeEvent("added", node))

    def start(self) -> None:
        """Devices found while running become control nodes too."""
        self.hub.subscribe(self, node=self._on_node)

    def _on_node(self, event: NodeEvent) -> None:
        """A device with writable fields is a control node too (SensorData lists and unlists nodes)."""
        if event.kind != "removed" and writable(event.node):
            self.session.client.plugin["xep_0030"].add_feature(NS, node=event.node.id)

    async def apply(self, el: ET.Element, sender: JID, role: str) -> Plan:
        """Check a whole `<set/>`, then write each parameter through Hub.write; Refused on failure."""
        req = parse_set(el)
        actor = Actor(sender.bare.lower(), role, "xep-0325")
        try:
            p = plan(self.hub, req)
        except Refused:
            # The role comes first: a viewer's set is forbidden (and audited) even when it is also invalid.
            attempts = [(f"{n}.{q.name}" if n else q.name, q.raw) for n in req.node_ids or [""] for q in req.params]
            self._authorize(actor, attempts[:MAX_ERRORS])
            raise
        self._authorize(actor, p.writes)
        done: list[str] = []
        for ref, value in p.writes:
            name = ref.partition(".")[2]
            try:
                await self.hub.write(ref, value, actor)
            except Forbidden as e:
                raise Refused("forbidden", str(e)) from None
            except DeviceError as e:
                state = f"already applied: {', '.join(done)}" if done else "nothing was changed"
                raise Refused("internal-server-error", f"{e} ({state})", "cancel", [param_error(name, str(e))]) from None
            except BadValue as e:
                raise Refused("bad-request", str(e), "modify", [param_error(name, str(e))]) from None
            except (UnknownField, NotWritable) as e:
                raise Refused("item-not-found", str(e)) from None
            done.append(ref)
        return p

    def _authorize(self, actor: Actor, attempts: list[tuple[str, Any]]) -> None:
        """The hub's role check (it audits each refused parameter, once), as an XEP-0325 refusal."""
        try:
            self.hub.authorize(actor, attempts)
        except Forbidden as e:
            raise Refused("forbidden", str(e)) from None

    async def _on_set(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return
        with answering(iq, "control request"):
            if iq["type"] != "set":
                raise bad_request("send <set/> in an IQ of type set")
            role = role_of(self.session, iq["from"])
            if role is None:
                raise Refused("forbidden", "Access denied.")
            check_rate(self.session, iq["from"])
            p = await self.apply(iq.xml.find(f"{{{NS}}}set"), iq["from"], role)
            response = ET.Element(f"{{{NS}}}setResponse")
            if p.name_nodes:
                for node in p.nodes:
                    ET.SubElement(response, f"{{{NS}}}node").set("nodeId", node.id)
            reply = iq.reply()
            reply.append(response)
            reply.send()

    async def _on_message(self, msg: Message) -> None:
        if msg["type"] in ("error", "groupchat"):
            return
        sender = msg["from"]
        role = role_of(self.session, sender)
        if role is None:
            log.info("ignored a control message from stranger %s", sender.bare)
            return
        if msg["delay"]["stamp"] is not None:
            # Stored while the gateway was offline: acting on it now could flip an
            # actuator long after the sender meant to (the chat commands do the same).
            log.warning("ignored a control message from %s sent while the gateway was offline", sender.bare)
            return
        try:
            await self.apply(msg.xml.find(f"{{{NS}}}set"), sender, role)
        except Refused as e:
            log.warning("control message from %s not applied: %s", sender.bare, e.text)
        except Exception:
            log.exception("control message from %s failed", sender.bare)

    async def _on_get_form(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return
        with answering(iq, "control form request"):
            if iq["type"] != "get":
                raise bad_request("send <getForm/> in an IQ of type get")
            if not allowed(role_of(self.session, iq["from"]), Permission.SET):
                raise Refused("forbidden", "Access denied.")
            check_rate(self.session, iq["from"])
            ids = parse_get_form(iq.xml.find(f"{{{NS}}}getForm"))
            if ids:
                nodes = _known_nodes(self.hub, ids)
            elif len(self.hub.nodes) == 1:
                nodes = list(self.hub.nodes.values())  # the device itself, as in the XEP's examples
            else:
                nodes = [_one_node(self.hub, [n for n in self.hub.nodes.values() if writable(n)], "control parameters")]
            reply = iq.reply()
            reply.append(control_form(nodes))
            reply.send()
