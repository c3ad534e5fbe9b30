"""Who may do what: the one place every entry point asks before reading or setting."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Permission(StrEnum):
    """What an entry point is about to do on a contact's behalf."""

    READ = "read"
    SET = "set"
    ADMIN = "admin"


ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "viewer": frozenset({Permission.READ}),
    "operator": frozenset({Permission.READ, Permission.SET}),
    "admin": frozenset({Permission.READ, Permission.SET, Permission.ADMIN}),
}
ROLE_NEEDED = {Permission.READ: "viewer", Permission.SET: "operator", Permission.ADMIN: "admin"}


class Forbidden(Exception):
    """The actor's role does not allow the action; the message says which role would."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Someone acting on the gateway: a contact's bare JID, their role, and the entry point."""

    jid: str
    role: str
    via: str

    def __str__(self) -> str:
        return f"{self.jid} ({self.role}, {self.via})"


def allowed(role: str | None, perm: Permission) -> bool:
    """True when `role` grants `perm`; strangers (None) are granted nothing."""
    return role is not None and perm in ROLE_PERMISSIONS.get(role, frozenset())


def require(actor: Actor, perm: Permission) -> None:
    """Raise Forbidden unless the actor's role grants `perm`."""
    if not allowed(actor.role, perm):
        raise Forbidden(
            f"{perm.value} needs the {ROLE_NEEDED[perm]} role, you are {actor.role}"
        )
