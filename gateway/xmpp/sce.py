"""Stanza Content Encryption (XEP-0420) envelopes, as OMEMO 2 (`urn:xmpp:omemo:2`) carries them.

OMEMO 2 encrypts an `<envelope>` rather than a bare body: the message's content
(here only its `<body>`) and affixes that bind it to its sender and recipient
(`<from>`, `<to>`), a random padding (`<rpad>`) hiding the length, and the time.
twomemo does the cryptography; this module only writes and reads the envelope.
"""

from __future__ import annotations

import secrets
import string
from datetime import datetime, timezone
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

SCE = "urn:xmpp:sce:1"
CLIENT = "jabber:client"
MAX_RPAD = 200  # characters of random padding, at most


class SceError(ValueError):
    """A decrypted OMEMO 2 payload that is no valid envelope, or one meant for someone else."""


def envelope(body: str, sender: str, to: str) -> bytes:
    """The envelope of a message with `body` from `sender` to `to` (bare JIDs), as UTF-8 bytes."""
    # Written out rather than by ElementTree, which would prefix the namespaces (ns0:body): clients
    # that select elements by name (Converse.js) would find no body.
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f'<envelope xmlns="{SCE}"><content><body xmlns="{CLIENT}">{escape(body)}</body></content>'
        f"<rpad>{_padding()}</rpad><time stamp={quoteattr(stamp)}/>"
        f"<to jid={quoteattr(to)}/><from jid={quoteattr(sender)}/></envelope>"
    ).encode()


def _padding() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(1 + secrets.randbelow(MAX_RPAD)))


def open_envelope(data: bytes, sender: str, to: str) -> str | None:
    """The body of the envelope `data` that `sender` sent to `to` (bare JIDs); None when it holds
    no body (a chat state or marker, say). SceError when it is not an envelope, declares a DTD, or
    its `<from>`/`<to>` affix names another account than the stanza (a copied payload)."""
    if b"<!" in data:  # no DTD (entity expansion), no comments, no CDATA: clients send none
        raise SceError("its content declares XML it should not (a DTD or entity)")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise SceError(f"its content is not XML ({e})") from None
    if root.tag != f"{{{SCE}}}envelope":
        raise SceError("its content is not an SCE envelope")
    for affix, expected in (("from", sender), ("to", to)):
        el = root.find(f"{{{SCE}}}{affix}")
        if el is None:
            continue  # optional in XEP-0420; the session already ties the message to its sender
        jid = (el.get("jid") or "").split("/")[0].lower()
        if jid != expected.lower():
            raise SceError(f"its <{affix}> names {jid or 'nobody'}, not {expected}")
    body = root.find(f"{{{SCE}}}content/{{{CLIENT}}}body")
    if body is None:
        return None
    return body.text or ""
