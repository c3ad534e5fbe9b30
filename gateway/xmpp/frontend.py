"""The shape of an XMPP front-end, and the narrow view of the session it gets.

A front-end (`sensordata` for XEP-0323, `control` for XEP-0325, `adhoc`,
`rooms`, `phone`, `omemo`) is a `FrontEnd`: built with a `Door`, it registers
its stanza handlers on the door's client; `start()` subscribes it to the hub
(under itself, as owner), `stop()` undoes that. The session builds the list,
starts them and stops them in reverse order. A front-end depends on the
`Door` protocol, not on the session module, so the flow of imports runs one
way: session -> front-ends -> this module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from slixmpp import ClientXMPP
    from slixmpp.stanza import Message

    from ..auth import Actor
    from ..commands import Commands
    from ..config import Config, XmppSection
    from ..hub import Hub
    from ..watches import Alert


class Outgoing(Protocol):
    """What front-ends ask of the edge (gateway/xmpp/edge.py): the room left in one stanza."""

    def budget(self) -> int:
        """Characters of text one stanza may still carry."""
        ...

    def split(self, text: str) -> list[str]:
        """`text` cleaned and cut in parts that each fit one stanza."""
        ...


class RoomCipher(Protocol):
    """What rooms ask of OMEMO (gateway/xmpp/omemo.py): an encrypted groupchat post."""

    async def to_room(self, room: str, text: str, occupants: set[str], out: Message | None = None) -> str | None:
        """Send `text` encrypted to `room`; None when sent, else why not."""
        ...


class Door(Protocol):
    """The part of the XMPP session (gateway/xmpp/session.py) a front-end may use."""

    client: ClientXMPP
    config: Config
    xcfg: XmppSection
    hub: Hub
    commands: Commands
    edge: Outgoing
    online: asyncio.Event
    omemo: Any  # a RoomCipher (and more) when [xmpp] omemo is on, else None
    alert_hooks: list[Callable[[Alert, bool], None]]

    def deliver(self, alert: Alert) -> None:
        """Send an alert to its contacts now, or when the session is back."""
        ...

    def allow_rate(self, jid: str) -> bool:
        """Whether a contact is still within the command rate limit (counts this one)."""
        ...

    def run_command(
        self, text: str, actor: Actor, progress: Callable[[str], Awaitable[None]] | None = None
    ) -> Awaitable[str]:
        """Run a chat command and return its reply."""
        ...

    async def on_message(self, msg: Message) -> None:
        """Handle a chat message as if it had just arrived (OMEMO hands on decrypted ones)."""
        ...


class FrontEnd:
    """One XMPP front-end: built with the door, started and stopped by the session."""

    def __init__(self, session: Door) -> None:
        self.session = session
        self.client = session.client

    @property
    def hub(self) -> Hub:
        """The session's hub."""
        return self.session.hub

    def start(self) -> None:
        """Begin listening to the hub (listeners subscribed with `self` as owner)."""

    def stop(self) -> None:
        """Stop listening: every hub listener this front-end subscribed goes."""
        self.hub.unsubscribe_all(self)
