"""What leaves through the XMPP door: cleaned, and small enough for the server.

One outgoing stanza filter (`Edge.filter`, run before XEP-0198 counts a stanza, so what it
drops or changes is what the server is told about) sees every stanza the gateway sends:

- every character XML 1.0 forbids, in any text or attribute value, becomes U+FFFD
  (`values.clean`): one such character from a device would make the server close the stream;
- a chat body loses its blank lines at the start and the end (`tidy`): clients show them as
  an empty line above or below the text, whatever made the reply;
- every stanza stays under the server's stanza size limit, learned from the stream features
  (XEP-0478, `urn:xmpp:stream-limits:0`) or else DEFAULT_LIMIT: a long chat body is split
  over several messages (at most MAX_PARTS, then summarised), a data form too large loses its
  last fields and says how many, presence status is cut, and anything else too large is
  answered with an error (an IQ result) or not sent (logged).
"""

from __future__ import annotations

import copy
import logging

from slixmpp import ClientXMPP, Iq, Message, Presence
from slixmpp.xmlstream import ET, StanzaBase
from slixmpp.xmlstream.tostring import tostring

from .sensordata import TextMessage
from ..values import NOT_XML, clean

log = logging.getLogger("iot_gateway.edge")

DEFAULT_LIMIT = 64 * 1024  # bytes per stanza when the server does not say (XEP-0478)
ENVELOPE = 1024  # bytes kept for a message's envelope: addresses, id, delay, receipts
MAX_PARTS = 8  # chat messages one reply may take; the rest is summarised
XDATA = "jabber:x:data"
ESCAPED = {"&": 4, "<": 3, ">": 3, '"': 5, "'": 5}  # extra bytes each takes once escaped


def clean_tree(el: ET.Element) -> None:
    """Make every text, tail and attribute value under `el` XML-safe, in place."""
    for e in el.iter():
        if e.text and NOT_XML.search(e.text):
            e.text = clean(e.text)
        if e.tail and NOT_XML.search(e.tail):
            e.tail = clean(e.tail)
        for key, value in e.attrib.items():
            if NOT_XML.search(value):
                e.set(key, clean(value))


def text_cost(text: str) -> int:
    """Bytes `text` takes as XML character data, escaped and UTF-8 encoded."""
    return len(text.encode()) + sum(text.count(c) * n for c, n in ESCAPED.items())


