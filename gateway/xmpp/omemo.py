"""OMEMO (XEP-0384) for 1:1 chat with contacts, so the server's operator reads nothing.

Built on slixmpp-omemo and python-omemo (gateway/xmpp/omemo_plugin.py). Both
versions are read and answered: legacy OMEMO (`eu.siacs.conversations.axolotl`:
Conversations, Dino, Gajim, Monal, Profanity) and OMEMO 2 (`urn:xmpp:omemo:2`:
Converse.js 14, Kaidan). An answer goes in the version the contact wrote in
(per device: a device without it gets the other); an alert in the version the
contact last wrote in, else OMEMO 2 where a device has it. A gateway whose
identity key some OMEMO 2 clients cannot verify publishes only legacy
(gateway/xmpp/omemo_store.py) and refuses OMEMO 2 messages in one line.

The policy (`[xmpp] omemo`): `accept` answers encrypted when the contact wrote
encrypted, plain otherwise, and encrypts alerts to contacts whose devices it
knows; `require` refuses plain commands and never sends alerts in clear.
Strangers' messages are never decrypted (no session is built with them): they
get the session's fixed refusal. Trust: blind trust before verification (a new
device of a contact is trusted and announced to the admins), until an admin
verifies one of that contact's devices with `trust`; from then on new devices
are distrusted (and announced) until an admin trusts them. Announcements come
at most once per contact per hour (gateway/xmpp/omemo_notices.py).

The key store is one JSON file in `state_dir` (0600, written atomically). A lost
or unreadable one is moved aside and recreated with a warning: the gateway has
a new device, which its contacts' clients will show.

This module imports the crypto stack; the session imports it only when
`omemo` is not "off".
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omemo.session_manager import (
    MessageNotForUs,
    NoEligibleDevices,
    NoSession,
    SenderDistrusted,
    SenderNotFound,
    SessionManager,
)
from omemo.message import Message as OmemoMessage
from omemo.types import DeviceInformation
from slixmpp import JID
from slixmpp.plugins import register_plugin  # type: ignore[attr-defined]
from slixmpp.stanza import Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp_omemo import TrustLevel

from ..watches import Alert
from .frontend import Door, FrontEnd
from .omemo_notices import NewDevice, TrustNotices
from .omemo_plugin import LEGACY, OMEMO2, GatewayOMEMO, fingerprint
from .omemo_store import JsonStore
from .sce import SceError

__all__ = ["Omemo", "OmemoUnavailable", "TrustError", "Device", "fingerprint", "STORE", "LEGACY", "OMEMO2"]

log = logging.getLogger("iot_gateway.omemo")
STORE = "omemo.json"
INIT_TIMEOUT = 30.0  # seconds to wait for the OMEMO library to be ready before giving up on a message
SEND_TIMEOUT = 20.0  # seconds for fetching a contact's keys and encrypting one message
REPAIR_EVERY = 300.0  # at most one session repair per contact device in this many seconds
_VERSION = {OMEMO2: "OMEMO 2", LEGACY: "legacy"}

REQUIRED = (
    "Not run: this gateway takes only OMEMO-encrypted commands ([xmpp] omemo = \"require\"). "
    "Turn on OMEMO for this chat and send it again."
)
UNDECRYPTABLE = (
    "I could not decrypt your OMEMO message ({why}), so nothing was run. In your client, refresh or "
    "reset this contact's OMEMO keys (Conversations: contact details, then the key's menu; Gajim, Dino: "
    "the encryption settings of this chat), then send it again."
)
OMEMO2_ONLY = (
    "I could not decrypt your message: it uses OMEMO 2 (urn:xmpp:omemo:2), which this gateway does not "
    "publish (see docs/omemo.md); nothing was run. Use legacy OMEMO (eu.siacs.conversations.axolotl) or send it plain."
)
NOT_ENCRYPTED = (
    "I could not encrypt my answer for your devices ({why}); it was not sent in clear. "
    "Refresh this contact's OMEMO keys in your client and ask again."
)


class OmemoUnavailable(RuntimeError):
    """The OMEMO library could not start (a server without PEP, say); the message says why."""


class TrustError(ValueError):
    """A `trust`/`distrust` that names no known device; the message says what to do."""


@dataclass(frozen=True)
class Device:
    """One OMEMO device of an account, as the `devices` command shows it."""

    jid: str
    id: int
    fingerprint: str  # eight groups of eight hex digits, Curve25519 form, as clients show it
    trust: str  # TRUSTED, BLINDLY_TRUSTED, UNDECIDED, DISTRUSTED; "own" for the gateway's
    active: bool
    versions: frozenset[str]  # the OMEMO namespaces it is listed in

    @classmethod
    def of(cls, info: DeviceInformation) -> "Device":
        """From python-omemo's device information."""
        return cls(
            info.bare_jid,
            info.device_id,
            fingerprint(info.identity_key),
            info.trust_level_name,
            any(on for _ns, on in info.active),
            frozenset(info.namespaces),
        )


