"""Hostile XEP-0323/0325 stanzas (hypothesis) over the real Prosody: each gets an
answer, no actuator changes, and the gateway keeps serving."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slixmpp.xmlstream import ET

from tests.conftest import XmppServer
from tests.peer import Peer
from tests.xep_helpers import CTRL, SD, Inbox, child, iq, running

ATTR_VALUES = st.one_of(
    st.sampled_from(["", "true", "false", "1", "-1", "sim", "pump", "probe", "relay", "speed", "9" * 30,
                     "2026-13-45T99:99:99", "1970-01-01T00:00:00Z", "P1D", "NaN", "INF", "<", "&", "\u202e"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12),
)
SD_ATTRS = st.sampled_from(["seqnr", "id", "momentary", "status", "identity", "all", "historical", "from", "to",
                            "when", "serviceToken", "bogus"])
CTRL_PARAMS = st.sampled_from(["boolean", "int", "long", "double", "string", "color", "date", "dateTime",
                               "duration", "time", "bogus"])


@st.composite
def sensor_request(draw: st.DrawFn) -> ET.Element:
    req = ET.Element(f"{{{SD}}}" + draw(st.sampled_from(["req", "cancel", "req"])))
    for name, value in draw(st.dictionaries(SD_ATTRS, ATTR_VALUES, max_size=5)).items():
        req.set(name, value)
    for _ in range(draw(st.integers(0, 3))):
        tag = draw(st.sampled_from(["node", "field", "weird"]))
        el = ET.SubElement(req, f"{{{SD}}}{tag}")
        el.set(draw(st.sampled_from(["nodeId", "name", "x"])), draw(ATTR_VALUES))
    return req


@st.composite
def control_request(draw: st.DrawFn) -> ET.Element:
    s = ET.Element(f"{{{CTRL}}}set")
    for _ in range(draw(st.integers(0, 2))):
        ET.SubElement(s, f"{{{CTRL}}}node").set("nodeId", draw(ATTR_VALUES))
    for _ in range(draw(st.integers(0, 3))):
        p = ET.SubElement(s, f"{{{CTRL}}}" + draw(CTRL_PARAMS))
        for name, value in draw(st.dictionaries(st.sampled_from(["name", "value", "x"]), ATTR_VALUES, max_size=3)).items():
            p.set(name, value)
    return s


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


async def test_hostile_stanzas_get_answers_and_change_nothing(
    xmpp_server: XmppServer, tmp_path: Path, peers: dict[str, Peer]
) -> None:
    victor = peers["victor"]  # a viewer: may read, may never set
    async with running(xmpp_server, tmp_path) as xgw:
        xgw.session.config.gateway.rate_limit = 10_000  # fuzz the parsers, not the rate limit
        writable = {f.ref: f.latest.value if f.latest else None
                    for n in xgw.hub.nodes.values() for f in n.fields.values() if f.spec.writable}
        samples: list[ET.Element] = []

        @FUZZ
        @given(st.one_of(sensor_request(), control_request()))
        def collect(el: ET.Element) -> None:
            samples.append(el)

        collect()
        for el in samples:
            answer = await iq(victor, xgw.jid, el, "set" if el.tag.endswith("}set") else "get")
            assert answer["type"] in ("result", "error")
        now = {ref: xgw.hub.field(ref).latest.value if xgw.hub.field(ref).latest else None for ref in writable}
        assert now == writable
        assert all(e.outcome != "applied" for e in xgw.hub.audit.entries)
        # Still serving: a plain read-out works.
        inbox = Inbox(peers["alice"])
        answer = await iq(peers["alice"], xgw.jid, "<req xmlns='urn:xmpp:iot:sensordata' seqnr='77' momentary='true'/>")
        assert child(answer, SD, "accepted").get("seqnr") == "77"
        assert await inbox.readout(77)
