"""OMEMO (XEP-0384) for 1:1 chat with contacts, so the server's operator reads nothing.

Built on slixmpp-omemo and python-omemo. Of their two namespaces, messages are
exchanged in the legacy one, `eu.siacs.conversations.axolotl`, which
Conversations, Dino, Gajim and Monal speak (slixmpp-omemo 2.2 cannot decrypt
or produce `urn:xmpp:omemo:2` messages yet; device lists and bundles are
published for both).

The policy (`[xmpp] omemo`): `accept` answers encrypted when the contact wrote
encrypted, plain otherwise, and encrypts alerts to contacts whose devices it
knows; `require` refuses plain commands and never sends alerts in clear.
Strangers' messages are never decrypted (no session is built with them): they
get the session's fixed refusal. Trust: blind trust before verification (a new
device of a contact is trusted and announced to the admins), until an admin
verifies one of that contact's devices with `trust`; from then on new devices
are distrusted (and announced) until an admin trusts them.

The key store is one JSON file in `state_dir` (0600, written atomically). A lost
or unreadable one is moved aside and recreated with a warning: the gateway has
a new device, which its contacts' clients will show.

This module imports the crypto stack; the session imports it only when
`omemo` is not "off".
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import tempfile
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
from omemo.storage import Just, Maybe, Nothing, Storage
from omemo.types import DeviceInformation, JSONType
from slixmpp import JID
from slixmpp.plugins import register_plugin  # type: ignore[attr-defined]
from slixmpp.stanza import Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from slixmpp_omemo import TrustLevel, XEP_0384

from ..watches import Alert
from .frontend import Door, FrontEnd


log = logging.getLogger("iot_gateway.omemo")
# At DEBUG these libraries log plaintexts, keys and whole ratchet states: never into the gateway's
# log, even with --debug (the same reason slixmpp's stream log has its SASL payloads redacted).
for _name in ("omemo", "oldmemo", "twomemo", "doubleratchet", "x3dh", "xeddsa", "slixmpp_omemo"):
    logging.getLogger(_name).setLevel(logging.INFO)


class LibraryNotices(logging.Filter):
    """The OMEMO libraries' warnings, read by a user in `journalctl -p warning`: the routine ones
    of every start (own device list or bundle published again) become debug; the others get a
    note saying what they mean for the gateway."""

    ROUTINE = (
        "Own device id was not included in the online device list",  # added back and published again
        "Online bundle data differs from offline bundle data",  # published again
        "Couldn't download own bundle",  # none published yet: first start, or a server that lost it
        "Device list download failed",  # retried at once without max_items
        "Sender device is not known",  # the device list is fetched again
        "Replacing sessions with device",  # the gateway's own repair, which logs its outcome
    )
    MEANING = (
        ("Bundle not available for device", "that device published no keys: messages are not encrypted for it"),
        ("Bundle download failed for device", "messages are not encrypted for that device until its keys can be fetched"),
        ("Not including device", "messages are not encrypted for that device until its keys can be fetched"),
        ("Key exchange replaces existing session", "the contact's app started over (reinstalled or restored)"),
        ("Malformed device list", "nothing is encrypted for that contact's devices until the list is fixed"),
        ("Sender device found by the manual device list update",
         "the server does not push that contact's device list: check that it offers PEP"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        """Lower a routine warning to debug (dropped unless debug logging is on); annotate the others."""
        if record.levelno != logging.WARNING:
            return True
        text = record.getMessage()
        if text.startswith(self.ROUTINE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        for prefix, meaning in self.MEANING:
            if text.startswith(prefix):
                record.msg, record.args = f"{text.rstrip('.')}: {meaning}", ()
        return True


# The two loggers the libraries warn on (a filter on a logger does not see its children's records).
for _name in ("omemo.core", "slixmpp_omemo.xep_0384"):
    logging.getLogger(_name).addFilter(LibraryNotices())

LEGACY = "eu.siacs.conversations.axolotl"
OMEMO2 = "urn:xmpp:omemo:2"
STORE = "omemo.json"
FALLBACK = "This message is OMEMO encrypted: your client cannot read it. Use one with OMEMO (Conversations, Dino, Gajim, Monal)."
INIT_TIMEOUT = 30.0  # seconds to wait for the OMEMO library to be ready before giving up on a message
SEND_TIMEOUT = 20.0  # seconds for fetching a contact's keys and encrypting one message
REPAIR_EVERY = 300.0  # at most one session repair per contact device in this many seconds

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
    "read yet; nothing was run. Use legacy OMEMO (eu.siacs.conversations.axolotl) or send it plain."
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

    @classmethod
    def of(cls, info: DeviceInformation) -> "Device":
        """From python-omemo's device information."""
        return cls(
            info.bare_jid,
            info.device_id,
            fingerprint(info.identity_key),
            info.trust_level_name,
            any(on for _ns, on in info.active),
        )


