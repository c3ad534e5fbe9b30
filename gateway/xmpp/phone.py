"""Phone-first chat: what Conversations, Monal and Siskin expect of a contact.

- XEP-0184 receipts and XEP-0333 `displayed` markers: sent once a contact's
  command is accepted for execution, so the phone shows it arrived and was read.
  Strangers get neither (the session turns them away before this module).
- XEP-0308 corrections: an edit is run only when both the edited message and the
  edited text are commands that are safe to repeat (an allow-list: `read`,
  `status`, `history`, `plot`, `list`, `help`); any other edit (`set`,
  `distrust`, an unknown word) is answered "corrections don't re-run commands:
  send it again", with what the original did.
- XEP-0424 retractions undo nothing; the answer says so, and what the original did.

The XMPP session calls `accepted`, then `instead` (an answer that replaces
running the command), then `remember` with the command's reply.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from slixmpp.stanza import Message
from slixmpp.xmlstream import ET

from ..commands import REPEATABLE  # commands that only read (`repeatable=True`): an edit may re-run them
from ..values import clip
from .frontend import Door, FrontEnd


RECEIPTS = "urn:xmpp:receipts"
MARKERS = "urn:xmpp:chat-markers:0"
CORRECT = "urn:xmpp:message-correct:0"
RETRACT = "urn:xmpp:message-retract:1"
RETRACT_OLD = "urn:xmpp:message-retract:0"  # XEP-0424 before 0.4, inside an XEP-0422 <apply-to/>
FASTEN = "urn:xmpp:fasten:0"
HINTS = "urn:xmpp:hints"
SID = "urn:xmpp:sid:0"

MEMORY = 20  # command messages remembered per contact, for edits and retractions
CLIP = 100  # characters of a command or its outcome quoted back
NOT_RERUN = "corrections don't re-run commands: send it again"


@dataclass(frozen=True)
class Done:
    """A command message a contact sent and the first line of what the gateway answered."""

    text: str
    outcome: str

    @property
    def repeatable(self) -> bool:
        """Whether the command only read, so an edit of it may run (even if it was refused)."""
        return repeatable(self.text)


def repeatable(text: str) -> bool:
    """Whether a command line is one an edit may run again (`read`, `status`, …: see REPEATABLE)."""
    words = text.split()
    return bool(words) and words[0].lower() in REPEATABLE


class Phone(FrontEnd):
    """Receipts, markers, corrections and retractions for one XMPP session."""

    def __init__(self, session: Door):
        super().__init__(session)
        self._done: dict[str, OrderedDict[str, Done]] = {}
        disco = self.client.plugin["xep_0030"]
        # Retraction is not advertised: it undoes nothing, so clients should not offer it.
        for feature in (RECEIPTS, MARKERS, CORRECT):
            disco.add_feature(feature)

    def accepted(self, msg: Message) -> None:
        """A contact's message was accepted: answer its receipt request and its `markable`."""
        mid = msg["id"]
        if not mid:
            return  # nothing to refer to
        if msg.xml.find(f"{{{RECEIPTS}}}request") is not None:
            self._ack(msg, ET.Element(f"{{{RECEIPTS}}}received", {"id": mid}))
        if msg.xml.find(f"{{{MARKERS}}}markable") is not None:
            self._ack(msg, ET.Element(f"{{{MARKERS}}}displayed", {"id": mid}))

    def _ack(self, msg: Message, payload: ET.Element) -> None:
        out = self.client.make_message(mto=msg["from"], mtype=msg["type"])
        out.xml.append(payload)
        # Kept in the archive, so the contact's other clients and a phone back from a dead zone see it.
        out.xml.append(ET.Element(f"{{{HINTS}}}store"))
        out.send()

    def instead(self, msg: Message, sender: str) -> str | None:
        """The answer to an edit or a retraction that must not run; None to run the message as a command."""
        target = retracted(msg)
        if target is not None:
            return self._retraction(self._find(sender, target))
        target = replaced(msg)
        if target is None:
            return None
        original = self._find(sender, target)
        edited = clip(msg["body"].strip(), CLIP)
        if original is not None and not original.repeatable:
            return (
                f"Not run: your edit `{edited}`; {NOT_RERUN} as a new message. The message you edited, `{original.text}`, "
                f"already ran ({original.outcome}); an edit neither undoes nor repeats it."
            )
        if not repeatable(edited):
            was = f" of `{original.text}`" if original is not None else ""
            return f"Not run: `{edited}` came as an edit{was}, and {NOT_RERUN} as a new message."
        return None  # an edit of a read into a read: answered like a new command

    def remember(self, msg: Message, sender: str, text: str, reply: str) -> None:
        """Note what a command message did, under every id an edit or retraction may use."""
        outcome = clip(reply.split("\n", 1)[0].strip(), CLIP)
        done = Done(clip(text.strip(), CLIP), outcome)
        ids = {msg["id"], _origin_id(msg), replaced(msg)} - {None, ""}
        memory = self._done.setdefault(sender, OrderedDict())
        for mid in ids:
            memory[mid] = done
            memory.move_to_end(mid)
        while len(memory) > MEMORY:
            memory.popitem(last=False)

    def _find(self, sender: str, mid: str) -> Done | None:
        return self._done.get(sender, {}).get(mid)

    @staticmethod
    def _retraction(original: Done | None) -> str:
        if original is None:
            return (
                "Retracting a message undoes nothing here: what it asked for was already done. "
                "To change something back, send a new command."
            )
        if not original.repeatable:
            return (
                f"Retracting `{original.text}` undoes nothing: it already ran ({original.outcome}). "
                "To change it back, send a new command."
            )
        return f"Retracting `{original.text}` undoes nothing; it only read, so nothing changed."


def replaced(msg: Message) -> str | None:
    """The id of the message an XEP-0308 correction replaces, or None."""
    el = msg.xml.find(f"{{{CORRECT}}}replace")
    return (el.get("id") or None) if el is not None else None


def retracted(msg: Message) -> str | None:
    """The id of the message an XEP-0424 retraction retracts (current or pre-0.4 form), or None."""
    el = msg.xml.find(f"{{{RETRACT}}}retract")
    if el is not None:
        return el.get("id") or ""
    fasten = msg.xml.find(f"{{{FASTEN}}}apply-to")
    if fasten is not None and fasten.find(f"{{{RETRACT_OLD}}}retract") is not None:
        return fasten.get("id") or ""
    return None


def _origin_id(msg: Message) -> str | None:
    el = msg.xml.find(f"{{{SID}}}origin-id")
    return el.get("id") if el is not None else None
