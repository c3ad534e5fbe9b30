"""Small JSON state files under `[gateway] state_dir`, written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("iot_gateway.state")


class StateDir:
    """The gateway's state folder: watches, pending reverts, the history database."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def ensure(self) -> None:
        """Create the folder (owner-only) if it is missing."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

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

    def save(self, name: str, value: Any) -> None:
        """Write `value` as JSON to `name`; a crash mid-write leaves the old file intact."""
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
