"""Ad-hoc commands (XEP-0050) through the real Prosody: sessions bound to their
starter, bounded and expiring; the command list per requester; form layout."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from slixmpp import Iq
from slixmpp.exceptions import IqError

from gateway.auth import Actor
from gateway.xmpp.session import STRANGER_REPLY
from tests.conftest import RunningGateway, XmppServer, gateway_config, start_gateway
from tests.peer import Peer

CMD = "http://jabber.org/protocol/commands"
XDATA = "jabber:x:data"
XDV = "http://jabber.org/protocol/xdata-validate"
# XEP-0004's schema order; other namespaces (XEP-0122 <validate/>) after them.
FORM_ORDER = ["instructions", "title", "field", "reported", "item"]
FIELD_ORDER = ["desc", "required", "value", "option"]


def full(gw: RunningGateway) -> str:
    return gw.session.client.boundjid.full


async def execute(peer: Peer, gw: RunningGateway, node: str, timeout: float = 10) -> Iq:
    iq = peer.client.make_iq_set(ito=full(gw))
    iq["command"]["node"] = node
    iq["command"]["action"] = "execute"
    return await iq.send(timeout=timeout)


async def step(peer: Peer, gw: RunningGateway, sid: str, values: dict[str, str] | None = None,
               action: str = "complete", node: str = "set") -> Iq:
    """Send one more step of session `sid`, with a submitted form when `values` is given."""
    iq = peer.client.make_iq_set(ito=full(gw))
    iq["command"]["node"] = node
    iq["command"]["sessionid"] = sid
    iq["command"]["action"] = action
    if values is not None:
        form = peer.client.plugin["xep_0004"].make_form(ftype="submit")
        for var, value in values.items():
            form.add_field(var=var, value=value)
        iq["command"].append(form)
    return await iq.send(timeout=10)


async def refusal(coro: Any) -> IqError:
    with pytest.raises(IqError) as e:
        await coro
    return e.value


def bad_session(err: IqError) -> bool:
    return (err.iq["error"]["condition"] == "bad-request"
            and err.iq.xml.find(f".//{{{CMD}}}bad-sessionid") is not None)


def applied(gw: RunningGateway) -> list:
    return [e for e in gw.gateway.hub.audit.entries if e.outcome == "applied"]


def store(gw: RunningGateway) -> Any:
    return gw.session.adhoc.plugin.sessions


async def commands_of(peer: Peer, gw: RunningGateway) -> dict[str, str]:
    """The ad-hoc command list (disco#items on the commands node) as node → name."""
    res = await peer.client.plugin["xep_0030"].get_items(jid=full(gw), node=CMD, timeout=10)
    assert res["type"] == "result"
    assert res.xml.find("{http://jabber.org/protocol/disco#items}query") is not None
    items = res["disco_items"]["items"]
    assert all(jid == full(gw) for jid, _, _ in items)
    return {node: name for _, node, name in items}


# ------------------------------------------------------------ sessions bound to their starter


async def test_intruders_cannot_complete_or_cancel_a_borrowed_session(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    gw, hub = running_gateway, running_gateway.gateway.hub
    sid = (await execute(peers["alice"], gw, "set"))["command"]["sessionid"]
    before = len(hub.audit.entries)
    for intruder in ("victor", "olive", "mallory"):  # viewer, another operator, a stranger
        err = await refusal(step(peers[intruder], gw, sid, {"sim.speed": "77", "sim.relay": "1"}))
        assert err.iq["error"]["condition"] == "forbidden", intruder
        err = await refusal(step(peers[intruder], gw, sid, action="cancel"))
        assert err.iq["error"]["condition"] == "forbidden", intruder
    assert hub.field("sim.speed").latest.value == 0
    assert hub.field("sim.relay").latest.value is False
    new = list(hub.audit.entries)[before:]
    assert not [e for e in new if e.outcome == "applied"]
    # Contacts' attempts are audited under their own name; the stranger gets nothing, not even a line.
    assert {(e.actor.jid, e.outcome) for e in new} == {("victor@localhost", "refused"), ("olive@localhost", "refused")}
    # The starter's session survived the attempts.
    done = await step(peers["alice"], gw, sid, {"sim.speed": "42"})
    assert done["command"]["notes"] == [("info", "sim.speed: 0 → 42")]
    assert applied(gw)[-1].actor == Actor("alice@localhost", "admin", "adhoc")


async def test_same_account_from_another_resource_is_forbidden(
    running_gateway: RunningGateway, peers: dict[str, Peer], xmpp_server: XmppServer
) -> None:
    gw = running_gateway
    p = xmpp_server.prosody
    second = await Peer(f"{xmpp_server.jid('alice')}/second", xmpp_server.passwords["alice"], p.address, p.ca_file).start()
    try:
        sid = (await execute(peers["alice"], gw, "set"))["command"]["sessionid"]
        err = await refusal(step(second, gw, sid, {"sim.speed": "9"}))
        assert err.iq["error"]["condition"] == "forbidden"
        assert gw.gateway.hub.field("sim.speed").latest.value == 0
        assert not applied(gw)
    finally:
        await second.stop()
    done = await step(peers["alice"], gw, sid, {"sim.speed": "9"})
    assert done["command"]["status"] == "completed"
    assert gw.gateway.hub.field("sim.speed").latest.value == 9


async def test_a_demoted_starter_is_refused_at_the_next_step(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    gw = running_gateway
    sid = (await execute(peers["olive"], gw, "set"))["command"]["sessionid"]
    gw.session.config.contact("olive@localhost").role = "viewer"  # as a config reload would
    err = await refusal(step(peers["olive"], gw, sid, {"sim.speed": "5"}))
    assert err.iq["error"]["condition"] == "forbidden"
    assert gw.gateway.hub.field("sim.speed").latest.value == 0
    assert not applied(gw)
    last = gw.gateway.hub.audit.entries[-1]
    assert (last.actor, last.outcome) == (Actor("olive@localhost", "viewer", "adhoc"), "refused")


async def test_a_viewers_refused_set_is_audited_once_and_shown_by_log(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    gw, hub, victor = running_gateway, running_gateway.gateway.hub, peers["victor"]
    before = len(hub.audit.entries)
    # Asking for the Set form is not a write: refused, not audited.
    err = await refusal(execute(victor, gw, "set"))
    assert err.iq["error"]["condition"] == "forbidden"
    assert len(hub.audit.entries) == before
    # Submitting one is: the execute step carries the form a client had (from an earlier role).
    iq = victor.client.make_iq_set(ito=full(gw))
    iq["command"]["node"] = "set"
    iq["command"]["action"] = "execute"
    form = victor.client.plugin["xep_0004"].make_form(ftype="submit")
    form.add_field(var="sim.relay", value="1")
    iq["command"].append(form)
    err = await refusal(iq.send(timeout=10))
    assert err.iq["error"]["condition"] == "forbidden"
    assert hub.field("sim.relay").latest.value is False
    new = list(hub.audit.entries)[before:]
    assert [(e.actor, e.ref, e.outcome) for e in new] == [(Actor("victor@localhost", "viewer", "adhoc"), "sim.relay", "refused")]
    log = await victor.ask_for(gw.jid, "log sim.relay", "Last ")
    row, *note = log.split("\n")[1:]  # the note under the row, wrapped to a phone's width
    assert row.startswith("sim.relay  refused (1)  ") and " ".join(n.strip() for n in note) == (
        "by victor@localhost via adhoc: set needs the operator role, you are viewer"), log


async def test_unknown_session_id_is_a_bad_request_not_a_new_session(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    gw = running_gateway
    err = await refusal(step(peers["alice"], gw, "no-such-session", {"sim.speed": "5"}))
    assert bad_session(err)
    assert gw.gateway.hub.field("sim.speed").latest.value == 0
    assert len(store(gw)) == 0


# ------------------------------------------------------------ bounded, expiring sessions


async def test_sessions_are_bounded_per_jid(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, sessions = running_gateway, store(running_gateway)
    sids = [(await execute(peers["olive"], gw, "set"))["command"]["sessionid"] for _ in range(sessions.per_jid * 3)]
    assert len(sessions) == sessions.per_jid
    assert bad_session(await refusal(step(peers["olive"], gw, sids[0], {"sim.speed": "1"})))
    assert gw.gateway.hub.field("sim.speed").latest.value == 0
    done = await step(peers["olive"], gw, sids[-1], {"sim.speed": "2"})
    assert done["command"]["notes"] == [("info", "sim.speed: 0 → 2")]
    assert len(sessions) == sessions.per_jid - 1
    # One-step commands leave nothing behind.
    for node in ("read", "status"):
        assert (await execute(peers["olive"], gw, node))["command"]["status"] == "completed"
    assert len(sessions) == sessions.per_jid - 1


async def test_sessions_are_bounded_in_total(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, sessions = running_gateway, store(running_gateway)
    sessions.max_total = 5
    alice = [(await execute(peers["alice"], gw, "set"))["command"]["sessionid"] for _ in range(4)]
    olive = [(await execute(peers["olive"], gw, "set"))["command"]["sessionid"] for _ in range(4)]
    assert len(sessions) == 5
    for sid in alice[:3]:  # the least recently used went first
        assert bad_session(await refusal(step(peers["alice"], gw, sid, {"sim.speed": "1"})))
    assert (await step(peers["alice"], gw, alice[3], {"sim.speed": "3"}))["command"]["status"] == "completed"
    assert (await step(peers["olive"], gw, olive[0], {"sim.speed": "4"}))["command"]["status"] == "completed"
    assert len(sessions) == 3


async def test_idle_sessions_expire(running_gateway: RunningGateway, peers: dict[str, Peer]) -> None:
    gw, sessions = running_gateway, store(running_gateway)
    now = [1000.0]
    sessions.clock = lambda: now[0]
    stale = (await execute(peers["alice"], gw, "set"))["command"]["sessionid"]
    now[0] += sessions.idle - 1
    fresh = (await execute(peers["alice"], gw, "set"))["command"]["sessionid"]
    now[0] += 2  # `stale` is now idle for longer than allowed; `fresh` is not
    assert bad_session(await refusal(step(peers["alice"], gw, stale, {"sim.speed": "6"})))
    assert gw.gateway.hub.field("sim.speed").latest.value == 0
    assert len(sessions) == 1
    assert (await step(peers["alice"], gw, fresh, {"sim.speed": "7"}))["command"]["status"] == "completed"
    # Expired sessions go even when nobody touches them again.
    (await execute(peers["alice"], gw, "set"))
    now[0] += sessions.idle + 1
    await execute(peers["victor"], gw, "read")
    assert len(sessions) == 0


# ------------------------------------------------------------ the command list


async def test_command_list_follows_the_requester_role_and_survives_a_reconnect(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    gw = running_gateway
    everything = {"read": "Read sensors", "set": "Set actuator", "status": "Status"}
    reading = {"read": "Read sensors", "status": "Status"}
    expected = {"alice": everything, "olive": everything, "victor": reading, "mallory": {}}
    for user, cmds in expected.items():
        assert await commands_of(peers[user], gw) == cmds, user

    # A new session (not a XEP-0198 resumption): slixmpp binds again.
    await gw.session.client.disconnect(wait=1.0)
    assert not gw.session.online.is_set()
    async with asyncio.timeout(15):
        await gw.session.online.wait()
    for user, cmds in expected.items():
        assert await commands_of(peers[user], gw) == cmds, user
    # And every listed command runs.
    for node in everything:
        assert (await execute(peers["alice"], gw, node))["command"]["node"] == node


# ------------------------------------------------------------ forms


def assert_order(el: Any, order: list[str]) -> None:
    """x:data children in schema order, foreign-namespace children (XEP-0122) after them."""
    ranks = []
    for c in el:
        ns, _, tag = c.tag[1:].partition("}")
        ranks.append(order.index(tag) if ns == XDATA else len(order))
    assert ranks == sorted(ranks), [c.tag for c in el]


async def test_forms_follow_the_xep_0004_child_order(xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]) -> None:
    devices = [{
        "id": "sim", "driver": "simulated", "interval": 0.2,
        "fields": [
            {"name": "temp", "unit": "°C", "noise": 0, "description": "air temperature"},
            {"name": "relay", "type": "boolean", "writable": True, "description": "heater relay"},
            {"name": "speed", "type": "integer", "writable": True, "min": 0, "max": 100, "description": "fan speed"},
            {"name": "gain", "writable": True, "min": 0.5},
        ],
    }]
    gw = await start_gateway(gateway_config(xmpp_server, tmp_path, devices=devices), xmpp_server.passwords["gateway"])
    try:
        # What the gateway writes: a receiving slixmpp rebuilds the form in its own order.
        sent: list[str] = []

        def capture(stanza: Any) -> Any:
            if stanza.xml.find(f"{{{CMD}}}command/{{{XDATA}}}x") is not None:
                sent.append(str(stanza))
            return stanza

        gw.session.client.add_filter("out_sync", capture)
        for node in ("set", "read"):
            sent.clear()
            await execute(peers["alice"], gw, node)
            assert len(sent) == 1
            form = ET.fromstring(sent[0]).find(f"{{{CMD}}}command/{{{XDATA}}}x")
            assert_order(form, FORM_ORDER)
            fields = form.findall(f"{{{XDATA}}}field")
            assert fields
            for f in fields:
                assert_order(f, FIELD_ORDER)
        set_form = (await execute(peers["alice"], gw, "set"))["command"]["form"]
        speed = set_form.get_fields()["sim.speed"]
        assert speed["desc"] == "fan speed"
        assert speed["validate"]["datatype"] == "xs:integer"
        rng = speed.xml.find(f"{{{XDV}}}validate/{{{XDV}}}range")
        assert rng.attrib == {"min": "0", "max": "100"}
        gain = set_form.get_fields()["sim.gain"].xml.find(f"{{{XDV}}}validate/{{{XDV}}}range")
        assert gain.attrib == {"min": "0.5"}  # no max: the attribute is absent, not "None"
    finally:
        await gw.stop()


# ------------------------------------------------------------ the bare JID (docs/webchat.md)


async def test_commands_are_at_the_full_jid_which_help_names(
    running_gateway: RunningGateway, peers: dict[str, Peer]
) -> None:
    """Prosody answers disco on the gateway's bare JID itself (the account's info, its PEP nodes):
    the command list asked there is `item-not-found` and the info has no commands feature, so
    Converse says "doesn't support ad-hoc commands". `help` names the full JID, where they are;
    a stranger's `help` names nothing."""
    alice, gw = peers["alice"], running_gateway
    alice.client.send_presence_subscription(pto=gw.jid)  # Prosody answers disco on the bare JID only to subscribers
    await alice.presence_from(gw.jid, lambda p: p["type"] == "available")
    disco = alice.client.plugin["xep_0030"]
    err = await refusal(disco.get_items(jid=gw.jid, node=CMD, timeout=10))
    assert err.iq["error"]["condition"] == "item-not-found"
    info = await disco.get_info(jid=gw.jid, timeout=10)
    assert CMD not in info["disco_info"]["features"]
    assert CMD in (await disco.get_info(jid=full(gw), timeout=10))["disco_info"]["features"]

    reply = await alice.ask_for(gw.jid, "help", lambda body: "commands" in body)
    named = [line for line in reply.splitlines() if line.startswith("Ad-hoc")]
    assert named == [f"Ad-hoc commands (forms): {full(gw)}"], reply
    listed = await commands_of(alice, gw)
    assert set(listed.values()) >= {"Read sensors", "Set actuator", "Status"}

    assert await peers["mallory"].ask(gw.jid, "help") == STRANGER_REPLY
