"""XEP-0323 (Internet of Things - Sensor Data, v0.6), server side.

Read-outs of the hub: each device is a node (nodeId = device id) and each
field keeps its name. A client sends `<req/>` in an IQ get; the gateway
answers `<accepted/>` and then sends the values in `<fields/>` messages, the
last one marked done='true' (or a `<failure/>` naming the nodes it could not
read). Refusals are IQ errors as the XEP's table says.

Names in answers always come from the hub, never from the request. The XML
Schema helpers here (xs:dateTime and friends) are shared with XEP-0325 in
`control.py`, which builds on this XEP the way the XEPs themselves do.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from slixmpp import JID, Iq, Message
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0030.stanza import DiscoInfo, DiscoItems
from slixmpp.xmlstream import ET, StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp.xmlstream.tostring import tostring

from ..auth import Permission, allowed
from ..hub import Field, FieldSpec, Health, Hub, Node, NodeEvent, Reading
from ..rollups import Window
from ..values import Value, clean
from .frontend import Door, FrontEnd
from .xsd import format_datetime, format_duration, format_number, integer_kind, parse_boolean, parse_datetime, parse_integer


log = logging.getLogger("iot_gateway.xep0323")

NS = "urn:xmpp:iot:sensordata"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

MAX_CHILDREN = 256  # <node/> and <field/> elements in one request
FIELDS_PER_MESSAGE = 100  # a bigger read-out is split over several messages
MAX_BYTES = 31 * 1024  # bytes of fields per message, unless the session knows the server's limit (edge.py)
MAX_HISTORY = 10_000  # historical values in one read-out
HISTORICAL_BY_RES = {60: "historicalMinute", 3600: "historicalHour", 86400: "historicalDay"}  # history.db's buckets
MAX_DELAY = 86_400.0  # how far ahead `when` may lie, in seconds
WHEN_SLACK = 0.5  # a `when` closer than this is read out at once
MAX_QUEUED_PER_CLIENT = 10
MAX_QUEUED = 100
MAX_NAME = 256  # longer nodeId/name values cannot name anything in the hub
HEALTH_DATATYPE = "iot-gateway:health"  # dataType of the Health enum field

HISTORICAL = (
    "historicalSecond",
    "historicalMinute",
    "historicalHour",
    "historicalDay",
    "historicalWeek",
    "historicalMonth",
    "historicalQuarter",
    "historicalYear",
    "historicalOther",
)
FIELD_TYPES = ("momentary", "peak", "status", "computed", "identity") + HISTORICAL
TOKENS = ("serviceToken", "deviceToken", "userToken")
# `id` (instead of `seqnr`) and `identification` (instead of `identity`, as in
# the v0.6 read-out example) are accepted from clients of other drafts.
REQ_ATTRS = frozenset(
    FIELD_TYPES
    + TOKENS
    + ("seqnr", "id", "all", "historical", "from", "to", "when", "identification", XML_LANG)
)
NODE_ATTRS = frozenset(("nodeId", "sourceId", "cacheType"))

# Built-in status and identity fields of every node.
STATUS_FIELDS = ("Health", "Health reason", "Health since", "Last seen", "Data age")
IDENTITY_FIELDS = ("Device ID", "Name", "Driver")


# ---------------------------------------------------------------- errors


class Refused(Exception):
    """A request answered with an IQ error: condition, type and a text for the user."""

    def __init__(self, condition: str, text: str, etype: str = "cancel", extra: Iterable[ET.Element] = ()):
        super().__init__(text)
        self.condition = condition
        self.text = text
        self.etype = etype
        self.extra = list(extra)


def bad_request(text: str) -> Refused:
    """A malformed request (type modify, as the XEPs' error tables say)."""
    return Refused("bad-request", text, "modify")


def send_error(iq: Iq, err: Refused) -> None:
    """Answer `iq` with an IQ error carrying `err`'s condition, text and extra elements."""
    reply = iq.reply(clear=True)
    reply["type"] = "error"
    reply["error"]["type"] = err.etype
    reply["error"]["condition"] = err.condition
    reply["error"]["text"] = err.text
    for el in err.extra:
        reply["error"].xml.append(el)
    reply.send()


@contextmanager
def answering(iq: Iq, what: str) -> Iterator[None]:
    """Answer `iq` with an IQ error for a Refused raised inside, and with
    internal-server-error (logged) for any other failure, so a handler never dies silently."""
    try:
        yield
    except Refused as e:
        log.info("%s from %s refused: %s", what, iq["from"], e.text)
        send_error(iq, e)
    except Exception:
        log.exception("%s from %s failed", what, iq["from"])
        send_error(iq, Refused("internal-server-error", "Internal error; it has been logged."))


def role_of(session: Door, jid: JID) -> str | None:
    """The contact role of a sender's bare JID, or None for a stranger."""
    contact = session.config.contact(jid.bare) if jid.bare else None
    return contact.role if contact is not None else None


def check_rate(session: Door, jid: JID) -> None:
    """Refuse a contact over the per-JID command rate limit (shared with chat)."""
    if not session.allow_rate(jid.bare.lower()):
        raise Refused("resource-constraint", "Too many requests; slow down.", etype="wait")


def check_attrs(el: ET.Element, known: frozenset[str], what: str) -> None:
    """Refuse an element carrying an attribute the XEP does not define."""
    if any(a not in known for a in el.attrib):
        raise bad_request(f"{what} has an attribute the XEP's schema does not define")


def local(tag: str) -> tuple[str, str]:
    """(namespace, local name) of an ElementTree tag."""
    if tag.startswith("{"):
        ns, _, name = tag[1:].partition("}")
        return ns, name
    return "", tag


# ---------------------------------------------------------------- XML text of read-outs
#
# A read-out's <fields/> are written straight to XML text rather than built as
# ElementTree elements and serialised by slixmpp: for 100 fields that was 0.94 ms
# of the gateway's time per read-out (element building 0.35 ms, slixmpp's tostring
# 0.6 ms). The text still travels as a message stanza through slixmpp's send queue
# and filters (see TextMessage), so XEP-0198 counts it and can resend it.

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"})
_SPECIAL = re.compile('[&<>"\t\n\r]')


def xml_attr(text: str) -> str:
    """`text` as the value of an XML attribute written in double quotes (made XML-safe by `clean`)."""
    text = clean(text)
    if _SPECIAL.search(text):
        text = text.translate(_ESCAPES)
    return text


_STAMPS: dict[float, str] = {}
_MAX_STAMPS = 4096  # a read-out of 10 000 fields has about as many distinct reading times


def stamp(t: float) -> str:
    """format_datetime(t), remembered: the fields of one sample share their time, and
    repeated read-outs show the same latest readings."""
    text = _STAMPS.get(t)
    if text is None:
        if len(_STAMPS) >= _MAX_STAMPS:
            _STAMPS.clear()
        text = _STAMPS[t] = format_datetime(t)
    return text


def field_xml(tag: str, name: str, value: str, attrs: str = "") -> str:
    """One typed field element; `attrs` is further attribute text, each with a leading space."""
    return f'<{tag} name="{xml_attr(name)}" value="{xml_attr(value)}"{attrs}/>'


def flags(*names: str) -> str:
    """Attribute text setting each of `names` to true."""
    return "".join(f' {n}="true"' for n in names)


def value_xml(spec: FieldSpec, value: Value | None, attrs: str = "") -> str:
    """The typed field element for a value (None: a placeholder for a missing value)."""
    if spec.type == "numeric" or (spec.type == "integer" and spec.unit):
        # An integer with a unit stays numeric: <int/> and <long/> have no unit.
        if value is None:
            text = "NaN"
        elif spec.type == "integer":
            text = str(int(value))
        else:
            text = format_number(float(value), spec.decimals)
        return field_xml("numeric", spec.name, text, f' unit="{xml_attr(spec.unit)}"{attrs}')
    if spec.type == "integer":
        return field_xml(integer_kind(spec), spec.name, "0" if value is None else str(int(value)), attrs)
    if spec.type == "boolean":
        return field_xml("boolean", spec.name, "true" if value else "false", attrs)
    return field_xml("string", spec.name, "" if value is None else str(value), attrs)


# ---------------------------------------------------------------- requests


@dataclass
class ReadoutRequest:
    """A parsed and validated `<req/>`."""

    seqnr: int
    seq_attr: str = "seqnr"
    types: frozenset[str] = frozenset({"momentary"})
    nodes: list[Node] = field(default_factory=list)
    fields: frozenset[str] | None = None
    start: float | None = None
    end: float | None = None
    when: float | None = None

    @property
    def historical(self) -> bool:
        """Whether any historical field type is asked for."""
        return any(t in self.types for t in HISTORICAL)


def parse_seqnr(el: ET.Element, what: str) -> tuple[int, str]:
    """(sequence number, attribute it came in): `seqnr` per the XEP, `id` from other drafts."""
    attr = "seqnr" if "seqnr" in el.attrib else "id" if "id" in el.attrib else None
    if attr is None:
        raise bad_request(f"{what} needs a seqnr attribute")
    try:
        return parse_integer(el.attrib[attr], 32), attr
    except ValueError:
        raise bad_request(f"the seqnr of {what} must be an xs:int") from None


def parse_req(el: ET.Element, hub: Hub) -> ReadoutRequest:
    """Validate a `<req/>` against the XEP's schema and the hub; Refused when it cannot be served."""
    if len(el) > MAX_CHILDREN:
        raise Refused(
            "not-acceptable",
            f"too many <node/> and <field/> elements: at most {MAX_CHILDREN} per request",
            "modify",
        )
    check_attrs(el, REQ_ATTRS, "<req/>")
    seqnr, seq_attr = parse_seqnr(el, "<req/>")
    req = ReadoutRequest(seqnr, seq_attr)

    flags: dict[str, bool] = {}
    for name in FIELD_TYPES + ("all", "historical", "identification"):
        if name in el.attrib:
            try:
                flags[name] = parse_boolean(el.attrib[name])
            except ValueError:
                raise bad_request(f"<req/> attribute {name} must be true or false") from None
    types = {t for t in FIELD_TYPES if flags.get(t)}
    if flags.get("identification"):
        types.add("identity")
    if flags.get("historical"):
        types.update(HISTORICAL)
    if flags.get("all"):
        types.update(FIELD_TYPES)
    # No field type at all: the values themselves, the common case.
    req.types = frozenset(types or {"momentary"})

    times: dict[str, float] = {}
    for attr in ("from", "to", "when"):
        if attr in el.attrib:
            try:
                times[attr] = parse_datetime(el.attrib[attr])
            except ValueError as e:
                raise bad_request(f"<req/> attribute {attr}: {e}") from None
    req.start, req.end, req.when = times.get("from"), times.get("to"), times.get("when")
    if req.start is not None and req.end is not None and req.start > req.end:
        raise bad_request("<req/> has from later than to")

    node_ids: list[str] = []
    names: set[str] = set()
    for child in el:
        ns, tag = local(child.tag)
        if ns != NS or tag not in ("node", "field"):
            raise bad_request("<req/> may contain only <node/> and <field/> elements")
        if tag == "node":
            check_attrs(child, NODE_ATTRS, "<node/>")
            if "nodeId" not in child.attrib:
                raise bad_request("<node/> needs a nodeId attribute")
            if "sourceId" in child.attrib or "cacheType" in child.attrib:
                raise Refused(
                    "item-not-found",
                    "this gateway has no data sources or cache types; name nodes by nodeId only",
                )
            node_ids.append(child.attrib["nodeId"])
        else:
            check_attrs(child, frozenset(("name",)), "<field/>")
            if "name" not in child.attrib:
                raise bad_request("<field/> needs a name attribute")
            names.add(child.attrib["name"][:MAX_NAME])

    if node_ids:
        unknown = [n for n in node_ids if n not in hub.nodes]
        if unknown:
            raise Refused(
                "item-not-found",
                f"unknown nodeId; the nodes here are: {', '.join(hub.nodes) or 'none'}",
            )
        req.nodes = [hub.nodes[n] for n in dict.fromkeys(node_ids)]
    else:
        req.nodes = list(hub.nodes.values())

    if names:
        known = {n for node in req.nodes for n in field_names(node)}
        req.fields = frozenset(names & known)
        if not req.fields:
            raise Refused("item-not-found", "none of the requested fields exists on the requested nodes")
    return req


def field_names(node: Node) -> Iterator[str]:
    """Every field name a read-out of `node` can contain."""
    yield from node.fields
    yield from STATUS_FIELDS
    yield from IDENTITY_FIELDS


# ---------------------------------------------------------------- read-outs


@dataclass
class NodeError:
    """A node that could not be read, for a `<failure/>`."""

    node: str
    text: str
    time: float


@dataclass
class Readout:
    """What a read-out sends: (node id, timestamp, field element as XML text) items and node errors."""

    items: list[tuple[str, str, str]] = field(default_factory=list)
    errors: list[NodeError] = field(default_factory=list)


# A field's historical values from history.db's buckets: (bucket start, value, historical* type).
Stored = dict[str, list[tuple[float, Value, str]]]


def read(req: ReadoutRequest, now: float | None = None, stored: Stored | None = None) -> Readout:
    """Gather the values `req` asks for from the hub's nodes; the historical values of the fields
    in `stored` come from there (history.db's buckets), the others' from memory.

    Raises Refused (not-acceptable) when the historical part is larger than MAX_HISTORY.
    """
    now = time.time() if now is None else now
    stored = stored or {}
    wanted = (lambda n: True) if req.fields is None else req.fields.__contains__
    if req.historical:
        count = sum(
            len(stored[f.ref]) if f.ref in stored else sum(1 for r in f.history if _in_range(r, req))
            for node in req.nodes
            for f in node.fields.values()
            if wanted(f.name)
        )
        if count > MAX_HISTORY:
            raise Refused(
                "not-acceptable",
                f"the read-out would hold {count} historical values, more than {MAX_HISTORY}; "
                "narrow it with from/to or <field/>",
                "modify",
            )
    out = Readout()
    for node in req.nodes:
        _read_node(node, req, wanted, now, out, stored)
    return out


def _in_range(r: Reading, req: ReadoutRequest) -> bool:
    return (req.start is None or r.time >= req.start) and (req.end is None or r.time <= req.end)


def _put(blocks: dict[str, list[str]], t: float, el: str) -> None:
    """File a field element under its timestamp; fields of the same time share one <timestamp/>."""
    blocks.setdefault(stamp(t), []).append(el)


def _read_node(node: Node, req: ReadoutRequest, wanted: Callable[[str], bool], now: float, out: Readout,
               stored: Stored) -> None:
    state = node.health.state
    broken = state in (Health.ERROR, Health.OFFLINE)
    quality = ("error",) if broken else ("warning",) if state is Health.STALE else ()
    fields = [f for f in node.fields.values() if wanted(f.name)]
    momentary: dict[str, list[str]] = {}
    current: dict[str, list[str]] = {}  # status and identity, as of now
    historical: dict[str, list[str]] = {}
    values = 0

    if "momentary" in req.types:
        missing = flags("momentary", "missing", *quality)
        read_out = flags("momentary", "automaticReadout", *quality)
        for f in fields:
            writable = ' writable="true"' if f.spec.writable else ' writable="false"'
            if f.latest is None:
                _put(momentary, now, value_xml(f.spec, None, missing + writable))
            else:
                _put(momentary, f.latest.time, value_xml(f.spec, f.latest.value, read_out + writable))
                values += 1
    if req.historical:
        past = flags("historicalOther", "automaticReadout")
        readings = sorted(
            [(r.time, f, r.value, past) for f in fields if f.ref not in stored for r in f.history if _in_range(r, req)]
            + [(t, f, v, flags(kind, "computed")) for f in fields for t, v, kind in stored.get(f.ref, ())],
            key=lambda item: item[0],
        )
        values += len(readings)
        for t, f, v, attrs in readings:
            _put(historical, t, value_xml(f.spec, v, attrs))
    if broken and ("momentary" in req.types or req.historical) and values == 0 and fields:
        # Nothing was ever read, or nothing in range, from a device that is down.
        out.errors.append(NodeError(node.id, f"{node.id} is {node.health.describe()}", node.health.since))
        momentary, historical = {}, {}

    if "status" in req.types:
        h = node.health
        status = flags("status", "automaticReadout")
        items = [
            ("Health", "enum", h.state.value, f' dataType="{HEALTH_DATATYPE}"'),
            ("Health reason", "string", h.reason, "") if h.reason else None,
            ("Health since", "dateTime", stamp(h.since), ""),
        ]
        if node.last_seen is not None:
            items.append(("Last seen", "dateTime", stamp(node.last_seen), ""))
            items.append(("Data age", "duration", format_duration(now - node.last_seen), ""))
        for item in items:
            if item is not None and wanted(item[0]):
                name, tag, value, extra = item
                _put(current, now, field_xml(tag, name, value, extra + status))
    if "identity" in req.types:
        identity = flags("identity", "automaticReadout")
        for name, value in zip(IDENTITY_FIELDS, (node.id, node.name, node.driver)):
            if wanted(name):
                _put(current, now, field_xml("string", name, value, identity))

    for blocks in (momentary, current, historical):
        for ts, els in blocks.items():
            for el in els:
                out.items.append((node.id, ts, el))


def messages(
    seqnr: int, seq_attr: str, readout: Readout, per_message: int = FIELDS_PER_MESSAGE, max_bytes: int = MAX_BYTES
) -> list[str]:
    """The `<fields/>` (and `<failure/>`) payloads of a read-out as XML text; the last is marked done.
    Each holds at most `per_message` fields and about `max_bytes` bytes (a field more when one alone is larger)."""
    seq = f'xmlns="{NS}" {seq_attr}="{seqnr}"'
    chunks: list[list[tuple[str, str, str]]] = []
    chunk: list[tuple[str, str, str]] = []
    size = 0
    for item in readout.items:
        cost = len(item[2].encode()) + 6 * len(item[0]) + 100  # the field, its node and timestamp around it
        if chunk and (len(chunk) >= per_message or size + cost > max_bytes):
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(item)
        size += cost
    if chunk:
        chunks.append(chunk)
    if not chunks and not readout.errors:
        chunks = [[]]
    payloads: list[str] = []
    for n, chunk in enumerate(chunks):
        done = ' done="true"' if n == len(chunks) - 1 and not readout.errors else ""
        out = [f"<fields {seq}{done}>"]
        node_id: str | None = None
        ts: str | None = None
        for item_node, item_ts, el in chunk:
            if item_node != node_id:
                if node_id is not None:
                    out.append("</timestamp></node>")
                out.append(f'<node nodeId="{xml_attr(item_node)}"><timestamp value="{item_ts}">')
                node_id, ts = item_node, item_ts
            elif item_ts != ts:
                out.append(f'</timestamp><timestamp value="{item_ts}">')
                ts = item_ts
            out.append(el)
        if node_id is not None:
            out.append("</timestamp></node>")
        out.append("</fields>")
        payloads.append("".join(out))
    if readout.errors:
        out = [f'<failure {seq} done="true">']
        for err in readout.errors:
            out.append(
                f'<error nodeId="{xml_attr(err.node)}" timestamp="{stamp(err.time)}">'
                f"{xml_attr(err.text)}</error>"
            )
        out.append("</failure>")
        payloads.append("".join(out))
    return payloads


class TextMessage(Message):
    """A message stanza whose payload is XML text made here, appended at serialisation.

    It goes through slixmpp's send queue and filters like any stanza, so XEP-0198 counts
    it and keeps it for a resend; `text_filter` (an `out_sce` filter, after XEP-0198's)
    turns it into the stanza's text, and `materialize` gives it a real element before a
    resumed stream resends it without filters.
    """

    payload: str = ""

    def __copy__(self) -> TextMessage:
        copy = super().__copy__()
        copy.payload = self.payload
        return copy

    def to_text(self) -> str:
        """The whole stanza as XML text, payload included."""
        stream = self.stream
        envelope = tostring(self.xml, xmlns=stream.default_ns if stream else "", stream=stream, top_level=True)
        if envelope.endswith(" />"):
            return envelope[:-3] + ">" + self.payload + "</message>"
        head, _, tail = envelope.rpartition("</")
        return head + self.payload + "</" + tail

    def materialize(self) -> None:
        """Append the payload as an element, so slixmpp's own serialisation includes it."""
        if self.payload:
            self.xml.append(ET.fromstring(self.payload))
            self.payload = ""


def text_filter(stanza: StanzaBase) -> StanzaBase | str:
    """Outgoing filter: a TextMessage leaves as its text, everything else as it is."""
    if isinstance(stanza, TextMessage) and stanza.payload:
        return stanza.to_text()
    return stanza


# ---------------------------------------------------------------- the XMPP side


@dataclass
class Queued:
    """A read-out waiting for its `when`."""

    requester: JID
    req: ReadoutRequest
    task: asyncio.Task[None] | None = None


class SensorData(FrontEnd):
    """The XEP-0323 server of a Session: read-outs, queued read-outs, cancel, discovery."""

    def __init__(self, session: Door):
        super().__init__(session)
        self.per_message = FIELDS_PER_MESSAGE
        self._queued: dict[tuple[str, int], Queued] = {}
        self._stored_tasks: set[asyncio.Future[None]] = set()  # read-outs waiting for history.db
        c = self.client
        ns = c.default_ns
        c.register_handler(Callback("XEP-0323 req", MatchXPath(f"{{{ns}}}iq/{{{NS}}}req"), self._on_req))
        c.register_handler(Callback("XEP-0323 cancel", MatchXPath(f"{{{ns}}}iq/{{{NS}}}cancel"), self._on_cancel))
        c.add_event_handler("disconnected", self._on_disconnected)
        c.add_filter("out_sce", text_filter)
        c.add_event_handler("session_resumed", self._on_resumed)
        disco = c.plugin["xep_0030"]
        disco.add_feature(NS)
        # disco#items lists the nodes; each node answers disco#info for itself.
        # Only to contacts: a stranger sees no item, and a node as if it did not exist.
        self._me = c.boundjid.full
        for node in self.hub.nodes.values():
            self._list(node)
        disco.set_node_handler("get_items", jid=self._me, node=None, handler=self._items)

    def start(self) -> None:
        """Devices found while running (Zigbee2MQTT, Tasmota) are listed and unlisted as they come and go."""
        self.hub.subscribe(self, node=self._on_node)

    def _list(self, node: Node) -> None:
        """Make a device discoverable: an item of the gateway, and a node answering disco#info."""
        disco, me = self.client.plugin["xep_0030"], self._me
        disco.add_item(jid=me, name=node.name, subnode=node.id)
        disco.add_identity(category="hierarchy", itype="leaf", name=node.name, node=node.id)
        disco.add_feature(NS, node=node.id)
        disco.set_node_handler("get_info", jid=me, node=node.id, handler=self._node_info)

    def _unlist(self, node_id: str) -> None:
        disco, me = self.client.plugin["xep_0030"], self._me
        disco.del_item(jid=me, ijid=me, inode=node_id)
        # Its identity and features go; _node_info answers item-not-found while it is gone.
        disco.del_identities(jid=me, node=node_id)
        disco.del_features(jid=me, node=node_id)

    def _on_node(self, event: NodeEvent) -> None:
        if event.kind in ("removed", "renamed"):
            self._unlist(event.old_id or event.node.id)
        if event.kind in ("added", "renamed"):
            self._list(event.node)

    def _stranger(self, ifrom: JID | None) -> bool:
        return ifrom is not None and role_of(self.session, JID(ifrom)) is None  # None: the gateway asking itself

    def _items(self, jid: JID, node: str | None, ifrom: JID | None, data: object) -> DiscoItems:
        """disco#items of the gateway: its nodes, for contacts only."""
        if self._stranger(ifrom):
            return DiscoItems()
        return self.client.plugin["xep_0030"].static.get_items(jid, node, ifrom, data)

    def _node_info(self, jid: JID, node: str | None, ifrom: JID | None, data: object) -> DiscoInfo:
        """disco#info of a node, for contacts only; a stranger gets the answer for a missing node."""
        if self._stranger(ifrom) or node not in self.hub.nodes:
            raise XMPPError("item-not-found")
        return self.client.plugin["xep_0030"].static.get_info(jid, node, ifrom, data)

    # ------------------------------------------------------------ requests

    def _on_req(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return
        with answering(iq, "read-out request"):
            self._serve(iq)

    def _serve(self, iq: Iq) -> None:
        requester = iq["from"]
        if not allowed(role_of(self.session, requester), Permission.READ):
            raise Refused("forbidden", "Access denied.")
        check_rate(self.session, requester)
        if iq["type"] != "get":
            raise bad_request("send <req/> in an IQ of type get")
        req = parse_req(iq.xml.find(f"{{{NS}}}req"), self.hub)
        now = time.time()
        if req.historical and req.start is not None and (req.when is None or req.when <= now + WHEN_SLACK):
            beyond = [f for f in self._wanted(req) if not f.history or f.history[0].time > req.start]
            store = self.session.commands.store
            if beyond and store is not None:  # older than memory: history.db's buckets answer
                task = asyncio.ensure_future(self._serve_stored(iq, requester, req, beyond, now))
                self._stored_tasks.add(task)
                task.add_done_callback(self._stored_tasks.discard)
                return
        accepted = ET.Element(f"{{{NS}}}accepted")
        accepted.set(req.seq_attr, str(req.seqnr))
        if req.when is not None and req.when > now + WHEN_SLACK:
            self._queue(requester, req, req.when - now)
            accepted.set("queued", "true")
            reply = iq.reply()
            reply.append(accepted)
            reply.send()
            return
        readout = read(req, now)  # may refuse: before anything is accepted
        reply = iq.reply()
        reply.append(accepted)
        reply.send()
        self._send(requester, req, readout)

    def _wanted(self, req: ReadoutRequest) -> list[Field]:
        return [f for node in req.nodes for f in node.fields.values() if req.fields is None or f.name in req.fields]

    async def _serve_stored(self, iq: Iq, requester: JID, req: ReadoutRequest, fields: list[Field], now: float) -> None:
        """A historical read-out reaching back past memory: the fields' buckets over from/to, at the
        finest resolution that keeps the read-out within MAX_HISTORY values."""
        store = self.session.commands.store
        assert store is not None and req.start is not None
        end = min(now, req.end if req.end is not None else now)
        with answering(iq, "read-out request"):
            stored: Stored = {}
            if end > req.start:
                window = Window(req.start, end + 1e-6, "read-out")  # `to` is inclusive
                per_field = max(1, MAX_HISTORY // len(fields))
                for f in fields:
                    ans = await store.answer(f, window, per_field)
                    kind = HISTORICAL_BY_RES[ans.res]
                    stored[f.ref] = [(b.t, b.last if b.mean is None else b.mean, kind)
                                     for b in ans.rows if b.n and b.t >= req.start]
            readout = read(req, now, stored)  # may refuse: before anything is accepted
            accepted = ET.Element(f"{{{NS}}}accepted")
            accepted.set(req.seq_attr, str(req.seqnr))
            reply = iq.reply()
            reply.append(accepted)
            reply.send()
            self._send(requester, req, readout)

    def _queue(self, requester: JID, req: ReadoutRequest, delay: float) -> None:
        if delay > MAX_DELAY:
            raise Refused(
                "not-acceptable",
                f"when lies more than {MAX_DELAY / 3600:g} h ahead; ask again closer to the time",
                "modify",
            )
        key = (requester.full, req.seqnr)
        if key in self._queued:
            raise Refused("conflict", f"a read-out with seqnr {req.seqnr} is already queued")
        mine = sum(1 for q in self._queued.values() if q.requester.full == requester.full)
        if mine >= MAX_QUEUED_PER_CLIENT or len(self._queued) >= MAX_QUEUED:
            raise Refused("resource-constraint", "too many queued read-outs; cancel some or wait", "wait")
        if req.historical:
            read(req)  # refuse now a read-out that is already too large
        q = Queued(requester, req)
        q.task = asyncio.ensure_future(self._run_later(key, q, delay))
        self._queued[key] = q

    async def _run_later(self, key: tuple[str, int], q: Queued, delay: float) -> None:
        await asyncio.sleep(delay)
        self._queued.pop(key, None)
        req = q.req
        started = ET.Element(f"{{{NS}}}started")
        started.set(req.seq_attr, str(req.seqnr))
        self._message(q.requester, started)
        if not allowed(role_of(self.session, q.requester), Permission.READ):
            readout = Readout(errors=[NodeError(n.id, "access denied", time.time()) for n in req.nodes])
        else:
            try:
                readout = read(req)
            except Refused as e:
                readout = Readout(errors=[NodeError(n.id, e.text, time.time()) for n in req.nodes])
        try:
            self._send(q.requester, req, readout)
        except Exception:
            log.exception("queued read-out %s for %s failed", req.seqnr, q.requester)

    def _send(self, to: JID, req: ReadoutRequest, readout: Readout) -> None:
        for payload in messages(req.seqnr, req.seq_attr, readout, self.per_message, self.session.edge.budget):
            self._message(to, payload)
        log.debug("read-out %s for %s: %d values, %d node errors", req.seqnr, to, len(readout.items), len(readout.errors))

    def _message(self, to: JID, payload: ET.Element | str) -> None:
        if isinstance(payload, str):
            msg: Message = TextMessage(self.client)
            msg["lang"] = self.client.default_lang
            msg.payload = payload
        else:
            msg = self.client.Message()
            msg.append(payload)
        msg["to"] = to
        msg.send()

    def _on_resumed(self, _stanza: object) -> None:
        # XEP-0198 has just queued the unacknowledged stanzas for a resend without filters,
        # which text_filter would have serialised; the send queue runs after this handler.
        sm = self.client.plugin["xep_0198"]
        for _seq, stanza in sm.unacked_queue:
            if isinstance(stanza, TextMessage):
                stanza.materialize()

    # ------------------------------------------------------------ cancel

    def _on_cancel(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return
        with answering(iq, "cancel"):
            if not allowed(role_of(self.session, iq["from"]), Permission.READ):
                raise Refused("forbidden", "Access denied.")
            el = iq.xml.find(f"{{{NS}}}cancel")
            check_attrs(el, frozenset(("seqnr", "id", XML_LANG)), "<cancel/>")
            if len(el):
                raise bad_request("<cancel/> has no child elements")
            seqnr, attr = parse_seqnr(el, "<cancel/>")
            q = self._queued.pop((iq["from"].full, seqnr), None)
            if q is None:
                raise Refused("item-not-found", "no queued read-out of yours has that seqnr")
            if q.task is not None:
                q.task.cancel()
            cancelled = ET.Element(f"{{{NS}}}cancelled")
            cancelled.set(attr, str(seqnr))
            reply = iq.reply()
            reply.append(cancelled)
            reply.send()

    def _on_disconnected(self, _reason: object) -> None:
        # The XEP lets a device forget queued read-outs; the requesters' sessions may be gone too.
        for q in self._queued.values():
            if q.task is not None:
                q.task.cancel()
        self._queued.clear()
