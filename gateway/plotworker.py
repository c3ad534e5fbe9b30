"""The process that draws plots: `python -m gateway.plotworker`, started and ended by
gateway.plot through gateway.worker. matplotlib is imported here, never in the gateway."""

from __future__ import annotations

import ctypes

from . import plot
from .worker import serve


def draw(request: object) -> bytes:
    """A Chart as a PNG, then the memory drawing freed handed back to the system (glibc keeps
    it otherwise, for as long as this process waits for the next plot)."""
    if not isinstance(request, plot.Chart):
        raise TypeError(f"expected a Chart, got {type(request).__name__}")
    try:
        return plot.render(request)
    finally:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc


def main() -> None:
    """Draw the charts that arrive on stdin until it ends."""
    serve(draw)


if __name__ == "__main__":
    main()
