"""Small JSON state files under `[gateway] state_dir`, written atomically, and the folder's lock.

One process at a time owns a state folder: it holds an exclusive `flock` on
`state_dir/lock` for its whole life. A second process either refuses to start
(`run`) or uses the folder read-only (`console`): it loads what is there and
saves nothing.

A save that fails (a full disk, a read-only folder) raises SaveError, whose
message is meant for the user. The value is kept and saving is retried every
RETRY_SAVE seconds; each cause is logged once, not once per attempt.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("iot_gateway.state")

LOCK_FILE = "lock"
RETRY_SAVE = 30.0  # seconds between attempts to save what could not be saved

REASONS = {
    errno.ENOSPC: "state folder full",
    errno.EDQUOT: "state folder over its disk quota",
    errno.EROFS: "state folder on a read-only file system",
    errno.EACCES: "no permission to write the state folder",
    errno.EPERM: "no permission to write the state folder",
}


class StateError(Exception):
    """A problem with the state folder; the message is meant for the user."""


class SaveError(StateError):
    """A state file could not be written. `reason` is short, for chat replies."""

    def __init__(self, name: str, reason: str, retried: bool):
        super().__init__(f"cannot save {name}: {reason}")
        self.name = name
        self.reason = reason
        self.retried = retried  # whether saving is retried by itself

    def note(self, consequence: str) -> str:
        """`NOT saved: <reason>; <consequence>`, for the end of a reply."""
        text = f"NOT saved: {self.reason}; {consequence}"
        if self.retried:
            text += f" (saving is retried every {RETRY_SAVE:g} s)"
        return text


class StateLocked(StateError):
    """Another process holds the state folder; `pid` is that process, when known."""

    def __init__(self, path: Path, pid: int | None):
        who = f"another iot-gateway process (PID {pid})" if pid else "another iot-gateway process"
        super().__init__(f"state folder {path} is in use by {who}")
        self.path = path
        self.pid = pid


class StateDir:
    """The gateway's state folder: watches, pending reverts, the history database."""

    def __init__(self, path: Path):
        self.path = Path(path)
        # Set when another process holds the folder: nothing is saved, the reason says why.
        self.readonly: StateLocked | None = None
        self._lock_fd: int | None = None
        self._unsaved: dict[str, Any] = {}  # name -> value that still has to be written
        self._errors: dict[str, SaveError] = {}  # name -> why its last save failed
        self._logged: set[str] = set()  # causes already logged
        self._retry: asyncio.TimerHandle | None = None
        # Told `not saved: <why>` when saving starts failing (or the cause changes), None when all is saved:
        # the gateway makes it a hub problem, so presence, systemd's status and admins hear of it.
        self.on_problem: Callable[[str | None], None] | None = None

    def ensure(self) -> None:
        """Create the folder (owner-only) if it is missing."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    # ------------------------------------------------------------ lock

    def lock(self) -> None:
        """Take the folder for this process until `unlock` or exit.

        Raises StateLocked when another process holds it, OSError when the folder is unusable.
        """
        if self._lock_fd is not None:
            return
        self.ensure()
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise StateLocked(self.path, pid) from None
        except OSError:
            os.close(fd)
            raise
        # Only for the message a second process shows; the flock is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def use_readonly(self, why: StateLocked) -> None:
        """Load from the folder but save nothing: another process owns it."""
        self.readonly = why

    def unlock(self) -> None:
        """Release the folder (the process exiting does it too)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor drops the flock
            self._lock_fd = None

    # ------------------------------------------------------------ files

    def load(self, name: str, default: Any) -> Any:
        """The JSON value stored as `name`, or `default` when missing or unreadable."""
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as e:
            log.error("%s is unreadable (%s); starting from empty state", p, e)
            return default

    def error(self, name: str) -> SaveError | None:
        """Why the latest state of `name` is not on disk, or None when it is."""
        return self._errors.get(name)

    def save(self, name: str, value: Any) -> None:
        """Write `value` as JSON to `name`; a crash mid-write leaves the old file intact.

        Raises SaveError; then `value` is kept and saving it is retried.
        """
        if self.readonly is not None:
            err = SaveError(name, f"{self.readonly} (this process uses it read-only)", retried=False)
            self._errors[name] = err
            self._tell()
            self._log_once("readonly", f"{self.readonly}: this process saves nothing", logging.WARNING)
            raise err
        try:
            self._write(name, value)
        except OSError as e:
            reason = REASONS.get(e.errno or 0, "cannot write the state folder")
            err = SaveError(name, f"{reason} ({e.strerror or e})", retried=True)
            self._errors[name] = err
            self._unsaved[name] = value
            self._tell()
            self._log_once(
                str(e.errno),
                f"cannot save {name} in {self.path}: {e}; changes are kept in memory, "
                f"lost on a restart until saved, and saving is retried every {RETRY_SAVE:g} s",
            )
            self._arm_retry()
            raise err from None
        self._unsaved.pop(name, None)
        if self._errors.pop(name, None) is not None and not self._errors:
            log.warning("state folder %s: saving works again, all state saved", self.path)
            self._logged.clear()
            self._tell()

    def retry(self) -> None:
        """Try again to write what could not be written."""
        self._retry = None
        for name, value in list(self._unsaved.items()):
            try:
                self.save(name, value)
            except SaveError:
                pass  # already logged; save() armed the next try

    def stop(self) -> None:
        """Try once more to write what could not be written, then stop retrying."""
        if self._retry is not None:
            self._retry.cancel()
        self.retry()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _write(self, name: str, value: Any) -> None:
        self.ensure()
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(value, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename itself is only durable once the folder's entry is on disk.
        dfd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _tell(self) -> None:
        if self.on_problem is None:
            return
        reasons = list(dict.fromkeys(e.reason for e in self._errors.values()))
        try:
            self.on_problem(f"not saved: {'; '.join(reasons)}" if reasons else None)
        except Exception:
            log.exception("state problem listener failed")

    def _log_once(self, cause: str, message: str, level: int = logging.ERROR) -> None:
        if cause not in self._logged:
            self._logged.add(cause)
            log.log(level, "%s", message)

    def _arm_retry(self) -> None:
        if self._retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tool or a test): the next save tries again
        self._retry = loop.call_later(RETRY_SAVE, self.retry)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
