"""OMEMO (issue 17, docs/omemo.md) through the real stack: a Prosody with PEP and MAM, the gateway
with `[xmpp] omemo` on, and contacts whose client is built on slixmpp-omemo (`Omemo` below,
independent of the gateway's own code)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import pytest
import slixmpp
import twomemo.etree
from omemo.storage import Just, Maybe, Nothing, Storage
from omemo.session_manager import NoEligibleDevices
from omemo.types import DeviceInformation, JSONType
from slixmpp import JID
from slixmpp.plugins import register_plugin  # type: ignore[attr-defined]
from slixmpp.xmlstream import ET
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp_omemo import XEP_0384

from gateway.auth import Actor
from gateway.config import ConfigError, parse
from gateway.hub import Health
from gateway.demo.localservers import Prosody
from gateway.xmpp.omemo import REQUIRED, STORE
from gateway.watches import Alert
from gateway.xmpp.session import STRANGER_REPLY
from tests.conftest import USERS, RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.test_rooms import room_lines

pytestmark = [
    pytest.mark.timeout(90),
    # slixmpp-omemo 2.2 uses APIs slixmpp 1.17 marks deprecated.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

LEGACY = "eu.siacs.conversations.axolotl"
OMEMO2 = "urn:xmpp:omemo:2"
SCE = "urn:xmpp:sce:1"
TIMEOUT = 15.0


def sce_envelope(body: str, sender: str, to: str) -> bytes:
    """An XEP-0420 envelope as Converse.js 14 writes it (the test's own, not the gateway's)."""
    return (
        f'<envelope xmlns="{SCE}"><content><body xmlns="jabber:client">{xml_escape(body)}</body></content>'
        f'<rpad>{secrets.token_hex(8)}</rpad><from xmlns="{SCE}" jid="{sender}"/></envelope>'
    ).encode()


def sce_body(data: bytes) -> str | None:
    root = ET.fromstring(data)
    assert root.tag == f"{{{SCE}}}envelope", root.tag
    body = root.find(f"{{{SCE}}}content/{{jabber:client}}body")
    return None if body is None else body.text


class NotForThisDevice(Exception):
    """A message encrypted for other devices of the account (sent before this one was known)."""


class MemoryStore(Storage):
    """A contact client's OMEMO state, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, JSONType] = {}

    async def _load(self, key: str) -> Maybe[JSONType]:
        return Just(self.data[key]) if key in self.data else Nothing()

    async def _store(self, key: str, value: JSONType) -> None:
        self.data[key] = value

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)


class ContactOMEMO(XEP_0384):
    """slixmpp-omemo as a contact's client uses it: blind trust, nothing to prompt."""

    name = "xep_0384"
    default_config = {"fallback_message": "This message is OMEMO encrypted.", "store": None}

    @property
    def storage(self) -> Storage:
        return self.store

    @property
    def _btbv_enabled(self) -> bool:
        return True

    async def _prompt_manual_trust(self, manually_trusted: frozenset[DeviceInformation], identifier: str | None) -> None:
        sm = await self.get_session_manager()
        for d in manually_trusted:
            await sm.set_trust(d.bare_jid, d.identity_key, "BLINDLY_TRUSTED")


