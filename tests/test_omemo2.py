"""OMEMO 2 (issue 27, docs/omemo.md) and the admins' device notices, through a real Prosody: contacts
whose client is built on slixmpp-omemo and writes OMEMO 2 as Converse.js 14 does (tests/test_omemo.py's
`Omemo`), the gateway's PEP nodes read as any client reads them, and the identity keys checked the
way libomemo.js (Converse's crypto) checks them."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import twomemo.etree
import x3dh.base_state
import xeddsa
from slixmpp import JID
from slixmpp.exceptions import IqError
from slixmpp.plugins.xep_0060 import XEP_0060
from slixmpp.xmlstream import ET

from gateway.auth import Actor
from gateway.watches import Alert
from gateway.xmpp import omemo_store
from gateway.xmpp.omemo import OMEMO2_ONLY, STORE
from gateway.xmpp.omemo_store import JsonStore
from gateway.xmpp.session import STRANGER_REPLY
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.helpers import until
from tests.test_omemo import (  # noqa: F401 (fixtures)
    LEGACY,
    OMEMO2,
    TIMEOUT,
    Omemo,
    alice,
    befriend,
    leaks,
    own_device,
    relay,
    server,
    start,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

DEVICES2, BUNDLES2 = "urn:xmpp:omemo:2:devices", "urn:xmpp:omemo:2:bundles"
DEVICES_LEGACY = "eu.siacs.conversations.axolotl.devicelist"


async def send_envelope(client: Omemo, to: str, plaintext: bytes) -> None:
    """An OMEMO 2 message whose encrypted content is `plaintext`, whatever it holds."""
    await client.plugin.refresh_device_lists({JID(to)})
    sm = await client.plugin.get_session_manager()
    messages, _errors = await sm.encrypt(frozenset({to}), {OMEMO2: plaintext}, [OMEMO2])
    msg = client.client.make_message(mto=JID(to), mtype="chat", mbody="This message is OMEMO encrypted.")
    for m in messages:
        msg.append(twomemo.etree.serialize_message(m))
    msg.send()


async def items(server: XmppServer, owner: str, node: str, reader: Omemo | None = None) -> list[ET.Element] | None:
    """The payloads of `owner`'s PEP node as a client sees them (victor's, or `reader`, a contact of
    `owner` with presence subscription); None when there is no such node."""
    peer = None
    if reader is None:
        peer = server.peer("victor")
        peer.client.register_plugin("xep_0060")
        await peer.start()
    try:
        client = reader.client if reader is not None else peer.client  # type: ignore[union-attr]
        iq = await client.plugin["xep_0060"].get_items(JID(owner), node, timeout=TIMEOUT)
    except IqError as e:
        assert e.condition == "item-not-found", e.condition
        return None
    finally:
        if peer is not None:
            await peer.stop()
    return [next(iter(item.xml)) for item in iq["pubsub"]["items"]]


def verifies_as_libomemo(bundle: ET.Element) -> bool:
    """Whether an OMEMO 2 bundle's signed pre-key signature verifies as libomemo.js 2 (Converse.js 14)
    verifies it: with the Curve25519 form of the identity key, the Ed25519 sign bit assumed clear."""
    ns = f"{{{OMEMO2}}}"
    ik = base64.b64decode(bundle.findtext(f"{ns}ik") or "")
    spk = base64.b64decode(bundle.findtext(f"{ns}spk") or "")
    spks = base64.b64decode(bundle.findtext(f"{ns}spks") or "")
    curve = xeddsa.ed25519_pub_to_curve25519_pub(ik)
    return xeddsa.ed25519_verify(spks, xeddsa.curve25519_pub_to_ed25519_pub(curve, False), spk)


# ---------------------------------------------------------------- both versions, each answered in its own


async def test_omemo2_and_legacy_contacts_are_each_answered_in_their_version_and_nothing_in_clear(
    server: XmppServer, tmp_path: Path, alice: Omemo
) -> None:
    olive = await Omemo(server, "olive").start()
    gw = await start(server, tmp_path)
    try:
        await befriend(gw, alice)
        await befriend(gw, olive)
        kind, body = await alice.ask(gw.jid, "read sim.temp", version=OMEMO2)
        assert kind == "encrypted" and "temp" in body and alice.namespaces[-1] == OMEMO2, (kind, body)
        assert await alice.ask(gw.jid, "set sim.relay on", version=OMEMO2) == ("encrypted", "sim.relay: off → on")
        assert alice.namespaces[-1] == OMEMO2
        assert gw.gateway.hub.audit.entries[-1].actor == Actor(alice.jid, "admin", "chat")
        # `devices` shows the gateway's key also as OMEMO 2 clients show it (Converse.js: the Ed25519 form).
        sm = await alice.plugin.get_session_manager()
        gw_id = await own_device(gw)
        seen = next(d for d in await sm.get_device_information(gw.jid) if d.device_id == gw_id)
        ed = seen.identity_key.hex()
        kind, listing = await alice.ask(gw.jid, "devices", version=OMEMO2)
        assert " ".join(ed[i:i + 8] for i in range(0, 64, 8)) in listing and "OMEMO 2 and legacy" in listing, listing
        # olive's client writes legacy OMEMO: she is answered in legacy OMEMO.
        assert await olive.ask(gw.jid, "set sim.relay off") == ("encrypted", "sim.relay: on → off")
        assert olive.namespaces == [LEGACY]
        # An alert goes in the version the contact last wrote in.
        gw.session.deliver(Alert("sim.temp ALERT 99 secret-alert", time.time(), (alice.jid,)))
        assert await alice.next() == ("encrypted", "sim.temp ALERT 99 secret-alert")
        assert alice.namespaces[-1] == OMEMO2

        said = ["read sim.temp", "set sim.relay", "off → on", "on → off", "secret-alert", "°C"]
        assert not leaks("\n".join(alice.wire + olive.wire), said)
        archive = [p for p in Path(server.prosody.root, "data").rglob("*") if p.is_file() and "archive" in str(p)]
        stored = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in archive)
        assert OMEMO2 in stored and LEGACY in stored
        assert not leaks(stored, said)
    finally:
        await gw.stop()
        await olive.stop()


async def test_an_omemo2_envelope_not_from_its_sender_is_not_run(server: XmppServer, tmp_path: Path, alice: Omemo) -> None:
    """A contact's device that wraps another account's content (an envelope whose <from> is olive),
    or content with a DTD (entity expansion): one plain line, nothing run."""
    gw = await start(server, tmp_path)
    try:
        await befriend(gw, alice)
        assert (await alice.ask(gw.jid, "status", version=OMEMO2))[0] == "encrypted"  # the session works
        forged = (
            '<envelope xmlns="urn:xmpp:sce:1"><content><body xmlns="jabber:client">set sim.relay on</body></content>'
            '<rpad>x</rpad><from jid="olive@localhost"/></envelope>'
        )
        bomb = (
            '<!DOCTYPE e [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            '<envelope xmlns="urn:xmpp:sce:1"><content><body xmlns="jabber:client">set sim.relay on &b;</body>'
            "</content><rpad>x</rpad></envelope>"
        )
        for plaintext, why in ((forged, "names olive@localhost"), (bomb, "DTD")):
            alice.drain()
            await send_envelope(alice, gw.jid, plaintext.encode())
            kind, body = await alice.next()
            assert kind == "plain" and body.startswith("I could not decrypt your OMEMO message") and why in body, body
        assert relay(gw) in (None, False)
        assert not [e for e in gw.gateway.hub.audit.entries if "relay" in str(e)]
    finally:
        await gw.stop()


# ---------------------------------------------------------------- what is published


async def test_a_new_gateway_publishes_both_versions_with_a_key_converse_can_verify(
    server: XmppServer, tmp_path: Path
) -> None:
    """Three new gateways (three new keys): each OMEMO 2 bundle on the server verifies as libomemo.js
    checks it (python-omemo's own keys fail there one time in two); the legacy list has the device too."""
    for n in range(3):
        gw = await start(server, tmp_path / str(n))
        try:
            device = await own_device(gw)
            for node in (DEVICES2, DEVICES_LEGACY):  # published before OMEMO is ready (`start` waits for it)
                assert await listed(server, gw.jid, node, device), f"device {device} not in {node}"
            bundles = await items(server, gw.jid, BUNDLES2)
            assert bundles and all(verifies_as_libomemo(b) for b in bundles), "a bundle Converse.js would refuse"
        finally:
            await gw.stop()


class Publishes(logging.Handler):
    """The gateway's OMEMO publishes (its `xep_0060.publish`), each confirmed by the server only
    `late` seconds after the server's result came, and its "OMEMO ready" log line, in one list:
    ("sent" | "confirmed", node, item id and payload) and ("ready", "", "")."""

    def __init__(self, gateway: str, late: float, refuse: str | None = None) -> None:
        super().__init__(logging.INFO)
        self.gateway, self.late, self.refuse = gateway, late, refuse
        self.events: list[tuple[str, str, str]] = []
        self.real = XEP_0060.publish

    def emit(self, record: logging.LogRecord) -> None:
        """The ready line, in order with the publishes."""
        if record.getMessage().startswith("OMEMO ready"):
            self.events.append(("ready", "", ""))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Wrap every client's publish (in this process); only the gateway's are delayed and recorded."""
        publishes = self

        async def publish(plugin: XEP_0060, jid: JID, node: str, id: str | None = None, payload: Any = None,
                          *args: Any, **kwargs: Any) -> Any:
            if plugin.xmpp.boundjid.bare != publishes.gateway or not node.startswith((OMEMO2, LEGACY)):
                return await publishes.real(plugin, jid, node, id, payload, *args, **kwargs)
            text = f"{id} " + ("" if payload is None else ET.tostring(payload, encoding="unicode"))
            publishes.events.append(("sent", node, text))
            if publishes.refuse is not None and node.startswith(DEVICES_LEGACY):
                jid = JID(publishes.refuse)  # into someone else's PEP: the server refuses it
            result = await publishes.real(plugin, jid, node, id, payload, *args, **kwargs)
            await asyncio.sleep(publishes.late)  # the server's confirmation reaches the gateway late
            publishes.events.append(("confirmed", node, text))
            return result

        monkeypatch.setattr(XEP_0060, "publish", publish)
        logging.getLogger("iot_gateway.omemo").addHandler(self)  # (its level: the test's caplog.set_level)

    def remove(self) -> None:
        """Stop recording the log (the publish is restored by monkeypatch)."""
        logging.getLogger("iot_gateway.omemo").removeHandler(self)


async def test_omemo_is_ready_only_once_the_server_confirmed_its_device_lists_and_bundles(
    server: XmppServer, tmp_path: Path, alice: Omemo, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A server slow to confirm the gateway's PEP publishes: OMEMO is said ready (the log line,
    `ready`) only once the server confirmed each version's device list with the gateway's device
    and its bundle, and nothing it publishes afterwards leaves the device out (it did: a new
    device emptied the lists after "ready", and contacts found no device to encrypt for). A
    contact fetching the lists from the server as a client does finds the device at once."""
    publishes = Publishes(server.jid("gateway"), late=0.3)
    publishes.install(monkeypatch)
    caplog.set_level(logging.INFO, "iot_gateway.omemo")
    try:
        gw = await start_gateway(gateway_config(server, tmp_path, xmpp={"omemo": "accept"}), server.passwords["gateway"])
        try:
            await until(lambda: ("ready", "", "") in publishes.events, "OMEMO ready in the gateway's log", TIMEOUT)
            device = await own_device(gw)
            for node in (DEVICES2, DEVICES_LEGACY):  # as a client fetches them, at once
                assert await listed(server, gw.jid, node, device), f"device {device} not in {node}"
            ready = publishes.events.index(("ready", "", ""))
            before, after = publishes.events[:ready], publishes.events[ready:]
            for node in (DEVICES2, DEVICES_LEGACY):
                lists = [text for what, n, text in before if what == "confirmed" and n == node]
                assert lists and f'id="{device}"' in lists[-1], (node, lists)
            for node in (BUNDLES2, f"{DEVICES_LEGACY.replace('devicelist', 'bundles')}:{device}"):
                assert [n for what, n, text in before if what == "confirmed" and n == node], (node, before)
            dropped = [(n, text) for what, n, text in after if n in (DEVICES2, DEVICES_LEGACY) and f'id="{device}"' not in text]
            assert not dropped, dropped
            assert gw.session.omemo.ready.is_set()
            await befriend(gw, alice)
            kind, body = await alice.ask(gw.jid, "read sim.temp")
            assert kind == "encrypted" and body.startswith("sim.temp = "), (kind, body)
        finally:
            await gw.stop()
    finally:
        publishes.remove()


async def test_omemo_refused_by_the_server_is_never_said_ready(
    server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The server refuses the gateway's legacy device list: no "OMEMO ready", `ready` stays unset,
    the log says OMEMO could not start, and an admin's `devices` says OMEMO is not working."""
    publishes = Publishes(server.jid("gateway"), late=0.0, refuse=server.jid("mallory"))
    publishes.install(monkeypatch)
    caplog.set_level(logging.INFO, "iot_gateway.omemo")
    try:
        gw = await start_gateway(gateway_config(server, tmp_path, xmpp={"omemo": "accept"}), server.passwords["gateway"])
        try:
            await until(lambda: gw.session.omemo.failed is not None, "OMEMO failing to start", TIMEOUT)
            assert any(n.startswith(DEVICES_LEGACY) for what, n, _t in publishes.events if what == "sent")
            assert not gw.session.omemo.ready.is_set()
            assert not [m for m in caplog.messages if m.startswith("OMEMO ready")]
            assert [m for m in caplog.messages if m.startswith("OMEMO could not start")]
            reply = await gw.session.commands.run("devices", Actor(server.jid("alice"), "admin", "chat"))
            assert "OMEMO could not start" in reply, reply
        finally:
            await gw.stop()
    finally:
        publishes.remove()


async def test_new_key_stores_have_keys_every_omemo2_client_verifies(tmp_path: Path) -> None:
    for n in range(32):
        store = JsonStore(tmp_path / f"{n}.json")
        assert await store.prepare_identity()
        assert omemo_store.verifiable(store.data)
        assert json.loads((tmp_path / f"{n}.json").read_text())[omemo_store.KEY] == store.data[omemo_store.KEY]


def key_store_with_an_unverifiable_key(path: Path) -> None:
    """An omemo.json as an earlier version left it: an identity key whose Ed25519 sign bit is set."""
    while True:
        seed = secrets.token_bytes(32)
        if xeddsa.seed_to_ed25519_pub(seed)[31] & 0x80:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"/ikp/is_seed": True, "/ikp/key": base64.urlsafe_b64encode(seed).decode()}))


