"""The schema check of tests/schema.py can fail: it accepts what the XEPs allow and
rejects what they do not, and the peers' hook turns a rejection into a failed test."""

from __future__ import annotations

from pathlib import Path

import pytest
from slixmpp import Message
from slixmpp.xmlstream import ET

from tests import schema
from tests.peer import Peer

# The control form of XEP-0325's example 5 (getForm answer), with its namespace
# declarations repaired (the XEP's text has `xmlns:xdl:=`).
GOOD_FORM = """
<x type='form' xmlns='jabber:x:data' xmlns:xdv='http://jabber.org/protocol/xdata-validate'
   xmlns:xdl='http://jabber.org/protocol/xdata-layout' xmlns:xdd='urn:xmpp:xdata:dynamic'>
  <title>Dimmer</title>
  <xdl:page label='Output'><xdl:fieldref var='OutputPercent'/></xdl:page>
  <field var='xdd session' type='hidden'><value>325ED0F3</value></field>
  <field var='OutputPercent' type='text-single' label='Output (%):'>
    <desc>Dimmer output, in percent.</desc>
    <value>100</value>
    <xdv:validate datatype='xs:int'><xdv:range min='0' max='100'/></xdv:validate>
    <xdd:notSame/>
  </field>
  <field var='MainSwitch' type='boolean' label='Main switch'><desc>On or off.</desc><value>true</value><xdd:notSame/></field>
</x>"""
VALUE_BEFORE_DESC = GOOD_FORM.replace(
    "<desc>Dimmer output, in percent.</desc>\n    <value>100</value>", "<value>100</value>\n    <desc>Dimmer output, in percent.</desc>"
)
FIELDS = (
    "<fields xmlns='urn:xmpp:iot:sensordata' seqnr='1' done='true'><node nodeId='sim'>"
    "<timestamp value='2024-05-01T12:00:00Z'>{}</timestamp></node></fields>"
)


def test_accepts_what_the_xeps_allow() -> None:
    assert schema.problems(ET.fromstring(GOOD_FORM)) == []
    numeric = "<numeric name='temp' momentary='true' automaticReadout='true' value='21.5' unit='°C'/>"
    assert schema.problems(ET.fromstring(FIELDS.format(numeric))) == []
    assert schema.problems(ET.fromstring("<setResponse xmlns='urn:xmpp:iot:control'><node nodeId='sim'/></setResponse>")) == []
    assert schema.problems(ET.fromstring("<accepted xmlns='urn:xmpp:iot:sensordata' seqnr='4' queued='false'/>")) == []
    assert schema.problems(ET.fromstring("<paramError xmlns='urn:xmpp:iot:control' var='speed'>out of range</paramError>")) == []


def test_rejects_a_value_before_desc() -> None:
    errors = schema.problems(ET.fromstring(VALUE_BEFORE_DESC))
    assert len(errors) == 1 and "{jabber:x:data}desc': This element is not expected" in errors[0], errors


@pytest.mark.parametrize(
    "payload, why",
    [
        (FIELDS.format("<numeric name='temp' momentary='true' value='21.5'/>"), "'unit' is required"),
        (FIELDS.format("<int name='rpm' momentary='true' value='1.5'/>"), "not a valid value of the atomic type 'xs:int'"),
        ("<fields xmlns='urn:xmpp:iot:sensordata' done='true'/>", "'seqnr' is required"),
        ("<failure xmlns='urn:xmpp:iot:sensordata' seqnr='2'><error nodeId='x'>no</error></failure>", "'timestamp' is required"),
        ("<setResponse xmlns='urn:xmpp:iot:control' result='ok'/>", "'result' is not allowed"),
        ("<x xmlns='jabber:x:data' type='form'><field var='a' type='slider'/></x>", "not an element of the set"),
        ("<x xmlns='jabber:x:data' type='form'><field var='a'><foo xmlns='urn:example'/></field></x>", "no schema"),
        (
            "<x xmlns='jabber:x:data' type='form'><field var='a'><validate "
            "xmlns='http://jabber.org/protocol/xdata-validate'><range/><basic/></validate></field></x>",
            "basic",
        ),
    ],
)
def test_rejects_what_the_xeps_do_not_allow(payload: str, why: str) -> None:
    errors = schema.problems(ET.fromstring(payload))
    assert any(why in e for e in errors), errors


async def test_peer_hook_fails_the_test_for_a_bad_payload_from_the_gateway() -> None:
    peer = Peer("alice@localhost", "pw", "127.0.0.1:1", Path("/nonexistent"), gateway="gateway@localhost")
    bad = f"<message xmlns='jabber:client' from='gateway@localhost/gw' to='alice@localhost' type='normal'>{VALUE_BEFORE_DESC}</message>"
    good = bad.replace(VALUE_BEFORE_DESC, GOOD_FORM)
    other = bad.replace("gateway@localhost/gw", "someone@localhost/x")
    for text in (good, other):  # valid, or not from the gateway: nothing recorded
        peer._validate(Message(xml=ET.fromstring(text)))
    assert schema.failures == []
    peer._validate(Message(xml=ET.fromstring(bad)))
    with pytest.raises(schema.SchemaViolation, match=r"(?s)from gateway@localhost/gw.*desc': This element is not expected"):
        schema.raise_failures()
    assert schema.failures == []  # raised once, then forgotten: the autouse check passes


def test_every_payload_of_a_stanza_is_found() -> None:
    """Payloads inside an ad-hoc <command/> and inside an IQ <error/> are checked too."""
    iq = ET.fromstring(
        "<iq xmlns='jabber:client' type='error'><error type='modify'>"
        "<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
        "<paramError xmlns='urn:xmpp:iot:control' var='speed'>too high</paramError></error></iq>"
    )
    cmd = ET.fromstring(
        f"<iq xmlns='jabber:client' type='result'><command xmlns='http://jabber.org/protocol/commands' node='set'>"
        f"{GOOD_FORM}</command></iq>"
    )
    assert [el.tag for el in schema.payloads(iq)] == ["{urn:xmpp:iot:control}paramError"]
    assert [el.tag for el in schema.payloads(cmd)] == ["{jabber:x:data}x"]


def test_older_draft_id_only_where_the_peer_asked_with_it() -> None:
    """`id` instead of `seqnr` is read as `seqnr` only in answers to a request the peer made with that id."""
    answer = ET.fromstring("<accepted xmlns='urn:xmpp:iot:sensordata' id='77'/>")
    assert any("'seqnr' is required" in e for e in schema.problems(answer))
    assert any("'seqnr' is required" in e for e in schema.problems(answer, frozenset({"78"})))
    assert schema.problems(answer, frozenset({"77"})) == []
    req = ET.fromstring("<iq xmlns='jabber:client'><req xmlns='urn:xmpp:iot:sensordata' id='77' momentary='true'/></iq>")
    assert schema.draft_id(req) == "77"
    assert schema.draft_id(ET.fromstring("<iq xmlns='jabber:client'><req xmlns='urn:xmpp:iot:sensordata' seqnr='1'/></iq>")) is None