class Omemo:
    """A contact's OMEMO client: sends encrypted, decrypts what comes, logs every raw stanza."""

    def __init__(self, server: XmppServer, user: str, resource: str = "phone") -> None:
        c = slixmpp.ClientXMPP(f"{server.jid(user)}/{resource}", server.passwords[user])
        self.client = c
        self.jid = server.jid(user)
        c.ca_certs = server.prosody.ca_file
        c.enable_direct_tls = False
        c.auto_authorize = True
        c.auto_subscribe = True
        for p in ("xep_0030", "xep_0004", "xep_0060", "xep_0115", "xep_0163", "xep_0199", "xep_0203", "xep_0380"):
            c.register_plugin(p)
        register_plugin(ContactOMEMO)  # one class per plugin name per process: ours, right before use
        c.register_plugin("xep_0384", {"store": MemoryStore()})
        self.plugin: ContactOMEMO = c.plugin["xep_0384"]
        self.wire: list[str] = []  # every stanza in and out, as the server saw it
        self.got: asyncio.Queue[tuple[str, str, slixmpp.Message]] = asyncio.Queue()  # (kind, body, stanza)
        self.ready = asyncio.Event()
        c.add_event_handler("omemo_initialized", lambda _e: self.ready.set())
        c.add_event_handler("session_start", self._start)
        c.add_event_handler("message", self._on_message)
        # The `message` event skips bodiless stanzas: OMEMO key exchanges need this too.
        for ns in (LEGACY, OMEMO2):
            c.register_handler(Callback(f"omemo {ns}", MatchXPath(f"{{{c.default_ns}}}message/{{{ns}}}encrypted"), self._bodiless))
        self.namespaces: list[str] = []  # the OMEMO version of each message decrypted, in order
        c.add_filter("in", self._log)
        c.add_filter("out", self._log)
        host, port = server.prosody.address.split(":")
        self.address = (host, int(port))

    def _log(self, stanza: Any) -> Any:
        self.wire.append(str(stanza))
        return stanza

    async def _start(self, _e: object) -> None:
        self.client.send_presence()
        await self.client.get_roster()

    def _bodiless(self, msg: slixmpp.Message) -> None:
        if not msg["body"]:
            asyncio.ensure_future(self._on_message(msg))

    async def _on_message(self, msg: slixmpp.Message) -> None:
        if msg["type"] not in ("chat", "normal"):
            return
        if self.plugin.is_encrypted(msg):
            try:
                ns, body = await self._decrypt(msg)
            except Exception as e:
                if msg["body"] and not isinstance(e, NotForThisDevice):  # (one for other devices of the account is not ours)
                    self.got.put_nowait(("undecryptable", repr(e), msg))
                return
            if body:
                self.namespaces.append(ns)
                self.got.put_nowait(("encrypted", body, msg))
        elif msg["body"]:
            self.got.put_nowait(("plain", msg["body"], msg))

    async def _decrypt(self, msg: slixmpp.Message, sender: str | None = None) -> tuple[str, str | None]:
        """(version, body): as a client that speaks both, through the element with a key for this device.
        `sender`: the real bare JID of a room message's sender."""
        sm = await self.plugin.get_session_manager()
        own = str((await sm.get_own_device_information())[0].device_id)
        keys = {
            OMEMO2: f"{{{OMEMO2}}}encrypted/{{{OMEMO2}}}header/{{{OMEMO2}}}keys/{{{OMEMO2}}}key",
            LEGACY: f"{{{LEGACY}}}encrypted/{{{LEGACY}}}header/{{{LEGACY}}}key",
        }
        ns = next((n for n in (OMEMO2, LEGACY) if any(k.get("rid") == own for k in msg.xml.findall(keys[n]))), None)
        if ns is None and msg["type"] != "groupchat":
            raise NotForThisDevice(msg["id"])
        ns = ns or LEGACY
        if ns == LEGACY:
            only = copy.copy(msg)
            for el in only.xml.findall(f"{{{OMEMO2}}}encrypted"):
                only.xml.remove(el)
            dec, _dev = await self.plugin.decrypt_message(only)
            return ns, dec["body"]
        el = msg.xml.find(f"{{{OMEMO2}}}encrypted")
        plaintext, _dev, _key = await sm.decrypt(twomemo.etree.parse_message(el, sender or msg["from"].bare))
        return ns, None if plaintext is None else sce_body(plaintext)

    async def start(self, alone: bool = True) -> "Omemo":
        """Log in; `alone`: drop the earlier tests' devices from the account's published lists (a new
        phone): each list replaced by one with this device only, never an empty one (the gateway
        fetching it meanwhile would not find the device)."""
        self.client.connect(*self.address)
        await asyncio.wait_for(self.ready.wait(), TIMEOUT)
        if alone:
            sm = await self.plugin.get_session_manager()
            own = (await sm.get_own_device_information())[0].device_id
            for ns in (OMEMO2, LEGACY):
                await sm._upload_device_list(ns, {own: None})  # type: ignore[attr-defined]
                await sm.update_device_list(ns, self.jid, {own: None})
        return self

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(wait=0.5), 3)
        except Exception:
            self.client.abort()

    async def send(self, to: str, text: str, receipt: bool = False, version: str = LEGACY) -> str:
        """Send `text` OMEMO-encrypted, in the legacy namespace as Conversations does or in OMEMO 2
        as Converse.js 14 does; returns the message id. A client that knows no device of the contact
        fetches the contact's device lists once (Conversations does; its cache, fed by PEP
        notifications, may not have caught up yet), then gives up."""
        msg = self.client.make_message(mto=JID(to), mtype="chat", mbody=text)
        msg["id"] = uuid.uuid4().hex
        try:
            enc = await self._encrypt(msg, JID(to), version)
        except NoEligibleDevices:
            await self.plugin.refresh_device_lists({JID(to)}, force_download=True)
            enc = await self._encrypt(msg, JID(to), version)
        assert enc is not None, "nothing encrypted"
        enc["eme"]["namespace"] = version
        enc["eme"]["name"] = "OMEMO"
        if receipt:  # as Conversations: the receipt request stays outside the encryption
            enc.xml.append(ET.Element("{urn:xmpp:receipts}request"))
        enc.send()
        return msg["id"]

    async def _encrypt(self, msg: slixmpp.Message, to: JID, version: str) -> Any:
        if version == LEGACY:  # as Conversations
            enc, _errors = await self.plugin.encrypt_message(msg, to)
            return enc
        await self.plugin.refresh_device_lists({to})  # OMEMO 2, as Converse.js 14: the body in an envelope
        sm = await self.plugin.get_session_manager()
        plaintext = sce_envelope(msg["body"], self.jid, to.bare)
        messages, _errors = await sm.encrypt(frozenset({to.bare}), {OMEMO2: plaintext}, [OMEMO2])
        enc = copy.copy(msg)
        enc.clear()
        enc["body"] = "This message is OMEMO encrypted."
        for m in messages:
            enc.append(twomemo.etree.serialize_message(m))
        return enc

    async def next(self, kind: str | None = None, skip: str = "OMEMO: ", timeout: float = TIMEOUT) -> tuple[str, str]:
        """The next message (kind, body), skipping device announcements."""
        async with asyncio.timeout(timeout):
            while True:
                k, body, _m = await self.got.get()
                if not body.startswith(skip) and (kind is None or k == kind):
                    return k, body

    def drain(self) -> list[tuple[str, str]]:
        out = []
        while not self.got.empty():
            k, body, _m = self.got.get_nowait()
            out.append((k, body))
        return out

    async def ask(self, to: str, text: str, version: str = LEGACY) -> tuple[str, str]:
        self.drain()
        await self.send(to, text, version=version)
        return await self.next()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    """A Prosody of its own, with the message archive (MAM) on, to read what the server stored."""
    prosody = Prosody(tmp_path_factory.mktemp("prosody-omemo"), uploads=False, mam=True)
    passwords = {}
    for user in USERS:
        passwords[user] = secrets.token_urlsafe(12)
        prosody.register(user, passwords[user])
    prosody.start()
    yield XmppServer(prosody, passwords)
    prosody.stop()


