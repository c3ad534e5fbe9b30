"""XEP-0363 HTTP File Upload through the gateway's own XMPP session, for plots.

Discovery asks the gateway's server (disco#info of its domain, then of each of
its disco#items) for `urn:xmpp:http:upload:0` and its `max-file-size`; a slot
is requested with an IQ on the session; the file goes up with an HTTPS PUT whose
certificate is verified against the system's CAs plus `[xmpp] ca_file`, never
with verification off. Anything in the way raises NoPicture with the reason in
words, and the plot falls back to a sparkline.

The slot request and the PUT (connect, TLS, body, the answer's status line) have
one deadline together, DEADLINE: an upload service that takes the body a byte at
a time costs a plot at most that long, and the PUT runs on the event loop, so
nothing is left blocking in a thread after it.

Whoever has a GET URL can fetch the file: the URL is the only secret.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.stanza import Message
from slixmpp.xmlstream import ET

from ..plot import NoPicture, Picture
from ..values import clip

log = logging.getLogger("iot_gateway.upload")

NS = "urn:xmpp:http:upload:0"
OOB = "jabber:x:oob"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
XDATA = "jabber:x:data"
# XEP-0363 §5: the only slot headers a client may pass on to the HTTP server.
PUT_HEADERS = {"authorization", "cookie", "expires"}
IQ_TIMEOUT = 15.0
DEADLINE = 20.0  # seconds for a whole upload: slot request, connect, TLS, body and the server's answer
TIMED_OUT = "upload failed: timed out"
QUOTED = 61  # characters of what the upload service said quoted in an error
RECHECK_ABSENT = 300.0  # seconds before asking again a server that had no upload service


@dataclass(frozen=True)
class Service:
    """An upload service: its JID and the largest file it takes (None: not said)."""

    jid: str
    max_size: int | None


@dataclass(frozen=True)
class Slot:
    """Where to PUT the file (with which headers) and where it can then be fetched."""

    put: str
    get: str
    headers: dict[str, str]


class Uploader:
    """Uploads files through XEP-0363 on the session's own server."""

    def __init__(self, client: ClientXMPP, domain: str, ca_file: Path | None = None):
        self.client = client
        self.domain = domain
        self.ca_file = ca_file
        self._service: Service | None = None
        self._absent_since: float | None = None
        self._absent_reason = ""
        self._ssl: ssl.SSLContext | None = None
        # The server's services may have changed while we were away: look again after a reconnect.
        client.add_event_handler("session_start", lambda _e: self.forget())

    def forget(self) -> None:
        """Drop what discovery found, so the next upload asks the server again."""
        self._service = None
        self._absent_since = None

    async def ready(self) -> Service:
        """The server's upload service; NoPicture when there is none (or it cannot be asked)."""
        if self._service is not None:
            return self._service
        if self._absent_since is not None and time.monotonic() - self._absent_since < RECHECK_ABSENT:
            raise NoPicture(self._absent_reason)
        try:
            found = await self._discover()
        except (IqError, IqTimeout) as e:
            raise NoPicture(f"the server did not answer the upload discovery ({_why(e)})") from None
        if found is None:
            self._absent_since = time.monotonic()
            self._absent_reason = f"the server {self.domain} offers no file upload (XEP-0363)"
            raise NoPicture(self._absent_reason)
        log.info("upload service %s (max %s bytes)", found.jid, found.max_size)
        self._service = found
        return found

    async def upload(self, data: bytes, filename: str, content_type: str) -> Picture:
        """Upload `data`; returns its GET URL. NoPicture, saying why, when that is not possible."""
        service = await self.ready()
        if service.max_size is not None and len(data) > service.max_size:
            raise NoPicture(
                f"the picture ({_kb(len(data))}) is larger than the server accepts ({_kb(service.max_size)})"
            )
        try:
            async with asyncio.timeout(DEADLINE):
                slot = await self._slot(service, filename, len(data), content_type)
                await self._put(slot, data, content_type)
        except TimeoutError:
            log.warning("upload through %s timed out after %g s", service.jid, DEADLINE)
            raise NoPicture(TIMED_OUT) from None
        return Picture(slot.get)

    # ------------------------------------------------------------ XMPP side

    async def _discover(self) -> Service | None:
        disco = self.client.plugin["xep_0030"]
        candidates = [self.domain]
        items = await disco.get_items(jid=self.domain, timeout=IQ_TIMEOUT)
        candidates += [str(jid) for jid, _node, _name in items["disco_items"]["items"]]
        for jid in candidates:
            try:
                info = await disco.get_info(jid=jid, timeout=IQ_TIMEOUT)
            except (IqError, IqTimeout) as e:
                log.debug("disco#info of %s failed: %s", jid, _why(e))
                continue
            if NS in info["disco_info"]["features"]:
                return Service(jid, _max_size(info.xml))
        return None

    async def _slot(self, service: Service, filename: str, size: int, content_type: str) -> Slot:
        iq = self.client.make_iq_get(ito=service.jid)
        request = ET.SubElement(iq.xml, f"{{{NS}}}request")
        request.set("filename", filename)
        request.set("size", str(size))
        request.set("content-type", content_type)
        try:
            result = await iq.send(timeout=IQ_TIMEOUT)
        except IqTimeout:
            raise NoPicture(f"the upload service {service.jid} did not answer") from None
        except IqError as e:
            raise NoPicture(_refusal(e)) from None
        slot = result.xml.find(f"{{{NS}}}slot")
        put = slot.find(f"{{{NS}}}put") if slot is not None else None
        get = slot.find(f"{{{NS}}}get") if slot is not None else None
        if put is None or get is None or not put.get("url") or not get.get("url"):
            raise NoPicture(f"the upload service {service.jid} gave a slot without its URLs")
        for url in (put.get("url"), get.get("url")):
            if urlsplit(url).scheme != "https":
                # The picture and, worse, the slot's authorization would travel in clear text.
                raise NoPicture(f"the upload service gave a non-HTTPS URL ({clip(url, QUOTED)}); refusing to upload")
        headers = {}
        for h in put.findall(f"{{{NS}}}header"):
            name = (h.get("name") or "").strip()
            if name.lower() in PUT_HEADERS:
                headers[name] = " ".join((h.text or "").split())  # no line breaks into the request
        return Slot(put.get("url"), get.get("url"), headers)

    # ------------------------------------------------------------ HTTP side

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if self.ca_file is not None:
                ctx.load_verify_locations(cafile=str(self.ca_file))
            self._ssl = ctx
        return self._ssl

    async def _put(self, slot: Slot, data: bytes, content_type: str) -> None:
        """One HTTP/1.1 PUT over TLS; only the status line of the answer is read."""
        url = urlsplit(slot.put)
        host = url.hostname or ""
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        try:
            port = url.port
        except ValueError:
            port, host = None, ""
        if not host or any(ch <= " " or ch == "\x7f" for ch in target):
            raise NoPicture(f"the upload service gave a malformed PUT URL ({clip(slot.put, QUOTED)})")
        authority = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        lines = [f"PUT {target} HTTP/1.1", f"Host: {authority}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(data)}", "Connection: close", *(f"{k}: {v}" for k, v in slot.headers.items())]
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise NoPicture("the upload service gave slot headers that HTTP cannot carry") from None
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port or 443, ssl=self._context(),
                                                           server_hostname=host)
            writer.write(head + data)
            await writer.drain()
            status = await reader.readline()
        except ssl.SSLCertVerificationError as e:
            raise NoPicture(f"the upload server's certificate could not be verified ({e.verify_message})") from None
        except (OSError, ValueError) as e:  # ValueError: a status line beyond the reader's limit
            raise NoPicture(f"could not reach the upload server {host}: {e}") from None
        finally:
            if writer is not None:
                writer.close()
        parts = status.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise NoPicture(f"the upload server {host} gave no HTTP answer")
        if parts[1] not in ("200", "201"):
            reason = clip(parts[2].strip(), QUOTED) if len(parts) > 2 else ""
            raise NoPicture(f"the upload server answered HTTP {parts[1]} {reason}".rstrip())