def fingerprint(identity_key: bytes) -> str:
    """The fingerprint clients show for an identity key: eight groups of eight hex digits."""
    return " ".join(SessionManager.format_identity_key(identity_key))


def _hex(text: str) -> str:
    return "".join(text.split()).lower()


# ---------------------------------------------------------------- key store


class JsonStore(Storage):
    """All OMEMO state in one JSON file, 0600, written atomically (temporary file, fsync, rename).

    Writes that arrive while one is under way are folded into the next, so a
    message costs one or two writes, not one per key. A missing file starts a
    new device; an unreadable one is moved aside (`omemo.json.corrupt-N`) with
    a warning and starts a new device too (`recreated` says why). A write that
    fails (a full disk) is logged once; the keys stay in memory and the next
    write tries again.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()  # python-omemo caches what it loaded
        self.path = Path(path)
        self.data: dict[str, JSONType] = {}
        self.recreated: str | None = None  # why the store started afresh over an existing one
        self.first = False  # no store yet: a new device
        self._lock = asyncio.Lock()
        self._dirty = False
        self._failing: str | None = None
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.first = True
            return
        except OSError as e:
            self.recreated = f"OMEMO key store {self.path} unreadable ({e.strerror or e}); new OMEMO device"
            log.warning("%s", self.recreated)
            return
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self.data = data
        except ValueError as e:
            aside = self._aside()
            why = str(e).split(":")[0]
            try:
                self.path.rename(aside)
                moved = f"moved to {aside.name}"
            except OSError as err:
                moved = f"could not move it aside: {err.strerror or err}"
            self.recreated = f"OMEMO key store {self.path} corrupt ({why}); {moved}; new OMEMO device"
            log.warning("%s", self.recreated)

    def _aside(self) -> Path:
        n = 1
        while self.path.with_name(f"{self.path.name}.corrupt-{n}").exists():
            n += 1
        return self.path.with_name(f"{self.path.name}.corrupt-{n}")

    async def _save(self) -> None:
        self._dirty = True
        async with self._lock:
            if not self._dirty:
                return  # written by the write we waited for
            self._dirty = False
            text = json.dumps(self.data, separators=(",", ":"))
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._write, text)
            except OSError as e:
                why = e.strerror or str(e)
                if self._failing != why:
                    log.error("cannot save the OMEMO key store %s (%s): keys kept in memory, retried on the next change",
                              self.path, why)
                self._failing = why
                return
            if self._failing is not None:
                log.warning("OMEMO key store %s saved again", self.path)
                self._failing = None

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")  # 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    async def _load(self, key: str) -> Maybe[JSONType]:
        return Just(self.data[key]) if key in self.data else Nothing()

    async def _store(self, key: str, value: JSONType) -> None:
        self.data[key] = value
        await self._save()

    async def _delete(self, key: str) -> None:
        self.data.pop(key, None)
        await self._save()


# ---------------------------------------------------------------- slixmpp plugin


class GatewayOMEMO(XEP_0384):
    """slixmpp-omemo with the gateway's key store and trust policy.

    pconfig: `store` (a JsonStore), `announce` (async callable taking a line for
    the admins), `on_ready` (async callable, once the library is ready), `on_failed`
    (callable taking the exception when it cannot start).
    """

    name = "xep_0384"
    default_config = {"fallback_message": FALLBACK, "store": None, "announce": None, "on_ready": None, "on_failed": None}

    @property
    def storage(self) -> Storage:
        return self.store

    @property
    def _btbv_enabled(self) -> bool:
        return True

    def session_bind(self, jid: JID) -> None:
        # The base class starts the library in a task whose failure nobody would see.
        asyncio.ensure_future(self._start())

    async def _start(self) -> None:
        try:
            await self.get_session_manager()
        except Exception as e:
            if self.on_failed is not None:
                self.on_failed(e)
            return
        if self.on_ready is not None:
            await self.on_ready()

    async def _devices_blindly_trusted(self, blindly_trusted: frozenset[DeviceInformation], identifier: str | None) -> None:
        for d in sorted(blindly_trusted, key=lambda d: (d.bare_jid, d.device_id)):
            if d.bare_jid == self.xmpp.boundjid.bare:
                continue  # the gateway's own account: not a contact's device
            await self.announce(
                f"OMEMO: new device {d.device_id} of {d.bare_jid}, trusted on first use. Fingerprint:\n"
                f"{fingerprint(d.identity_key)}\nIf it is not theirs: distrust {d.bare_jid} {_hex(fingerprint(d.identity_key))}"
            )

    async def _prompt_manual_trust(self, manually_trusted: frozenset[DeviceInformation], identifier: str | None) -> None:
        # Nobody to ask on a headless gateway: a new device of a contact with a verified one waits for an admin.
        sm = await self.get_session_manager()
        for d in sorted(manually_trusted, key=lambda d: (d.bare_jid, d.device_id)):
            await sm.set_trust(d.bare_jid, d.identity_key, TrustLevel.DISTRUSTED.value)
            await self.announce(_untrusted_line(d))


def _untrusted_line(d: DeviceInformation) -> str:
    fp = fingerprint(d.identity_key)
    return (
        f"OMEMO: new device {d.device_id} of {d.bare_jid} NOT trusted (another device of theirs is verified). "
        f"Fingerprint:\n{fp}\nIf it is theirs: trust {d.bare_jid} {_hex(fp)}"
    )


# ---------------------------------------------------------------- the session's side


class Omemo(FrontEnd):
    """OMEMO for one XMPP session: decrypts contacts' messages, encrypts answers and alerts."""

    def __init__(self, session: Door, policy: str, store_path: Path) -> None:
        super().__init__(session)
        self.policy = policy
        self.store = JsonStore(store_path)
        self.failed: str | None = None  # why the library could not start, if it could not
        self._lock = asyncio.Lock()  # encrypted sends in order of request
        self._alerts = asyncio.Lock()  # alerts in order of request, their device look-ups included
        self._repaired: dict[tuple[str, int], float] = {}
        self._withheld: set[tuple[str, str]] = set()  # (contact, why) already logged
        c = self.client
        for plugin in ("xep_0060", "xep_0163", "xep_0280", "xep_0334", "xep_0380"):
            c.register_plugin(plugin)
        # slixmpp keeps one class per plugin name for the whole process: make it ours right before use.
        register_plugin(GatewayOMEMO)
        c.register_plugin(
            "xep_0384",
            {"store": self.store, "announce": self._announce, "on_ready": self._ready, "on_failed": self._failed},
        )
        self.plugin: GatewayOMEMO = c.plugin["xep_0384"]
        # slixmpp's `message` event skips messages without a body; OMEMO's key exchanges and
        # heartbeats have none, yet must be decrypted (they build and repair sessions).
        c.register_handler(Callback(
            "OMEMO without body", MatchXPath(f"{{{c.default_ns}}}message/{{{LEGACY}}}encrypted"), self._bodiless
        ))

    def _bodiless(self, msg: Message) -> None:
        if not msg["body"]:
            asyncio.ensure_future(self.session.on_message(msg))

    # ------------------------------------------------------------ lifecycle

    async def _ready(self) -> None:
        self.failed = None
        sm = await self.plugin.get_session_manager()
        own = (await sm.get_own_device_information())[0]
        log.info("OMEMO ready: device %d, fingerprint %s (%s)", own.device_id, fingerprint(own.identity_key),
                 ", ".join(sorted(own.namespaces)))
        if self.store.recreated is not None or self.store.first:
            # The account is the gateway's alone: any other device in its published lists is one whose keys
            # are lost, and contacts would keep encrypting for it.
            try:
                await sm.clear_device_lists()
            except Exception as e:
                log.warning("could not drop lost OMEMO devices from the published lists: %s", e)
            self.store.first = False
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
        if LEGACY not in namespaces:
            msg.reply(OMEMO2_ONLY).send()
            return None
        if OMEMO2 in namespaces:  # both: ours is the legacy one
            msg = copy.copy(msg)
            for el in msg.xml.findall(f"{{{OMEMO2}}}encrypted"):
                msg.xml.remove(el)
        # One OMEMO operation at a time: two decryptions over one session would each load and store its ratchet.
        async with self._lock:
            answer = await self._open(msg, sender)
        if isinstance(answer, str):
            if msg["body"]:  # a key exchange or heartbeat (no body) carried no command: nothing to explain
                msg.reply(answer).send()
            return None
        return answer

    async def _open(self, msg: Message, sender: str) -> tuple[Message, bool] | str | None:
        """The decrypted message, or the line to answer instead, or None (nothing to run)."""
        try:
            sm = await self.manager()
            opened, device = await self.plugin.decrypt_message(msg)
        except SenderDistrusted:
            return "Not run: your OMEMO device is distrusted here. An admin can trust it with `trust JID FINGERPRINT` (see `devices`)."
        except Exception as e:
            return await self._undecryptable(msg, sender, e)
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
            await self._announce(_untrusted_line(device))
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
        }.get(type(e), "the session with your device is broken")
        log.warning("cannot decrypt an OMEMO message from %s: %s: %s", sender, type(e).__name__, e)
        if isinstance(e, (NoSession, MessageNotForUs)) or type(e).__name__ in ("DecryptionFailed", "KeyExchangeFailed"):
            await self._repair(sender, msg)  # first: the new session reaches the client before "send it again"
        return UNDECRYPTABLE.format(why=why)

    async def _repair(self, sender: str, msg: Message) -> None:
        """XEP-0384: a session that fails is replaced by a new one, announced to the other side by an
        empty key-exchange message, at most once per device every REPAIR_EVERY seconds."""
        el = msg.xml.find(f"{{{LEGACY}}}encrypted/{{{LEGACY}}}header")
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
            failures = await sm.replace_sessions(device) if await _has_session(sm, device) else await _new_session(sm, device)
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
        async with self._lock:
            try:
                await self.manager()
                try:
                    enc, errors = await asyncio.wait_for(self.plugin.encrypt_message(out, jids), SEND_TIMEOUT)
                except NoEligibleDevices:
                    # The cached device list may be behind (a PEP update still on its way): fetch it once.
                    await asyncio.wait_for(self.plugin.refresh_device_lists(jids, force_download=True), SEND_TIMEOUT)
                    enc, errors = await asyncio.wait_for(self.plugin.encrypt_message(out, jids), SEND_TIMEOUT)
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
            enc["eme"]["namespace"] = LEGACY
            enc["eme"]["name"] = "OMEMO"
            enc.send()
            return None

    # ------------------------------------------------------------ admin commands

    async def devices(self, args: list[str]) -> str:
        """`devices [JID]`: the gateway's own device and the contacts' (or one contact's), with trust."""
        sm = await self.manager()
        own = (await sm.get_own_device_information())[0]
        lines = [f"OMEMO ({self.policy}), this gateway: device {own.device_id}", f"  {fingerprint(own.identity_key)}"]
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
                lines.append(f"  {d.id} {d.trust.lower().replace('_', ' ')}{'' if d.active else ', inactive'}")
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