@pytest.fixture
async def alice(server: XmppServer) -> AsyncIterator[Omemo]:
    client = await Omemo(server, "alice").start()
    yield client
    await client.stop()


async def start(server: XmppServer, tmp_path: Path, policy: str = "accept") -> RunningGateway:
    """The gateway online with OMEMO ready: its device lists and bundles published."""
    gw = await start_gateway(gateway_config(server, tmp_path, xmpp={"omemo": policy}), server.passwords["gateway"])
    await omemo_ready(gw)
    return gw


async def omemo_ready(gw: RunningGateway) -> None:
    """Wait for the gateway's OMEMO to be ready: from then on a contact finds its device."""
    await asyncio.wait_for(gw.session.omemo.ready.wait(), TIMEOUT)


async def befriend(gw: RunningGateway, contact: Omemo) -> None:
    """Mutual presence subscription, as between a contact and the gateway: PEP then carries device lists."""
    roster = gw.session.client.client_roster
    await until(lambda: roster[contact.jid]["subscription"] == "both", f"{contact.jid} subscribed both ways", TIMEOUT)


async def own_device(gw: RunningGateway) -> int:
    sm = await gw.session.omemo.manager()
    return (await sm.get_own_device_information())[0].device_id


def relay(gw: RunningGateway) -> object:
    latest = gw.gateway.hub.nodes["sim"].fields["relay"].latest
    return latest.value if latest is not None else None


