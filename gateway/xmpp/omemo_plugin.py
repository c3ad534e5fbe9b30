"""slixmpp-omemo made into the gateway's OMEMO: its key store, its trust policy, and OMEMO 2.

Both OMEMO versions are read and written: the legacy one
(`eu.siacs.conversations.axolotl`: Conversations, Dino, Gajim, Monal, Profanity)
and OMEMO 2 (`urn:xmpp:omemo:2`: Converse.js 14, Kaidan). slixmpp-omemo 2.2
has the OMEMO 2 cryptography (twomemo) but not its Stanza Content Encryption
envelope; `decrypt_message` and `seal` add it (gateway/xmpp/sce.py).

OMEMO 2 is published only when the identity key is one every OMEMO 2 client can
verify (gateway/xmpp/omemo_store.py); otherwise only the legacy device list and
bundle are, and an OMEMO 2 list and bundle an earlier version published are
withdrawn: a client must not pick a version the gateway would not answer in.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Awaitable
from typing import Any

import oldmemo
import oldmemo.etree
import twomemo
import twomemo.etree
from omemo.session_manager import EncryptionError, SessionManager
from omemo.storage import Storage
from omemo.types import DeviceInformation
from slixmpp import JID
from slixmpp.exceptions import IqError
from slixmpp.stanza import Message
from slixmpp_omemo import TrustLevel, XEP_0384
from slixmpp_omemo import xep_0384 as library

from .omemo_notices import NewDevice, TrustNotices
from .omemo_store import JsonStore
from .sce import envelope, open_envelope

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
DEVICES2, BUNDLES2 = "urn:xmpp:omemo:2:devices", "urn:xmpp:omemo:2:bundles"
FALLBACK = "This message is OMEMO encrypted: your client cannot read it. Use one with OMEMO (Conversations, Dino, Gajim, Monal)."


def fingerprint(identity_key: bytes) -> str:
    """The fingerprint clients show for an identity key: eight groups of eight hex digits."""
    return " ".join(SessionManager.format_identity_key(identity_key))


class GatewayOMEMO(XEP_0384):
    """slixmpp-omemo with the gateway's key store, trust policy and OMEMO 2 envelopes.

    pconfig: `store` (a JsonStore), `notices` (TrustNotices: the admins hear of
    contacts' new devices), `on_ready` (async callable, once the library is ready: its device
    lists and bundles published, confirmed by the server),
    `on_failed` (callable taking the exception when it cannot start).
    """

    name = "xep_0384"
    default_config = {"fallback_message": FALLBACK, "store": None, "notices": None, "on_ready": None, "on_failed": None}
    store: JsonStore
    notices: TrustNotices
    on_ready: Callable[[], Awaitable[None]] | None
    on_failed: Callable[[Exception], None] | None

    def plugin_init(self) -> None:
        """Also: the versions published, known once the key store is read."""
        super().plugin_init()
        self.versions: tuple[str, ...] = (OMEMO2, LEGACY)
        self._manager: asyncio.Future[SessionManager] | None = None
        # One OMEMO operation on the store at a time. python-omemo reads and writes a device's record
        # (its versions) in steps: two device-list pushes handled at once (a contact's client publishes
        # both lists together) could each write back what the other had not yet added.
        self.lock = asyncio.Lock()

    async def _on_device_list_update(self, msg: Message) -> None:
        async with self.lock:
            try:
                await self.get_session_manager()
            except Exception:
                return  # OMEMO could not start: logged once (on_failed), not again for each device list pushed
            await super()._on_device_list_update(msg)

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

    async def get_session_manager(self) -> SessionManager:
        """python-omemo's session manager, built once (slixmpp-omemo's, with publishing limited to `versions`)."""
        if self._manager is None:
            self._manager = asyncio.ensure_future(self._build())
        return await asyncio.shield(self._manager)

    async def _build(self) -> SessionManager:
        """The session manager, returned (and so "ready") only once the server has confirmed, by the
        results of the PEP publishes, this device's lists and bundles in every version published."""
        self.versions = (OMEMO2, LEGACY) if await self.store.prepare_identity() else (LEGACY,)
        published = self.versions
        # slixmpp-omemo 2.2 (pinned) builds its session manager class in this function, with no way to
        # choose the versions published: its uploads are filtered here.
        base: Any = library._make_session_manager(self.xmpp, self)

        class Manager(base):  # type: ignore[misc, valid-type]
            @staticmethod
            async def _upload_bundle(bundle: Any) -> None:
                if bundle.namespace in published:
                    await base._upload_bundle(bundle)

            @staticmethod
            async def _upload_device_list(namespace: str, device_list: Any) -> None:
                if namespace in published:
                    await base._upload_device_list(namespace, device_list)

        sm: SessionManager = await Manager.create(
            [twomemo.Twomemo(self.store), oldmemo.Oldmemo(self.store)],
            self.store,
            self.xmpp.boundjid.bare,
            initial_own_label=None,
            undecided_trust_level_name=TrustLevel.UNDECIDED.value,
        )
        if self.store.first or self.store.recreated is not None:
            await self._only_this_device(sm, Manager._upload_device_list)
        # Reads the lists and bundles back from the server; publishes (and waits for the server's
        # result) whatever is missing or differs, so that from here on a contact finds this device.
        await sm.ensure_data_consistency()
        await sm.after_history_sync()
        if OMEMO2 not in published:
            await self._withdraw()
        self.xmpp.event("omemo_initialized")
        return sm

    async def _only_this_device(self, sm: SessionManager, upload: Callable[[str, Any], Awaitable[None]]) -> None:
        """A new device on an account that is the gateway's alone: any other device in its published
        lists is one whose keys are lost, and contacts would keep encrypting for it. Each list is
        replaced by one with this device only, in one publish: never an empty list, which a contact
        fetching it meanwhile would take for a gateway without OMEMO."""
        own = (await sm.get_own_device_information())[0]
        only: dict[int, None] = {own.device_id: None}
        try:
            for ns in self.versions:
                await upload(ns, only)
                await sm.update_device_list(ns, own.bare_jid, only)  # as its PEP notification will say
        except Exception as e:
            log.warning("could not drop lost OMEMO devices from the published lists: %s", e)
        self.store.first = False

    async def _withdraw(self) -> None:
        """Remove the OMEMO 2 device list and bundle of this account, if an earlier version published them."""
        pubsub, own = self.xmpp["xep_0060"], JID(self.xmpp.boundjid.bare)
        try:
            try:
                await pubsub.get_items(own, DEVICES2, max_items=1)
            except IqError as e:
                if e.condition == "item-not-found":
                    return  # never published, or withdrawn already
                raise
            # Clients that follow the list learn first that it is empty (they may keep a deleted one cached).
            await pubsub.publish(own, DEVICES2, "current", twomemo.etree.serialize_device_list({}))
            for node in (DEVICES2, BUNDLES2):
                try:
                    await pubsub.delete_node(own, node)
                except IqError as e:
                    if e.condition != "item-not-found":
                        raise
        except Exception as e:
            log.warning("could not withdraw this gateway's OMEMO 2 device list and bundle (%s): OMEMO 2 clients "
                        "may still try OMEMO 2 and get a refusal", e)
            return
        log.warning("OMEMO 2 device list and bundle withdrawn: this gateway's identity key, made by an earlier "
                    "version, is one some OMEMO 2 clients cannot verify; legacy OMEMO is published (docs/omemo.md)")

    # ------------------------------------------------------------ OMEMO 2 messages

    async def decrypt_message(self, stanza: Message) -> tuple[Message, DeviceInformation]:
        """Decrypt a one-to-one message: OMEMO 2 (its envelope opened and checked) when it carries
        OMEMO 2, else legacy (slixmpp-omemo's). The body is None for a key exchange, a heartbeat,
        or an envelope without body (a chat state). SceError for an envelope not from the sender."""
        el = stanza.xml.find(f"{{{OMEMO2}}}encrypted")
        if el is None:
            return await super().decrypt_message(stanza)
        sender = stanza["from"].bare
        sm = await self.get_session_manager()
        plaintext, device, _key = await sm.decrypt(twomemo.etree.parse_message(el, sender))
        opened = copy.copy(stanza)
        del opened["body"]  # the fallback
        for ns in (OMEMO2, LEGACY):
            for found in opened.xml.findall(f"{{{ns}}}encrypted"):
                opened.xml.remove(found)
        if plaintext is not None:
            body = open_envelope(plaintext, sender, self.xmpp.boundjid.bare)
            if body is not None:
                opened["body"] = body
        return opened, device

    async def seal(self, out: Message, bares: set[str], first: str | None = None) -> tuple[Message | None, frozenset[EncryptionError]]:
        """`out` (its body) encrypted for the trusted devices of `bares`, with the errors of the devices
        left out. Per device, the version `first` when it has it (the one the contact wrote in), else
        OMEMO 2 (when published), else legacy. None when `out` has no body."""
        jids = {JID(b) for b in bares}
        await self.refresh_device_lists(jids)
        body = out["body"]
        if not body:
            return None, frozenset()
        plaintexts = {LEGACY: body.encode()}
        if OMEMO2 in self.versions:
            plaintexts[OMEMO2] = envelope(body, self.xmpp.boundjid.bare, out["to"].bare)
        order = [ns for ns in dict.fromkeys((first, OMEMO2, LEGACY)) if ns in plaintexts]
        sm = await self.get_session_manager()
        messages, errors = await sm.encrypt(frozenset(j.bare for j in jids), plaintexts, backend_priority_order=order)
        enc = copy.copy(out)
        enc.clear()
        enc["body"] = self.fallback_message
        enc.enable("store")
        for m in sorted(messages, key=lambda m: m.namespace != OMEMO2):
            enc.append(twomemo.etree.serialize_message(m) if m.namespace == OMEMO2 else oldmemo.etree.serialize_message(m))
        enc["eme"]["namespace"] = OMEMO2 if any(m.namespace == OMEMO2 for m in messages) else LEGACY
        enc["eme"]["name"] = "OMEMO"
        return enc, errors

    # ------------------------------------------------------------ trust

    async def _devices_blindly_trusted(self, blindly_trusted: frozenset[DeviceInformation], identifier: str | None) -> None:
        for d in blindly_trusted:
            if d.bare_jid != self.xmpp.boundjid.bare:  # the gateway's own account: not a contact's device
                self.notices.add(d.bare_jid, NewDevice(d.device_id, fingerprint(d.identity_key), True))

    async def _prompt_manual_trust(self, manually_trusted: frozenset[DeviceInformation], identifier: str | None) -> None:
        # Nobody to ask on a headless gateway: a new device of a contact with a verified one waits for an admin.
        sm = await self.get_session_manager()
        for d in manually_trusted:
            await sm.set_trust(d.bare_jid, d.identity_key, TrustLevel.DISTRUSTED.value)
            self.notices.add(d.bare_jid, NewDevice(d.device_id, fingerprint(d.identity_key), False))