def _backend(sm: SessionManager) -> Any:
    # python-omemo 2.1 (pinned) exposes no way to start a session with a device without a message to
    # send; replace_sessions below does it only over an existing session. Same steps, on its backend.
    return next(b for b in sm._SessionManager__backends if b.namespace == LEGACY)  # type: ignore[attr-defined]


async def _has_session(sm: SessionManager, device: DeviceInformation) -> bool:
    return await _backend(sm).load_session(device.bare_jid, device.device_id) is not None


async def _new_session(sm: SessionManager, device: DeviceInformation) -> dict[str, Exception]:
    """Build a session with `device` and send it an empty key-exchange message (XEP-0384's repair
    when the gateway has no session the contact's client still uses)."""
    backend = _backend(sm)
    try:
        content, key = await backend.encrypt_empty()
        bundle = await sm._download_bundle(LEGACY, device.bare_jid, device.device_id)
        session, encrypted_key = await backend.build_session_active(device.bare_jid, device.device_id, bundle, key)
        own = (await sm.get_own_device_information())[0]
        # Stored before it is sent (replace_sessions does the reverse): the client's answer to it can come
        # back before a slow disk has written the store.
        await backend.store_session(session)
        await sm._send_message(
            OmemoMessage(LEGACY, own.bare_jid, own.device_id, content, frozenset({(encrypted_key, session.key_exchange)})),
            device.bare_jid,
        )
    except Exception as e:
        return {LEGACY: e}
    return {}


def _reason(e: Exception) -> str:
    name = type(e).__name__
    return {
        "NoEligibleDevices": "none of your devices is trusted or reachable",
        "StillUndecided": "your devices are not trusted yet",
        "OmemoUnavailable": "OMEMO is not working on this gateway",
    }.get(name, f"{name}: {e}" if str(e) else name)