async def test_an_old_key_some_clients_cannot_verify_publishes_only_legacy_and_withdraws_omemo2(
    server: XmppServer, tmp_path: Path, alice: Omemo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway upgraded from a version that published OMEMO 2 with a key libomemo.js refuses: on
    start its OMEMO 2 device list and bundles are gone from the server, the legacy ones stay; a
    message in OMEMO 2 gets the refusal; legacy works as before, with the same device."""
    key_store_with_an_unverifiable_key(tmp_path / "state" / STORE)
    with monkeypatch.context() as m:  # as the earlier version did: both published
        m.setattr(omemo_store, "verifiable", lambda data: True)
        gw = await start(server, tmp_path)
        device = await own_device(gw)
        await gw.stop()
    assert await items(server, gw.jid, DEVICES2), "the earlier version's OMEMO 2 list is not there to withdraw"

    gw = await start(server, tmp_path)
    olive = await server.peer("olive").start()
    try:
        assert await own_device(gw) == device
        assert gw.session.omemo.plugin.versions == (LEGACY,)
        await befriend(gw, alice)  # (a stranger may not even learn whether a node exists: "forbidden")
        assert await items(server, gw.jid, DEVICES2, alice) is None
        assert await items(server, gw.jid, BUNDLES2, alice) is None
        legacy = await items(server, gw.jid, DEVICES_LEGACY, alice)
        assert legacy and str(device) in ET.tostring(legacy[0], encoding="unicode")
        # A client that still has the old OMEMO 2 session writes in OMEMO 2: refused in one line.
        msg = olive.client.make_message(mto=gw.jid, mtype="chat", mbody="This message is OMEMO encrypted.")
        msg.xml.append(ET.fromstring(
            f'<encrypted xmlns="{OMEMO2}"><header sid="1"><keys jid="{gw.jid}"><key rid="{device}">AAAA</key>'
            "</keys></header><payload>AAAA</payload></encrypted>"
        ))
        msg.send()
        assert await olive.reply_from(gw.jid, TIMEOUT) == OMEMO2_ONLY
        assert await alice.ask(gw.jid, "set sim.relay on") == ("encrypted", "sim.relay: off → on")
        assert alice.namespaces == [LEGACY]
    finally:
        await gw.stop()
        await olive.stop()


async def test_a_broken_omemo2_message_gets_the_plain_explanation(server: XmppServer, tmp_path: Path) -> None:
    olive = await server.peer("olive").start()
    gw = await start(server, tmp_path)
    try:
        msg = olive.client.make_message(mto=gw.jid, mtype="chat", mbody="This message is OMEMO encrypted.")
        msg.xml.append(ET.fromstring(f'<encrypted xmlns="{OMEMO2}"><header sid="1"/><payload>AAAA</payload></encrypted>'))
        msg.send()
        body = await olive.reply_from(gw.jid, TIMEOUT)
        assert body.startswith("I could not decrypt your OMEMO message (it is not a well-formed OMEMO message)"), body
    finally:
        await gw.stop()
        await olive.stop()


# ---------------------------------------------------------------- the admins' device notices


def notices(gw: RunningGateway) -> list[str]:
    """Every OMEMO device notice the gateway delivers to the admins, recorded from now on."""
    said: list[str] = []
    deliver = gw.session.deliver

    def record(alert: Alert) -> None:
        if alert.text.startswith("OMEMO: "):
            said.append(alert.text)
        deliver(alert)

    gw.session.deliver = record  # type: ignore[method-assign]
    return said


class UnpickedPreKeys:
    """x3dh's `secrets`, whose `choice` of a pre key from a bundle never returns one it returned before."""

    def __init__(self) -> None:
        self.picked: set[object] = set()

    def choice(self, seq: list[Any]) -> Any:
        """A random one not picked before (any, when all were)."""
        fresh = [x for x in seq if x not in self.picked] or seq
        pick = secrets.choice(fresh)
        self.picked.add(pick)
        return pick

    def __getattr__(self, name: str) -> Any:
        return getattr(secrets, name)


async def test_new_devices_make_one_notice_per_contact_per_hour(
    server: XmppServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five new devices of alice in a burst (five browser sessions): one notice naming the five; olive's
    new device: her own notice; alice's sixth device within the hour: in the next notice, when the hour
    (here shortened) is over. A stranger's devices: never a notice."""
    # Five devices that fetch the gateway's bundle at once pick one of its 100 one-time pre-keys each:
    # two the same one time in ten, and the second is refused ("No pre key with id …": OMEMO's own race,
    # answered with a repair). Not what this test is about: each device gets a pre-key of its own.
    monkeypatch.setattr(x3dh.base_state, "secrets", UnpickedPreKeys())
    five = [await Omemo(server, "alice", f"browser{n}").start(alone=n == 0) for n in range(5)]
    olive = await Omemo(server, "olive").start()
    mallory = await Omemo(server, "mallory").start()
    sixth: Omemo | None = None
    gw = await start(server, tmp_path)
    said = notices(gw)
    gw.session.omemo.notices.gather = 6.0
    try:
        await befriend(gw, five[0])
        await befriend(gw, olive)
        ids = {await own(p) for p in five}
        await until_async(lambda: known(gw, "alice@localhost", ids), "the gateway knowing alice's five devices")
        for p in five:  # in a burst: each device's first message, not waiting for the answers
            await p.send(gw.jid, "status", version=OMEMO2)
        await olive.send(gw.jid, "status")
        await mallory.send(gw.jid, "status")
        for p in five + [olive]:
            got = await p.next(timeout=TIMEOUT)
            assert got[0] == "encrypted", got
        assert await mallory.next() == ("plain", STRANGER_REPLY)
        await until(lambda: len(said) >= 2, "the two notices", 20)
        about_alice = [t for t in said if "alice@localhost" in t]
        assert len(about_alice) == 1 and about_alice[0].startswith("OMEMO: 5 new devices of alice@localhost:"), said
        assert all(str(i) in about_alice[0] for i in ids) and about_alice[0].count("distrust alice@localhost ") == 5
        about_olive = [t for t in said if "olive@localhost" in t]
        assert len(about_olive) == 1 and about_olive[0].startswith(f"OMEMO: new device {await own(olive)} of olive@localhost")

        # A sixth device, within the hour of alice's notice: held for the next one.
        gw.session.omemo.notices.every = 8.0
        sixth = await Omemo(server, "alice", "browser5").start(alone=False)
        await sixth.send(gw.jid, "status", version=OMEMO2)
        got = await sixth.next(timeout=TIMEOUT)
        assert got[0] == "encrypted", got
        assert len(said) == 2, said
        await until(lambda: len(said) == 3, "the notice at the end of the hour", 20)
        assert said[2].startswith(f"OMEMO: new device {await own(sixth)} of alice@localhost"), said[2]
        assert not [t for t in said if "mallory" in t]
    finally:
        await gw.stop()
        for p in five + [olive, mallory] + ([sixth] if sixth else []):
            await p.stop()


async def until_async(check: Callable[[], Awaitable[bool]], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.2)


async def known(gw: RunningGateway, jid: str, ids: set[int]) -> bool:
    """Whether the gateway knows the devices `ids` of `jid` (their list fetched again to know)."""
    await gw.session.omemo.plugin.refresh_device_lists({JID(jid)}, force_download=True)
    sm = await gw.session.omemo.manager()
    return ids <= {d.device_id for d in await sm.get_device_information(jid)}


async def listed(server: XmppServer, owner: str, node: str, device: int) -> bool:
    try:
        found = await items(server, owner, node)
    except AssertionError:  # no such node yet ("forbidden" to a stranger)
        return False
    return bool(found) and f'id="{device}"' in ET.tostring(found[0], encoding="unicode")


async def own(client: Omemo) -> int:
    sm = await client.plugin.get_session_manager()
    return (await sm.get_own_device_information())[0].device_id
