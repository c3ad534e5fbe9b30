"""XEP-0323 read-outs served to a session's contacts: at once or queued for their `when`, from
memory or, reaching back past it, from history.db's buckets; cancel; each device discoverable
as a node. What a request may ask, what a read-out holds and how it is cut into messages:
sensordata.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from slixmpp import JID, Iq, Message
from slixmpp.exceptions import XMPPError
from slixmpp.plugins.xep_0030.stanza import DiscoInfo, DiscoItems
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from ..auth import Permission, allowed
from ..hub import Field, Node, NodeEvent
from ..rollups import Window
from .frontend import Door, FrontEnd
from .sensordata import (
    FIELDS_PER_MESSAGE, HISTORICAL_BY_RES, MAX_DELAY, MAX_HISTORY, MAX_QUEUED, MAX_QUEUED_PER_CLIENT, NS, WHEN_SLACK,
    XML_LANG, NodeError, Readout, ReadoutRequest, Refused, Stored, TextMessage, answering, bad_request, check_attrs,
    check_rate, messages, parse_req, parse_seqnr, read, role_of, text_filter,
)

log = logging.getLogger("iot_gateway.xep0323")



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
        if req.when is None or req.when <= now + WHEN_SLACK:
            beyond = self._beyond(req)
            if beyond and self.session.commands.store is not None:  # older than memory: history.db's buckets answer
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

    def _beyond(self, req: ReadoutRequest) -> list[Field]:
        """The wanted fields whose memory does not reach back to the read-out's `from`."""
        if not req.historical or req.start is None:
            return []
        return [f for f in self._wanted(req) if not f.history or f.history[0].time > req.start]

    async def _stored(self, req: ReadoutRequest, fields: list[Field], now: float) -> Stored:
        """The historical values of `fields` from history.db's buckets over from/to, at the finest
        resolution that keeps the read-out within MAX_HISTORY values ({} without a store)."""
        store = self.session.commands.store
        end = min(now, req.end if req.end is not None else now)
        stored: Stored = {}
        if store is None or not fields or req.start is None or end <= req.start:
            return stored
        window = Window(req.start, end + 1e-6, "read-out")  # `to` is inclusive
        per_field = max(1, MAX_HISTORY // len(fields))
        for f in fields:
            ans = await store.answer(f, window, per_field)
            kind = HISTORICAL_BY_RES[ans.res]
            stored[f.ref] = [(b.t, b.last if b.mean is None else b.mean, kind)
                             for b in ans.rows if b.n and b.t >= req.start]
        return stored

    async def _serve_stored(self, iq: Iq, requester: JID, req: ReadoutRequest, fields: list[Field], now: float) -> None:
        """A historical read-out reaching back past memory: the fields' buckets over from/to."""
        with answering(iq, "read-out request"):
            readout = read(req, now, await self._stored(req, fields, now))  # may refuse: before anything is accepted
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
        now = time.time()
        if not allowed(role_of(self.session, q.requester), Permission.READ):
            readout = Readout(errors=[NodeError(n.id, "access denied", now) for n in req.nodes])
        else:
            try:
                # As a read-out asked now: what memory no longer holds from history.db's buckets.
                readout = read(req, now, await self._stored(req, self._beyond(req), now))
            except Refused as e:
                readout = Readout(errors=[NodeError(n.id, e.text, now) for n in req.nodes])
            except Exception:  # history.db unreadable: the read-out says so (details in the log)
                log.exception("queued read-out %s for %s: history.db not readable", req.seqnr, q.requester)
                why = "history not readable now; ask again later"
                readout = Readout(errors=[NodeError(n.id, why, now) for n in req.nodes])
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
