"""`FakeBroker`: an in-process stand-in for the shared `Broker`, for tests of payload logic.

As gpiozero ships `pins.mock` beside its real pins, this is the double of
broker.py: put it where a driver looks for the shared broker (`install(ctx)`)
and the driver routes, publishes and hears messages without a network. What
it delivers follows the broker's rules for users: a retained message never
reaches a command route. The tests of the connection itself (reconnects, QoS,
ACLs, sessions) run against a real Mosquitto, and so do the drivers' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho

from .broker import SHARED_KEY, BrokerUser, Handler, MqttError, Sharing


@dataclass
class Published:
    """One message a user published through the fake."""

    topic: str
    payload: str
    retain: bool


@dataclass
class FakeBroker:
    """The shared broker's surface for its users, in memory. `connected` and `reason` say
    what users are told on `attach`; `refuse` makes the next publishes fail."""

    connected: bool = True
    reason: str = ""
    status_topic: str = "fake-gateway/status"
    refused: dict[str, str] = field(default_factory=dict)
    published: list[Published] = field(default_factory=list)
    refuse: str = ""  # non-empty: publish raises MqttError with this reason
    users: list[BrokerUser] = field(default_factory=list)
    routes: list[tuple[object, str, Handler, bool]] = field(default_factory=list)

    def install(self, ctx: Sharing) -> FakeBroker:
        """Be the broker `Broker.shared(ctx)` hands out."""
        ctx.shared[SHARED_KEY] = self
        return self

    @property
    def failed(self) -> bool:
        """True while the fake is down."""
        return not self.connected

    def attach(self, user: BrokerUser) -> None:
        """Register a user and tell it at once whether the connection is up."""
        self.users.append(user)
        if self.connected:
            user.broker_up()
        else:
            user.broker_down(self.reason)

    def detach(self, user: BrokerUser) -> bool:
        """Forget a user and its routes; True when it was the last one."""
        if user in self.users:
            self.users.remove(user)
        self.routes = [r for r in self.routes if r[0] is not user]
        return not self.users

    async def leave(self, ctx: Sharing, user: BrokerUser) -> None:
        """`detach`; the last user frees `ctx`'s slot."""
        if self.detach(user) and ctx.shared.get(SHARED_KEY) is self:
            del ctx.shared[SHARED_KEY]

    def route(self, owner: object, sub: str, handler: Handler, command: bool = False) -> None:
        """Deliver messages matching `sub` to `handler(sub, topic, payload)`."""
        self.routes.append((owner, sub, handler, command))

    def unroute(self, owner: object, sub: str) -> None:
        """Stop delivering `sub` to `owner`."""
        self.routes = [r for r in self.routes if not (r[0] is owner and r[1] == sub)]

    async def publish(self, topic: str, payload: str, retain: bool, timeout: float | None = None) -> None:
        """Record the message, or raise MqttError while `refuse` says why not."""
        if not self.connected:
            raise MqttError(f"not connected to the MQTT broker ({self.reason or 'down'})")
        if self.refuse:
            raise MqttError(self.refuse)
        self.published.append(Published(topic, payload, retain))

    def deliver(self, topic: str, payload: bytes | str, retain: bool = False) -> int:
        """A message arrives on `topic`: hand it to every matching route, as the broker does.
        Returns how many handlers got it."""
        data = payload.encode() if isinstance(payload, str) else payload
        told = 0
        for _owner, sub, handler, command in list(self.routes):
            if command and retain:
                continue  # a command is run now or never: a retained one is dropped
            if paho.topic_matches_sub(sub, topic):
                handler(sub, topic, data)
                told += 1
        return told

    def down(self, reason: str) -> None:
        """The connection drops: every user is told why."""
        self.connected, self.reason = False, reason
        for user in list(self.users):
            user.broker_down(reason)

    def up(self) -> None:
        """The connection is back: every user is told."""
        self.connected, self.reason = True, ""
        for user in list(self.users):
            user.broker_up()


def published_to(fake: FakeBroker, topic: str) -> list[Any]:
    """The payloads published to `topic`, oldest first."""
    return [p.payload for p in fake.published if p.topic == topic]