def attach_oob(msg: Message, reply: str) -> Message:
    """Add `<x xmlns='jabber:x:oob'><url>` (XEP-0066) to a message whose reply is a Picture."""
    if isinstance(reply, Picture):
        x = ET.SubElement(msg.xml, f"{{{OOB}}}x")
        ET.SubElement(x, f"{{{OOB}}}url").text = str(reply)
    return msg


def _max_size(info: ET.Element) -> int | None:
    query = info.find(f"{{{DISCO_INFO}}}query")
    for form in query.findall(f"{{{XDATA}}}x") if query is not None else []:
        fields = {f.get("var"): f.findtext(f"{{{XDATA}}}value") for f in form.findall(f"{{{XDATA}}}field")}
        if fields.get("FORM_TYPE") == NS and (fields.get("max-file-size") or "").isdigit():
            return int(fields["max-file-size"])  # type: ignore[arg-type]
    return None


def _refusal(e: IqError) -> str:
    err = e.iq["error"]
    too_large = e.iq.xml.find(f".//{{{NS}}}file-too-large")
    if too_large is not None:
        limit = too_large.findtext(f"{{{NS}}}max-file-size") or ""
        return "the server refused the picture as too large" + (f" (at most {_kb(int(limit))})" if limit.isdigit() else "")
    if err["condition"] == "resource-constraint":
        return "the server refused the upload: quota reached" + (f" ({err['text']})" if err["text"] else "")
    return f"the server refused the upload ({_why(e)})"


def _why(e: IqError | IqTimeout) -> str:
    if isinstance(e, IqTimeout):
        return "no answer"
    err = e.iq["error"]
    return err["condition"] + (f": {err['text']}" if err["text"] else "")


def _kb(size: int) -> str:
    return f"{size / 1000:.0f} kB" if size < 1_000_000 else f"{size / 1_000_000:.1f} MB"