def _hex(text: str) -> str:
    return "".join(text.split()).lower()


# ---------------------------------------------------------------- the session's side


class Omemo(FrontEnd):
    """OMEMO for one XMPP session: decrypts contacts' messages, encrypts answers and alerts."""

    def __init__(self, session: Door, policy: str, store_path: Path) -> None:
        super().__init__(session)
        self.policy = policy
        self.store = JsonStore(store_path)
        self.failed: str | None = None  # why the library could not start, if it could not
        # Set once this device's lists and bundles are published (the server confirmed each publish).
        self.ready = asyncio.Event()
        self._alerts = asyncio.Lock()  # alerts in order of request, their device look-ups included
        self._repaired: dict[tuple[str, int], float] = {}
        self._withheld: set[tuple[str, str]] = set()  # (contact, why) already logged
        self._spoke: dict[str, str] = {}  # contact -> the OMEMO version of their last message decrypted
        self.notices = TrustNotices(self._tell)
        c = self.client
        for plugin in ("xep_0060", "xep_0163", "xep_0280", "xep_0334", "xep_0380"):
            c.register_plugin(plugin)
        # slixmpp keeps one class per plugin name for the whole process: make it ours right before use.
        register_plugin(GatewayOMEMO)
        c.register_plugin(
            "xep_0384",
            {"store": self.store, "notices": self.notices, "on_ready": self._ready, "on_failed": self._failed},
        )
        self.plugin: GatewayOMEMO = c.plugin["xep_0384"]
        # Encrypted sends in order of request, one decryption at a time; device-list pushes wait for them.
        self._lock = self.plugin.lock
        # slixmpp's `message` event skips messages without a body; OMEMO's key exchanges and
        # heartbeats have none, yet must be decrypted (they build and repair sessions).
        for ns in (LEGACY, OMEMO2):
            c.register_handler(Callback(
                f"OMEMO without body ({ns})", MatchXPath(f"{{{c.default_ns}}}message/{{{ns}}}encrypted"), self._bodiless
            ))

    def _bodiless(self, msg: Message) -> None:
        if not msg["body"]:
            asyncio.ensure_future(self.session.on_message(msg))

    # ------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Drop the held device notices (each device was logged when it came)."""
        self.notices.stop()
        super().stop()

    async def _ready(self) -> None:
        # The session manager exists once the server has confirmed this device's lists and bundles
        # (GatewayOMEMO._build): only then is OMEMO said to be ready, in the log and by `ready`.
        self.failed = None
        sm = await self.plugin.get_session_manager()
        own = (await sm.get_own_device_information())[0]
        log.info("OMEMO ready: device %d, fingerprint %s (published: %s)", own.device_id, fingerprint(own.identity_key),
                 ", ".join(self.plugin.versions))
        self.ready.set()
        if self.store.recreated is not None:
            await self._announce(
                f"{self.store.recreated} ({own.device_id}, fingerprint {fingerprint(own.identity_key)}): "
                "your clients will show it as a new device of this gateway."
            )
            self.store.recreated = None

    def _failed(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        log.warning("OMEMO could not start (%s): encrypted messages cannot be read; does the server offer PEP?",
                    self.failed)

    async def _announce(self, text: str) -> None:
        log.warning("%s", text.replace("\n", " "))
        await self._tell(text)

    async def _tell(self, text: str) -> None:
        to = tuple(c.jid for c in self.session.config.contacts if c.role == "admin")
        if to:
            self.session.deliver(Alert(text, time.time(), to))

    async def manager(self) -> SessionManager:
        """The library's session manager, once ready; OmemoUnavailable when it could not start."""
        if self.failed is not None:
            raise OmemoUnavailable(f"OMEMO could not start: {self.failed}")
        return await asyncio.wait_for(self.plugin.get_session_manager(), INIT_TIMEOUT)

    # ------------------------------------------------------------ incoming

    def encrypted(self, msg: Message) -> bool:
        """Whether a message carries an OMEMO payload (of any version), before anything is decrypted."""
        return bool(self.plugin.is_encrypted(msg))

    async def incoming(self, msg: Message) -> tuple[Message, bool] | None:
        """Decrypt a contact's OMEMO message: (message with the plaintext body, True); a plain one
        passes as (msg, False). None when it was answered here (refusal, cannot decrypt) or holds
        nothing to run. Strangers' messages pass untouched: the session refuses them, never decrypted."""
        namespaces = self.plugin.is_encrypted(msg)
        sender = msg["from"].bare.lower()
        contact = self.session.config.contact(sender)
        if contact is None:
            return msg, False
        if not namespaces:
            if self.policy == "require" and msg["body"]:
                msg.reply(REQUIRED).send()
                return None
            return msg, False
        if namespaces == {OMEMO2} and OMEMO2 not in self.plugin.versions:
            msg.reply(OMEMO2_ONLY).send()
            return None
        if len(namespaces) > 1:  # both: keep the one that holds a key for this gateway's device
            keep = await self._addressed(msg)
            msg = copy.copy(msg)
            for el in msg.xml.findall(f"{{{OMEMO2 if keep == LEGACY else LEGACY}}}encrypted"):
                msg.xml.remove(el)
        # One OMEMO operation at a time: two decryptions over one session would each load and store its ratchet.
        async with self._lock:
            answer = await self._open(msg, sender)
        if isinstance(answer, str):
            if msg["body"]:  # a key exchange or heartbeat (no body) carried no command: nothing to explain
                msg.reply(answer).send()
            return None
        return answer

    async def _addressed(self, msg: Message) -> str:
        """Of a message carrying both versions, the one with a key for this gateway's device (a client
        writes to each device in one version); OMEMO 2 when both have one and it is published."""
        try:
            own = str((await (await self.manager()).get_own_device_information())[0].device_id)
        except Exception:
            own = ""
        paths = {
            OMEMO2: f"{{{OMEMO2}}}encrypted/{{{OMEMO2}}}header/{{{OMEMO2}}}keys/{{{OMEMO2}}}key",
            LEGACY: f"{{{LEGACY}}}encrypted/{{{LEGACY}}}header/{{{LEGACY}}}key",
        }
        for ns in self.plugin.versions:
            if any(key.get("rid") == own for key in msg.xml.findall(paths[ns])):
                return ns
        return self.plugin.versions[0]

    async def _open(self, msg: Message, sender: str) -> tuple[Message, bool] | str | None:
        """The decrypted message, or the line to answer instead, or None (nothing to run)."""
        try:
            sm = await self.manager()
            opened, device = await self.plugin.decrypt_message(msg)
        except SenderDistrusted:
            return "Not run: your OMEMO device is distrusted here. An admin can trust it with `trust JID FINGERPRINT` (see `devices`)."
        except Exception as e:
            return await self._undecryptable(msg, sender, e)
        self._spoke[sender] = OMEMO2 if msg.xml.find(f"{{{OMEMO2}}}encrypted") is not None else LEGACY
        if not opened["body"]:
            return None  # an empty OMEMO message: key exchange or heartbeat, already handled
        if device.trust_level_name == TrustLevel.UNDECIDED.value and not await self._settle(sm, device):
            return (
                f"Not run: your OMEMO device {device.device_id} is new and not trusted yet; "
                "the admins were told how to trust it."
            )
        return opened, True

    async def _settle(self, sm: SessionManager, device: DeviceInformation) -> bool:
        """A device met by decrypting, not yet decided: blind trust unless another device of the
        contact is verified (then distrusted, for an admin to decide). Announced either way."""
        others = await sm.get_device_information(device.bare_jid)
        if any(d.trust_level_name == TrustLevel.TRUSTED.value for d in others):
            await sm.set_trust(device.bare_jid, device.identity_key, TrustLevel.DISTRUSTED.value)
            self.notices.add(device.bare_jid, NewDevice(device.device_id, fingerprint(device.identity_key), False))
            return False
        await sm.set_trust(device.bare_jid, device.identity_key, TrustLevel.BLINDLY_TRUSTED.value)
        await self.plugin._devices_blindly_trusted(frozenset({device}), None)
        return True

    async def _undecryptable(self, msg: Message, sender: str, e: Exception) -> str:
        why = {
            MessageNotForUs: "it was not encrypted for this gateway's current device",
            SenderNotFound: "your device is not in your published device list",
            NoSession: "there is no session with your device",
            OmemoUnavailable: "OMEMO is not working on this gateway",
            asyncio.TimeoutError: "OMEMO is not ready on this gateway",
            SceError: f"its content is not a valid OMEMO 2 envelope from you: {e}",
        }.get(type(e), "the session with your device is broken")
        if type(e).__name__.startswith("XMLSchema"):  # xmlschema's, raised by the OMEMO parsers
            why = "it is not a well-formed OMEMO message"
        log.warning("cannot decrypt an OMEMO message from %s: %s: %s", sender, type(e).__name__, str(e).split("\n")[0])
        if isinstance(e, (NoSession, MessageNotForUs)) or type(e).__name__ in ("DecryptionFailed", "KeyExchangeFailed"):
            await self._repair(sender, msg)  # first: the new session reaches the client before "send it again"
        return UNDECRYPTABLE.format(why=why)

    async def _repair(self, sender: str, msg: Message) -> None:
        """XEP-0384: a session that fails is replaced by a new one, announced to the other side by an
        empty key-exchange message, at most once per device every REPAIR_EVERY seconds."""
        ns = OMEMO2 if msg.xml.find(f"{{{OMEMO2}}}encrypted") is not None else LEGACY
        el = msg.xml.find(f"{{{ns}}}encrypted/{{{ns}}}header")
        try:
            device_id = int(el.get("sid")) if el is not None else None
        except (TypeError, ValueError):
            device_id = None
        if device_id is None:
            return
        now = time.monotonic()
        if now - self._repaired.get((sender, device_id), -REPAIR_EVERY) < REPAIR_EVERY:
            return
        self._repaired[(sender, device_id)] = now
        try:
            sm = await self.manager()
            devices = await sm.get_device_information(sender)
            device = next((d for d in devices if d.device_id == device_id), None)
            if device is None:
                return
            if await _has_session(sm, device, ns):
                failures = await sm.replace_sessions(device)
            else:
                failures = await _new_session(sm, device, ns)
            if failures:
                log.warning("OMEMO session repair with %s/%d failed: %s", sender, device_id, failures)
            else:
                log.info("OMEMO session with %s/%d replaced", sender, device_id)
        except Exception as e:
            log.warning("OMEMO session repair with %s/%d failed: %s", sender, device_id, e)

    # ------------------------------------------------------------ outgoing

    async def reply(self, msg: Message, text: str) -> None:
        """Answer an encrypted message encrypted; if that is impossible, a plain line says so (never the answer)."""
        out = self.client.make_message(mto=msg["from"], mtype=msg["type"] if msg["type"] == "chat" else "chat", mbody=text)
        why = await self._send(out, msg["from"].bare)
        if why is not None:
            log.warning("could not encrypt an answer for %s: %s", msg["from"].bare, why)
            msg.reply(NOT_ENCRYPTED.format(why=why)).send()

    def send_alert(self, out: Message) -> None:
        """Send an alert message encrypted to its contact's devices. A contact without any OMEMO
        device gets it plain with `accept`, not at all with `require`; one whose devices cannot be
        encrypted for (all distrusted, say) does not get it in clear either. Runs in a task; alerts
        leave in the order given."""
        asyncio.ensure_future(self._alert(out))

    async def _alert(self, out: Message) -> None:
        async with self._alerts:  # FIFO: a "N alerts delayed" note stays ahead of the alerts
            await self._alert_now(out)

    async def _alert_now(self, out: Message) -> None:
        bare = out["to"].bare
        try:
            known = bool(await (await self.manager()).get_device_information(bare))
        except Exception as e:
            known, why = False, str(e)
        else:
            why = "no OMEMO device of theirs known"
        if known:
            why = await self._send(out, bare) or ""
            if not why:
                return
        if known or self.policy == "require":
            if (bare, why) not in self._withheld:
                log.warning("alert NOT sent to %s: cannot encrypt it (%s), and it is not sent in clear", bare, why)
                self._withheld.add((bare, why))
            return
        out.send()

    async def to_room(self, room: str, text: str, occupants: set[str], out: Message | None = None) -> str | None:
        """Send `text` to `room` as a groupchat message encrypted for the devices of those `occupants`
        (bare JIDs) who have any; None when sent, else why not (then nothing was sent). `out`: the
        message to send (with its XEP-0203 delay), made here when None."""
        if out is None:
            out = self.client.make_message(mto=room, mtype="groupchat", mbody=text)
        try:
            sm = await self.manager()
            reachable: list[str] = []
            for force in (False, True):  # the cached lists may be behind (a PEP update on its way): fetch once
                await asyncio.wait_for(self.plugin.refresh_device_lists({JID(j) for j in occupants}, force), SEND_TIMEOUT)
                reachable = [j for j in sorted(occupants) if await sm.get_device_information(j)]
                if reachable:
                    break
        except asyncio.TimeoutError:
            return "timed out fetching the occupants' keys"
        except Exception as e:
            return _reason(e)
        if not reachable:
            return "no occupant of the room has an OMEMO device the gateway knows"
        return await self._send(out, *reachable)

    async def _send(self, out: Message, *bares: str) -> str | None:
        """Encrypt `out` (its body) for the trusted devices of `bares` and send it; None when sent,
        else why not. Elements besides the body (the XEP-0203 delay) are kept, in clear."""
        jids = {JID(b) for b in bares}
        first = self._spoke.get(bares[0]) if len(bares) == 1 else None  # answer in the version they wrote in
        async with self._lock:
            try:
                await self.manager()
                try:
                    enc, errors = await asyncio.wait_for(self.plugin.seal(out, set(bares), first), SEND_TIMEOUT)
                except NoEligibleDevices:
                    # The cached device list may be behind (a PEP update still on its way): fetch it once.
                    await asyncio.wait_for(self.plugin.refresh_device_lists(jids, force_download=True), SEND_TIMEOUT)
                    enc, errors = await asyncio.wait_for(self.plugin.seal(out, set(bares), first), SEND_TIMEOUT)
            except asyncio.TimeoutError:
                return "timed out fetching their keys"
            except Exception as e:
                return _reason(e)
            if enc is None:
                return "nothing to encrypt"
            for err in errors:
                log.info("OMEMO: not encrypted for %s/%d: %s", err.bare_jid, err.device_id, err.exception)
            delay = out.xml.find("{urn:xmpp:delay}delay")
            if delay is not None:
                enc.xml.append(copy.deepcopy(delay))
            enc.send()
            return None

    # ------------------------------------------------------------ admin commands

    async def devices(self, args: list[str]) -> str:
        """`devices [JID]`: the gateway's own device and the contacts' (or one contact's), with trust."""
        sm = await self.manager()
        own = (await sm.get_own_device_information())[0]
        published = " and ".join(_VERSION[ns] for ns in self.plugin.versions)
        lines = [f"OMEMO ({self.policy}, {published}), this gateway: device {own.device_id}",
                 f"  {fingerprint(own.identity_key)}"]
        if OMEMO2 in self.plugin.versions:  # Converse.js shows an OMEMO 2 device's key in its Ed25519 form
            ed = own.identity_key.hex()
            lines.append(f"  (OMEMO 2 clients may show it as {' '.join(ed[i:i + 8] for i in range(0, 64, 8))})")
        jids = [args[0].lower()] if args else [c.jid for c in self.session.config.contacts]
        for jid in jids:
            if self.session.config.contact(jid) is None:
                raise TrustError(f"{jid} is not a contact of this gateway")
            devices = sorted(await sm.get_device_information(jid), key=lambda d: d.device_id)
            if not devices:
                lines.append(f"{jid}: no OMEMO device known")
                continue
            lines.append(f"{jid}:")
            for d in map(Device.of, devices):
                versions = ", ".join(_VERSION[ns] for ns in (OMEMO2, LEGACY) if ns in d.versions)
                lines.append(f"  {d.id} {d.trust.lower().replace('_', ' ')}{'' if d.active else ', inactive'} ({versions})")
                lines.append(f"  {d.fingerprint}")
        return "\n".join(lines)

    async def trust(self, args: list[str], trusted: bool) -> str:
        """`trust JID FINGERPRINT` / `distrust JID FINGERPRINT` (spaces in the fingerprint allowed)."""
        if len(args) < 2:
            raise TrustError("give the contact's JID and the device's fingerprint (see `devices`)")
        jid, fp = args[0].lower(), _hex("".join(args[1:]))
        if self.session.config.contact(jid) is None:
            raise TrustError(f"{jid} is not a contact of this gateway")
        if len(fp) != 64 or any(ch not in "0123456789abcdef" for ch in fp):
            raise TrustError("a fingerprint is 64 hex digits (spaces allowed), as `devices` shows it")
        sm = await self.manager()
        match = [d for d in await sm.get_device_information(jid) if _hex(fingerprint(d.identity_key)) == fp]
        if not match:
            raise TrustError(f"no OMEMO device of {jid} has that fingerprint (see `devices {jid}`)")
        level = TrustLevel.TRUSTED if trusted else TrustLevel.DISTRUSTED
        await sm.set_trust(jid, match[0].identity_key, level.value)
        ids = ", ".join(str(d.device_id) for d in match)
        log.warning("OMEMO: device %s of %s set to %s", ids, jid, level.value)
        if trusted:
            return f"Trusted device {ids} of {jid}: from now on, new devices of {jid} wait for an admin's trust."
        return f"Distrusted device {ids} of {jid}: nothing is encrypted for it, and its messages are refused."


def _backend(sm: SessionManager, namespace: str) -> Any:
    # python-omemo 2.1 (pinned) exposes no way to start a session with a device without a message to
    # send; replace_sessions below does it only over an existing session. Same steps, on its backend.
    return next(b for b in sm._SessionManager__backends if b.namespace == namespace)  # type: ignore[attr-defined]


async def _has_session(sm: SessionManager, device: DeviceInformation, namespace: str) -> bool:
    return await _backend(sm, namespace).load_session(device.bare_jid, device.device_id) is not None


async def _new_session(sm: SessionManager, device: DeviceInformation, namespace: str) -> dict[str, Exception]:
    """Build a session with `device` and send it an empty key-exchange message (XEP-0384's repair
    when the gateway has no session the contact's client still uses)."""
    backend = _backend(sm, namespace)
    try:
        content, key = await backend.encrypt_empty()
        bundle = await sm._download_bundle(namespace, device.bare_jid, device.device_id)
        session, encrypted_key = await backend.build_session_active(device.bare_jid, device.device_id, bundle, key)
        own = (await sm.get_own_device_information())[0]
        # Stored before it is sent (replace_sessions does the reverse): the client's answer to it can come
        # back before a slow disk has written the store.
        await backend.store_session(session)
        await sm._send_message(
            OmemoMessage(namespace, own.bare_jid, own.device_id, content, frozenset({(encrypted_key, session.key_exchange)})),
            device.bare_jid,
        )
    except Exception as e:
        return {namespace: e}
    return {}


def _reason(e: Exception) -> str:
    name = type(e).__name__
    return {
        "NoEligibleDevices": "none of your devices is trusted or reachable",
        "StillUndecided": "your devices are not trusted yet",
        "OmemoUnavailable": "OMEMO is not working on this gateway",
    }.get(name, f"{name}: {e}" if str(e) else name)

