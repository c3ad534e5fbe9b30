"""XML Schema validation of what the gateway sends, with lxml, against the schemas
published in the XEP texts (copied verbatim into tests/schemas/).

Every test peer runs each stanza it receives from the gateway through `check`:
each payload in the XEP-0323, XEP-0325 and XEP-0004 namespaces (wherever it sits:
a message, an IQ result, an ad-hoc `<command/>`, an IQ `<error/>`) must validate.
A payload that does not is recorded, and the test that caused it fails (see
`raise_failures`, called by tests/xep_helpers.iq and by an autouse fixture).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as StdET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

SCHEMAS = Path(__file__).parent / "schemas"
SD = "urn:xmpp:iot:sensordata"
CTRL = "urn:xmpp:iot:control"
XDATA = "jabber:x:data"
XDV = "http://jabber.org/protocol/xdata-validate"
XDL = "http://jabber.org/protocol/xdata-layout"
XDD = "urn:xmpp:xdata:dynamic"

# Namespace -> schema file, in import order (XEP-0325 and XEP-0336 import
# jabber:x:data and the others without a location, so those come first).
FILES = {
    XDATA: "xep-0004.xsd",
    XDV: "xep-0122.xsd",
    XDL: "xep-0141.xsd",
    SD: "xep-0323.xsd",
    XDD: "xep-0336.xsd",
    CTRL: "xep-0325.xsd",
}
# Payloads in these namespaces are validated wherever they appear in a stanza.
CHECKED = frozenset({SD, CTRL, XDATA})


class SchemaViolation(AssertionError):
    """The gateway sent a payload that its XEP's schema rejects."""


@dataclass
class Failure:
    """One payload that did not validate: the stanza it came in, the payload and why."""

    stanza: str
    payload: str
    errors: list[str]

    def __str__(self) -> str:
        return f"{self.stanza}\n  payload: {self.payload}\n  " + "\n  ".join(self.errors)


# Failures recorded by the peers' stanza filters since the last `raise_failures`.
failures: list[Failure] = []


@functools.cache
def schema() -> etree.XMLSchema:
    """All the XEP schemas as one lxml XMLSchema (compiled once)."""
    imports = "".join(
        f"<xs:import namespace='{ns}' schemaLocation='{(SCHEMAS / name).resolve().as_uri()}'/>"
        for ns, name in FILES.items()
    )
    driver = f"<xs:schema xmlns:xs='http://www.w3.org/2001/XMLSchema'>{imports}</xs:schema>"
    return etree.XMLSchema(etree.fromstring(driver))


def _ns(tag: Any) -> str | None:
    if not isinstance(tag, str):
        return None  # a comment or processing instruction
    return tag[1:].partition("}")[0] if tag.startswith("{") else ""


def _lxml(el: Any) -> etree._Element:
    """A private lxml copy of an ElementTree (slixmpp) or lxml element."""
    if isinstance(el, etree._Element):
        return etree.fromstring(etree.tostring(el))
    return etree.fromstring(StdET.tostring(el))


def _validate(el: etree._Element) -> list[str]:
    s = schema()
    if s.validate(el):
        return []
    return [f"{e.path}: {e.message}" for e in s.error_log]


def problems(payload: Any, draft_ids: frozenset[str] = frozenset()) -> list[str]:
    """Why `payload` does not validate against its XEP's schema; empty when it does.

    A sensor-data answer to a request that a client of an older draft made with
    `id` instead of `seqnr` (slixmpp's own xep_0323 plugin, for one) carries that
    `id` back; when the peer did send a request with that `id` (`draft_ids`),
    the answer is validated with its `id` read as `seqnr`, and nowhere else.

    XEP-0004's schema lists a field's children (desc, required, value*, option*)
    with no room for the extensions that live inside it (XEP-0122 `<validate/>`,
    XEP-0336 `<notSame/>`; XEP-0141 `<page/>` inside `<x/>`). Each such child is
    validated against its own XEP's schema, then left out of the XEP-0004 check;
    a child in a namespace with no schema here is a failure.
    """
    root = _lxml(payload)
    errors: list[str] = []
    if _ns(root.tag) == SD and "seqnr" not in root.attrib and root.get("id") in draft_ids:
        root.set("seqnr", root.attrib.pop("id"))
    forms = [root] if root.tag == f"{{{XDATA}}}x" else []
    forms += list(root.iterdescendants(f"{{{XDATA}}}x"))
    for form in forms:
        for parent in [form, *form.iter(f"{{{XDATA}}}field")]:
            for ext in [c for c in parent if _ns(c.tag) not in (XDATA, None)]:
                if _ns(ext.tag) not in FILES:
                    errors.append(f"{ext.tag}: no schema for this extension of a data form")
                else:
                    errors += _validate(ext)
                parent.remove(ext)
    return errors + _validate(root)


def payloads(stanza: Any) -> Iterator[Any]:
    """The outermost elements in the checked namespaces inside a stanza."""
    for child in stanza:
        if _ns(child.tag) in CHECKED:
            yield child
        else:
            yield from payloads(child)


def check(stanza: Any, summary: str, draft_ids: frozenset[str] = frozenset()) -> list[Failure]:
    """Validate every checked payload of `stanza` (an ElementTree element); record and return the failures."""
    found: list[Failure] = []
    for el in payloads(stanza):
        try:
            errors = problems(el, draft_ids)
        except Exception as e:  # a validator crash must fail the test too, not kill the peer's stream
            errors = [f"validator error: {e!r}"]
        if errors:
            text = StdET.tostring(el, encoding="unicode")
            found.append(Failure(summary, text if len(text) < 2000 else text[:2000] + "…", errors))
    failures.extend(found)
    return found


def draft_id(stanza: Any) -> str | None:
    """The `id` of an XEP-0323 request or cancel made in an older draft's dialect (no `seqnr`)."""
    for el in stanza:
        if el.tag in (f"{{{SD}}}req", f"{{{SD}}}cancel") and "seqnr" not in el.attrib and "id" in el.attrib:
            return el.attrib["id"]
    return None


def raise_failures() -> None:
    """Raise SchemaViolation for every failure recorded so far (and forget them)."""
    if not failures:
        return
    got = failures[:]
    failures.clear()
    raise SchemaViolation(
        f"the gateway sent {len(got)} payload(s) that do not validate against the XEP schemas "
        "in tests/schemas/:\n" + "\n".join(str(f) for f in got)
    )