def _cut(line: str, budget: int) -> list[str]:
    """A line too long for one message, in pieces of at most `budget` bytes (a character
    takes at most 6: `&quot;`, or 4 bytes of UTF-8)."""
    step = max(budget // 6, 1)
    return [line[i : i + step] for i in range(0, len(line), step)]


def tidy(text: str) -> str:
    """`text` without its blank lines (empty, or only spaces) at the start and the end,
    and without the spaces ending a line; unchanged when nothing else is left."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines) if lines else text


def split(text: str, budget: int, max_parts: int = MAX_PARTS) -> list[str]:
    """`text` in parts of at most `budget` bytes (as XML), cut between lines (a line longer than
    a part, between characters). Beyond `max_parts` the rest is summarised."""
    if text_cost(text) <= budget:
        return [text]
    room = max(budget - 256, 64)  # the summary line
    lines: list[str] = []
    for line in text.split("\n"):
        lines += _cut(line, room // 2) if text_cost(line) > room // 2 else [line]
    parts: list[list[str]] = []
    part: list[str] = []
    size = 0
    left = len(lines)
    for line in lines:
        cost = text_cost(line) + 1
        if part and size + cost > room:
            parts.append(part)
            if len(parts) == max_parts:
                break
            part, size = [], 0
        part.append(line)
        size += cost
        left -= 1
    else:
        parts.append(part)
        return [tidy("\n".join(p)) for p in parts]
    parts[-1].append(f"… {left} more lines not shown: too long for chat. Ask for less (e.g. one device or field).")
    return [tidy("\n".join(p)) for p in parts]


class Edge:
    """The outgoing filter of one XMPP client: clean text, stanzas under the server's limit."""

    def __init__(self, client: ClientXMPP):
        self.client = client

    @property
    def limit(self) -> int:
        """The server's stanza size limit in bytes (XEP-0478), else DEFAULT_LIMIT."""
        return self.client.limits.max_bytes or DEFAULT_LIMIT

    @property
    def budget(self) -> int:
        """Bytes of payload (chat text, read-out fields) one stanza may carry."""
        return max(self.limit // 2 - ENVELOPE, 1024)

    def text(self, text: str) -> str:
        """Chat text as the filter would leave it, cleaned and tidied: for a message encrypted
        (OMEMO) before the filter sees it."""
        return tidy(clean(text))

    def split(self, text: str) -> list[str]:
        """Chat text, cleaned and tidied, in parts that each fit one message (see `split`):
        for a reply encrypted before the filter sees it."""
        return split(self.text(text), self.budget)

    def size(self, stanza: StanzaBase) -> int:
        """Bytes the stanza takes on the stream."""
        if isinstance(stanza, TextMessage) and stanza.payload:
            return len(stanza.to_text().encode())
        c = self.client
        return len(tostring(stanza.xml, xmlns=c.default_ns, stream=c, top_level=True).encode())

    def filter(self, stanza: StanzaBase) -> StanzaBase | None:
        """Outgoing filter: the stanza made XML-safe, its body tidied, and fitted under the server's limit."""
        clean_tree(stanza.xml)
        if isinstance(stanza, Message) and stanza["body"]:
            body = tidy(stanza["body"])
            if body != stanza["body"]:
                stanza["body"] = body
        limit = self.limit
        size = self.size(stanza)
        if size <= limit:
            return stanza
        body = stanza["body"] if isinstance(stanza, Message) else ""
        if body and size - text_cost(body) + self.budget <= limit:  # the body is what is too large
            parts = split(body, self.budget)
            stanza["body"] = parts[0]
            for part in parts[1:]:
                more = copy.copy(stanza)
                more["id"] = self.client.new_id()
                more["body"] = part
                more.send()
            size = self.size(stanza)
        elif isinstance(stanza, Presence) and stanza["status"]:
            stanza["status"] = split(stanza["status"], self.budget, 1)[0]
            size = self.size(stanza)
        elif isinstance(stanza, Iq) and self._trim_form(stanza):
            size = self.size(stanza)
        if size <= limit:
            return stanza
        if isinstance(stanza, Iq) and stanza["type"] == "result":
            log.warning("an answer of %d bytes to %s is over the server's limit of %d: refused instead", size, stanza["to"], limit)
            return _too_large(stanza, size, limit)
        log.warning("not sent: a %s of %d bytes to %s, over the server's limit of %d", stanza.name, size, stanza["to"], limit)
        return None

    def _trim_form(self, iq: Iq) -> bool:
        """Keep the first fields of the largest data form in `iq` that fit under the limit, and
        say in the form how many are not shown. False when there is no form to trim."""
        forms = list(iq.xml.iter(f"{{{XDATA}}}x"))
        if not forms:
            return False
        form = max(forms, key=len)
        fields = form.findall(f"{{{XDATA}}}field")
        if not fields:
            return False
        for f in fields:
            form.remove(f)
        room = self.limit - self.size(iq) - 2 * ENVELOPE  # for the fields and the note
        kept = 0
        for f in fields:
            room -= len(tostring(f, xmlns=XDATA).encode())
            if room < 0:
                break
            form.append(f)
            kept += 1
        note = ET.Element(f"{{{XDATA}}}instructions")
        note.text = (
            f"{len(fields) - kept} of {len(fields)} fields not shown: the form is over the server's "
            f"stanza size limit ({self.limit} bytes). Ask for one device."
        )
        # XEP-0004's order: instructions first, then the title, then the fields.
        notes = [i for i, e in enumerate(form) if e.tag == f"{{{XDATA}}}instructions"]
        form.insert(notes[-1] + 1 if notes else 0, note)
        return True


def _too_large(iq: Iq, size: int, limit: int) -> Iq:
    """An error in place of an IQ result too large for the server."""
    err = Iq(iq.stream)
    err["id"], err["to"], err["type"] = iq["id"], iq["to"], "error"
    if iq["from"]:
        err["from"] = iq["from"]
    err["error"]["type"] = "wait"
    err["error"]["condition"] = "resource-constraint"
    err["error"]["text"] = f"the answer ({size} bytes) is over the server's stanza size limit ({limit} bytes): ask for less"
    return err
