"""Keeping secrets out of the log.

At debug level slixmpp logs every byte it sends and receives ("SEND: …",
"RECV: …"), SASL included: with PLAIN, `<auth>` carries the password in
base64. `SaslRedactor` replaces the text of the SASL elements (`auth`,
`response`, `challenge`, `success`, and SASL2's `initial-response`) with
`[redacted]` before any handler sees the line.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
SLIXMPP_STREAM_LOGGER = "slixmpp.xmlstream.xmlstream"

# The element's text, between its start tag (any prefix, any attributes) and its end tag.
SASL_TEXT = re.compile(
    r"(<((?:[\w.-]+:)?(?:auth|response|challenge|success|initial-response))(?:\s[^>]*)?(?<!/)>)"
    r"([^<]+)"
    r"(</\2\s*>)"
)


def redact_sasl(text: str) -> str:
    """`text` with the payload of every SASL element replaced by [redacted]."""
    return SASL_TEXT.sub(lambda m: m[1] + REDACTED + m[4], text)


class SaslRedactor(logging.Filter):
    """A logging filter that redacts SASL payloads in slixmpp's records; it never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("slixmpp"):
            return True
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):
            return True  # a broken format string: the handler reports it, and it carries no XML
        if "<" in msg:
            # The formatted text replaces msg and args, so handlers never format the original.
            record.msg, record.args = redact_sasl(msg), ()
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add one SaslRedactor to `logger` (default: slixmpp's stream logger, which logs the XML)."""
    logger = logger or logging.getLogger(SLIXMPP_STREAM_LOGGER)
    if not any(isinstance(f, SaslRedactor) for f in logger.filters):
        logger.addFilter(SaslRedactor())