def leaks(text: str, secrets_: list[str]) -> list[str]:
    return [s for s in secrets_ if s in text]


# ---------------------------------------------------------------- the exchange


async def test_encrypted_read_and_set_answered_encrypted_and_nothing_in_clear(
    server: XmppServer, tmp_path: Path, alice: Omemo
) -> None:
    gw = await start(server, tmp_path)
    try:
        await befriend(gw, alice)
        g = gw.jid
        mid = await alice.send(g, "read sim.temp", receipt=True)
        kind, body = await alice.next()
        assert kind == "encrypted" and "sim" in body and "temp" in body, body
        # The receipt stays plain (clients match it by id); only the body is end-to-end.
        receipts = [m for m in alice.wire if "urn:xmpp:receipts" in m and f'id="{mid}"' in m and "<received" in m]
        assert receipts and all(LEGACY not in r for r in receipts)

        assert await alice.ask(g, "set sim.relay on") == ("encrypted", "sim.relay: off → on")
        entry = gw.gateway.hub.audit.entries[-1]
        assert entry.actor == Actor(alice.jid, "admin", "chat")  # the stanza's sender decides, as for plain chat
        # The gateway announced alice's new device to the admins (alice), encrypted too.
        announced = [b for k, b, _m in list(alice.got._queue) if b.startswith("OMEMO: new device")]  # type: ignore[attr-defined]
        assert all(k == "encrypted" for k, b, _m in list(alice.got._queue))  # type: ignore[attr-defined]
        del announced

        # An alert to a contact whose devices the gateway knows goes encrypted.
        gw.session.deliver(Alert("sim.temp ALERT 99 secret-alert", time.time(), (alice.jid,)))
        assert await alice.next() == ("encrypted", "sim.temp ALERT 99 secret-alert")

        # Nothing of the exchange in clear: not on the wire (as the server saw it), not in its archive.
        said = ["read sim.temp", "set sim.relay", "off → on", "secret-alert", "°C"]
        assert not leaks("\n".join(alice.wire), said)
        archive = [p for p in Path(server.prosody.root, "data").rglob("*") if p.is_file() and "archive" in str(p)]
        assert archive, "Prosody's MAM archive holds nothing: is mod_mam on?"
        stored = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in archive)
        assert LEGACY in stored  # the exchange is archived, encrypted
        assert not leaks(stored, said)
    finally:
        await gw.stop()


