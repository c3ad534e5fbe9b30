"""XEP-0323 (Internet of Things - Sensor Data, v0.6), server side: what a request may ask, what
a read-out holds and how it is cut into messages; readouts.py serves them to a session.

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

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from slixmpp import JID, Iq, Message
from slixmpp.xmlstream import ET, StanzaBase
from slixmpp.xmlstream.tostring import tostring

from ..hub import FieldSpec, Health, Hub, Node, Reading
from ..values import Value, clean
from .frontend import Door
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
