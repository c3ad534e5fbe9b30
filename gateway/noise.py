"""One log line per cause per interval; the rest are counted, and `status` shows the counts.

Whatever a stranger can repeat (a flapping status topic, a flood of bad
payloads, commands on unknown topics) must not be able to fill the log: a
`Throttle` lets the first line of a cause through, holds back the same cause
for `every` seconds and says how many it held back with the next one. With a
`Noise` (the hub's), the counts also show in `status`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("iot_gateway")

LOG_EVERY = 60.0  # seconds between two log lines of the same cause
MAX_CAUSES = 1000  # causes remembered; more (a stranger inventing new ones) share one entry
OTHER = "other causes"


@dataclass(slots=True)
class Count:
    """How often one cause came since start, and how many of those were not logged."""

    times: int = 0
    held: int = 0


class Noise:
    """What was repeated since start, by cause, for `status`."""

    def __init__(self) -> None:
        self.counts: dict[str, Count] = {}

    def count(self, cause: str, held: bool) -> None:
        """One more time `cause` came; `held`: its log line was held back."""
        if cause not in self.counts and len(self.counts) >= MAX_CAUSES:
            cause = OTHER
        c = self.counts.setdefault(cause, Count())
        c.times += 1
        c.held += held

    def lines(self) -> list[str]:
        """`repeated: <cause> ×N (M not logged)` for each cause that was held back at least once."""
        return [
            f"repeated: {cause} ×{c.times} ({c.held} not logged)"
            for cause, c in self.counts.items()
            if c.held
        ]


class Throttle:
    """Lets one line per cause through every `every` seconds and counts the ones held back."""

    def __init__(
        self,
        every: float = LOG_EVERY,
        logger: logging.Logger = log,
        noise: Noise | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.every = every
        self.logger = logger
        self.noise = noise
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, message: str) -> bool:
        """Log `message` as a warning unless `key` was logged less than `every` seconds ago; True if logged."""
        return self.log(logging.WARNING, key, message)

    def info(self, key: str, message: str) -> bool:
        """Like `warn`, at info level."""
        return self.log(logging.INFO, key, message)

    def log(self, level: int, key: str, message: str) -> bool:
        """Log `message` at `level` unless `key` was logged less than `every` seconds ago; True if logged."""
        now = self.clock()
        last = self._last.get(key)
        held = last is not None and now - last < self.every
        if self.noise is not None:
            self.noise.count(key, held)
        if held:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        if len(self._last) >= MAX_CAUSES and key not in self._last:
            self._last.clear()  # a stranger inventing causes: forget the old ones rather than grow
            self._held.clear()
        self._last[key] = now
        n = self._held.pop(key, 0)
        self.logger.log(level, "%s%s", message, f" ({n} more like it not logged)" if n else "")
        return True