async def test_alert_plain_to_a_contact_without_omemo_and_withheld_under_require(
    server: XmppServer, tmp_path: Path
) -> None:
    olive = await server.peer("olive").start()  # a plain client: no OMEMO device
    gw = await start(server, tmp_path)
    try:
        gw.session.deliver(Alert("tank low", time.time(), (olive.jid,)))
        assert await olive.reply_from(gw.jid, TIMEOUT) == "tank low"
        gw.session.omemo.policy = "require"
        gw.session.deliver(Alert("tank empty", time.time(), (olive.jid,)))
        gw.session.deliver(Alert("tank full", time.time(), (olive.jid,)))
        with pytest.raises(TimeoutError):
            await olive.reply_from(gw.jid, 1.5)
    finally:
        await gw.stop()
        await olive.stop()


async def test_trust_commands_list_distrust_and_trust_again(
    server: XmppServer, tmp_path: Path, alice: Omemo, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start(server, tmp_path)
    try:
        await befriend(gw, alice)
        g = gw.jid
        assert (await alice.ask(g, "status"))[0] == "encrypted"
        sm = await alice.plugin.get_session_manager()
        own = (await sm.get_own_device_information())[0]
        fp = " ".join(sm.format_identity_key(own.identity_key))
        kind, listing = await alice.ask(g, f"devices {alice.jid}")
        assert kind == "encrypted" and str(own.device_id) in listing and fp in listing, listing
        assert "blindly trusted" in listing

        assert "Error: a fingerprint is 64 hex digits" in (await alice.ask(g, f"trust {alice.jid} 12ab"))[1]
        assert "not a contact" in (await alice.ask(g, f"trust mallory@localhost {fp}"))[1]
        # Another admin (here through the command engine) distrusts alice's phone: its commands are
        # refused in one plain line, and nothing is encrypted for it any more.
        admin = Actor(alice.jid, "admin", "chat")
        caplog.set_level(logging.INFO, logger="iot_gateway.audit")
        reply = await gw.session.commands.run(f"distrust {alice.jid} {fp}", admin)
        assert reply.startswith(f"Distrusted device {own.device_id}")
        kind, body = await alice.ask(g, "set sim.relay on")
        assert kind == "plain" and "distrusted" in body
        assert relay(gw) in (None, False)
        gw.session.deliver(Alert("after distrust", time.time(), (alice.jid,)))
        with pytest.raises(TimeoutError):
            await alice.next(timeout=1.5)

        reply = await gw.session.commands.run(f"trust {alice.jid} {fp}", admin)
        assert reply.startswith(f"Trusted device {own.device_id}")
        audited = [r.getMessage() for r in caplog.records if r.name == "iot_gateway.audit"]
        assert f"{alice.jid} via chat: OMEMO distrust {alice.jid} {fp}" in audited  # who decided, in the audit log
        assert f"{alice.jid} via chat: OMEMO trust {alice.jid} {fp}" in audited
        assert await alice.ask(g, "set sim.relay on") == ("encrypted", "sim.relay: off → on")
        # Viewers and operators may not touch trust.
        refused = await gw.session.commands.run(f"distrust {alice.jid} {fp}", Actor("olive@localhost", "operator", "chat"))
        assert refused.startswith("Refused: admin needs the admin role")
    finally:
        await gw.stop()


# ---------------------------------------------------------------- refusals


async def test_stranger_encrypted_message_gets_the_fixed_refusal_and_is_not_decrypted(
    server: XmppServer, tmp_path: Path
) -> None:
    mallory = await Omemo(server, "mallory").start()
    gw = await start(server, tmp_path)
    try:
        await mallory.send(gw.jid, "set sim.relay on")
        assert await mallory.next() == ("plain", STRANGER_REPLY)
        sm = await gw.session.omemo.manager()
        # No session built, no trust decided: the message was never decrypted.
        assert all(d.trust_level_name == "UNDECIDED" for d in await sm.get_device_information(mallory.jid))
        assert not [e for e in gw.gateway.hub.audit.entries if e.actor.jid == mallory.jid]
    finally:
        await gw.stop()
        await mallory.stop()


async def test_require_refuses_a_plain_command_in_one_line(server: XmppServer, tmp_path: Path) -> None:
    olive = await server.peer("olive").start()
    gw = await start(server, tmp_path, policy="require")
    try:
        assert await olive.ask(gw.jid, "set sim.relay on", TIMEOUT) == REQUIRED
        assert relay(gw) in (None, False)
        assert not gw.gateway.hub.audit.entries
    finally:
        await gw.stop()
        await olive.stop()


# ---------------------------------------------------------------- the key store


async def test_store_survives_restart_and_a_corrupt_one_gives_a_new_device_with_a_warning(
    server: XmppServer, tmp_path: Path, alice: Omemo, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "state" / STORE
    gw = await start(server, tmp_path)
    first = await own_device(gw)
    await befriend(gw, alice)
    assert (await alice.ask(gw.jid, "status"))[0] == "encrypted"
    await gw.stop()
    assert oct(store.stat().st_mode & 0o777) == "0o600"

    gw = await start(server, tmp_path)
    try:
        assert await own_device(gw) == first
        assert (await alice.ask(gw.jid, "status"))[0] == "encrypted"  # the session survived too
    finally:
        await gw.stop()

    store.write_text("{ not json")
    caplog.set_level(logging.WARNING, "iot_gateway.omemo")
    gw = await start(server, tmp_path)
    try:
        second = await own_device(gw)
        assert second != first
        assert "corrupt" in caplog.text and "new OMEMO device" in caplog.text
        assert (tmp_path / "state" / f"{STORE}.corrupt-1").read_text() == "{ not json"
        # The admins are told, and the contact reaches the new device (the lost one left the device list).
        await until(lambda: not alice.got.empty(), "the new-device notice", TIMEOUT)
        for _ in range(2):
            kind, body = await alice.ask(gw.jid, "status")
            if kind == "encrypted":
                break
        assert kind == "encrypted", body
    finally:
        await gw.stop()


@pytest.mark.parametrize("version", [LEGACY, OMEMO2])
async def test_broken_session_gets_a_plain_explanation_and_is_repaired(
    server: XmppServer, tmp_path: Path, alice: Omemo, version: str
) -> None:
    store = tmp_path / "state" / STORE
    gw = await start(server, tmp_path)
    await befriend(gw, alice)
    for _ in range(2):  # two round trips: alice's session is confirmed, her messages carry no key exchange
        assert (await alice.ask(gw.jid, "status", version))[0] == "encrypted"
    gw_device = await own_device(gw)
    await gw.stop()
    # The gateway loses its session with alice's device (a restored backup, a bug): her next message
    # is a plain ratchet message it cannot read.
    data = json.loads(store.read_text())
    gone = [k for k in data if k.startswith(f"/{version}/{alice.jid}/")]
    assert gone, " ".join(sorted({re.sub(r"\d+", "N", k) for k in data}))
    for k in gone:
        del data[k]
    store.write_text(json.dumps(data))
    gw = await start(server, tmp_path)
    try:
        # alice's client started the session: it is "active" on her side until the gateway starts a new one.
        initiation = f"/{version}/{gw.jid}/{gw_device}/initiation"
        before = alice.plugin.store.data[initiation]
        kind, body = await alice.ask(gw.jid, "set sim.relay on", version)
        assert kind == "plain" and body.startswith("I could not decrypt your OMEMO message"), body
        assert "refresh" in body and "nothing was run" in body
        assert relay(gw) in (None, False)
        await until(lambda: alice.plugin.store.data[initiation] != before, "alice's client taking the new session", TIMEOUT)
        # The gateway built a new session and told alice's client (an empty key exchange): her next message works.
        assert await alice.ask(gw.jid, "set sim.relay on", version) == ("encrypted", "sim.relay: off → on")
        assert alice.namespaces[-1] == version
    finally:
        await gw.stop()


async def test_a_key_exchange_without_body_is_processed_and_not_answered(
    server: XmppServer, tmp_path: Path, alice: Omemo
) -> None:
    gw = await start(server, tmp_path)
    try:
        await befriend(gw, alice)
        assert (await alice.ask(gw.jid, "status"))[0] == "encrypted"
        sm = await alice.plugin.get_session_manager()
        gw_id = await own_device(gw)
        gw_dev = next(d for d in await sm.get_device_information(gw.jid) if d.device_id == gw_id)
        ours = f"/{LEGACY}/{alice.jid}/"
        before = {k: v for k, v in gw.session.omemo.store.data.items() if k.startswith(ours) and "key_exchange" in k}
        alice.drain()
        # alice's client replaces its session (as after a decryption failure): an empty message, no body.
        assert not await sm.replace_sessions(gw_dev)
        await until(
            lambda: {k: v for k, v in gw.session.omemo.store.data.items() if k.startswith(ours) and "key_exchange" in k} != before,
            "the gateway taking alice's new session",
            TIMEOUT,
        )
        assert await alice.ask(gw.jid, "set sim.relay on") == ("encrypted", "sim.relay: off → on")
        assert not [b for k, b in alice.drain() if "could not" in b]
    finally:
        await gw.stop()


# ---------------------------------------------------------------- config


def test_omemo_policy_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"jid": "gw@example.org", "password": "x"}
    assert parse({"xmpp": base}).xmpp.omemo == "accept"
    with pytest.raises(ConfigError) as e:
        parse({"xmpp": {**base, "omemo": "always"}})
    assert "xmpp.omemo" in str(e.value)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "slixmpp_omemo" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        parse({"xmpp": {**base, "omemo": "require"}})
    assert "not installed" in str(e.value) and 'omemo = "off"' in str(e.value)
    assert parse({"xmpp": {**base, "omemo": "off"}}).xmpp.omemo == "off"


# ---------------------------------------------------------------- floods


async def test_a_flood_of_garbage_omemo_counts_toward_the_rate_limit_before_decryption(
    server: XmppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every message of a contact counts before anything is decrypted: of 40 undecryptable OMEMO
    messages only `rate_limit` reach the decryption; one notice, then silence; after the window a
    command is answered again."""
    limit, window = 5, 6.0
    olive = await server.peer("olive").start()
    config = gateway_config(server, tmp_path, xmpp={"omemo": "accept"}, gateway={
        "name": "Test GW", "state_dir": str(tmp_path / "state"), "rate_limit": limit, "rate_window": window,
    })
    gw = await start_gateway(config, server.passwords["gateway"])
    caplog.set_level(logging.WARNING, "iot_gateway.omemo")
    try:
        await omemo_ready(gw)
        rid = await own_device(gw)
        garbage = (
            f'<encrypted xmlns="{LEGACY}"><header sid="4242"><key rid="{rid}">AAAA</key><iv>AAAAAAAAAAAAAAAA</iv>'
            '</header><payload>AAAA</payload></encrypted>'
        )
        for _ in range(40):
            msg = olive.client.make_message(mto=gw.jid, mtype="chat", mbody="This message is OMEMO encrypted.")
            msg.xml.append(ET.fromstring(garbage))
            msg.send()
        bodies = []
        while sum(b.startswith("I could not decrypt") for b in bodies) < limit:  # the admitted ones
            bodies.append(await olive.reply_from(gw.jid, TIMEOUT))
        # A ping is answered after every stanza sent before it has been handled by the gateway's stream.
        await olive.client.plugin["xep_0199"].ping(gw.session.client.boundjid.full, timeout=TIMEOUT)
        await asyncio.sleep(1.0)  # any decryption still under way would answer meanwhile
        while not olive.messages.empty():
            bodies.append(olive.messages.get_nowait()["body"])
        tried = [r for r in caplog.records if r.getMessage().startswith(f"cannot decrypt an OMEMO message from {olive.jid}")]
        assert len(tried) == limit, len(tried)
        assert sum(b.startswith("I could not decrypt") for b in bodies) == limit, bodies
        assert sum(b.startswith("Slow down") for b in bodies) == 1, bodies
        await asyncio.sleep(window + 0.5)  # the window passes
        assert (await olive.ask(gw.jid, "status", TIMEOUT)).startswith("Test GW: 1/1 devices OK")
    finally:
        await gw.stop()
        await olive.stop()


# ---------------------------------------------------------------- rooms


async def test_require_posts_in_a_room_only_encrypted_for_the_contacts_there(
    server: XmppServer, tmp_path: Path, alice: Omemo, caplog: pytest.LogCaptureFixture
) -> None:
    """With omemo = "require", a health change reaches the room only as OMEMO for the devices of
    the contacts in it: alice's client decrypts it, victor's plain client sees only the fallback;
    no health in the gateway's room presence; a plain command in the room is not run; the admins
    are told once why."""
    room = f"sealed-{secrets.token_hex(4)}@{server.prosody.muc}"
    caplog.set_level(logging.INFO, "iot_gateway")
    victor = await server.peer("victor").start()
    config = gateway_config(server, tmp_path, xmpp={"omemo": "require", "rooms": [room]})
    gw = await start_gateway(config, server.passwords["gateway"])
    got: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    try:
        await omemo_ready(gw)
        await until(lambda: room in gw.session.rooms.joined, "the gateway in its room", TIMEOUT)
        await befriend(gw, alice)
        alice.client.register_plugin("xep_0045")
        alice.client.add_event_handler("groupchat_message", got.put_nowait)
        await alice.client.plugin["xep_0045"].join_muc_wait(room, "alice", maxstanzas=0, timeout=TIMEOUT)
        await victor.join(room, "victor")
        muc = gw.session.client.plugin["xep_0045"]
        await until(lambda: {"alice", "victor"} <= set(muc.get_roster(JID(room))), "both in the room", TIMEOUT)

        victor.client.send_message(mto=room, mbody="gw: set sim.relay on", mtype="groupchat")
        gw.gateway.hub.set_health("sim", Health.ERROR, "driver crashed")
        async with asyncio.timeout(TIMEOUT):
            while True:
                msg = await got.get()
                if msg["from"].resource == "gw" and alice.plugin.is_encrypted(msg):
                    break
        assert (await alice._decrypt(msg, gw.jid))[1] == "sim: error: driver crashed"  # OMEMO 2 or legacy
        plain = await room_lines(victor, room, "gw")
        assert plain and all(b == "This message is OMEMO encrypted: your client cannot read it. "
                             "Use one with OMEMO (Conversations, Dino, Gajim, Monal)." for b in plain), plain
        assert relay(gw) in (None, False)
        status = muc.get_jid_property(JID(room), "gw", "status")
        assert not status, status
        # Told when it joined (alice's devices were not known yet: that notice went to her encrypted or not at all).
        told = [m for m in caplog.messages if m.startswith(f"Room {room}:")]
        assert len(told) == 1 and 'omemo = "require"' in told[0] and "no commands" in told[0], told
    finally:
        await gw.stop()
        await victor.stop()


async def test_a_routine_start_logs_no_warnings_from_the_omemo_libraries(
    server: XmppServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """First start (keys published) and a restart: the libraries' routine notices are debug, not warnings."""
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        gw = await start(server, tmp_path)
        await own_device(gw)
        await gw.stop()
    noise = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith(("omemo", "slixmpp_omemo"))]
    assert noise == [], "\n".join(noise)


def test_a_library_warning_that_means_something_says_what(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    logging.getLogger("omemo.core").warning("Key exchange replaces existing session.")
    logging.getLogger("omemo.core").warning("Online bundle data differs from offline bundle data.")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "Key exchange replaces existing session: the contact's app started over (reinstalled or restored)")
    ]
