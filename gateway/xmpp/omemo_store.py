"""The OMEMO key store: all of the gateway's OMEMO state in one JSON file, and its identity key.

The identity key is made here, before python-omemo would make one, so that its Ed25519 form has
the sign bit clear: libomemo.js (Converse.js 14) checks an OMEMO 2 bundle's signature with the
Curve25519 form of the key and assumes that bit clear, so half of python-omemo's own keys fail
there with "Invalid signature". A store made by an earlier version with the bit set keeps its
key (a new one would be a new device for every contact): OMEMO 2 is then not published.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import tempfile
from pathlib import Path

import xeddsa
from omemo.storage import Just, Maybe, Nothing, Storage
from omemo.types import JSONType

log = logging.getLogger("iot_gateway.omemo")

IS_SEED, KEY = "/ikp/is_seed", "/ikp/key"  # where python-omemo 2.1 keeps the identity key


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


    async def prepare_identity(self) -> bool:
        """Make the identity key if there is none yet (one every OMEMO 2 client can verify); whether
        the key in the store is such a key. Runs before python-omemo reads the store."""
        if KEY not in self.data:
            while True:
                seed = secrets.token_bytes(32)
                if not xeddsa.seed_to_ed25519_pub(seed)[31] & 0x80:
                    break
            self.data[IS_SEED] = True
            self.data[KEY] = base64.urlsafe_b64encode(seed).decode("ascii")
            await self._save()
            return True
        return verifiable(self.data)


def verifiable(data: dict[str, JSONType]) -> bool:
    """Whether the identity key stored in `data` has the Ed25519 sign bit clear (see the module's
    docstring); False for a key that cannot be read (python-omemo then says why)."""
    try:
        key = base64.urlsafe_b64decode(str(data[KEY]).encode("ascii"))
        ed = xeddsa.seed_to_ed25519_pub(key) if data.get(IS_SEED, True) else xeddsa.priv_to_ed25519_pub(key)
    except (KeyError, ValueError, xeddsa.XEdDSAException):
        return False
    return not ed[31] & 0x80
