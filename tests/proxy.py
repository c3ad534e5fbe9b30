"""A TCP proxy on loopback whose connections a test can cut (a network drop) or hold (a
silent partition: nothing passes, nobody is told, until `release()`)."""

from __future__ import annotations

import asyncio
import contextlib

from gateway.demo.localservers import free_port


class Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target; `cut()` drops every connection."""

    def __init__(self, target: int):
        self.target = target
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self._open = asyncio.Event()
        self._open.set()
        self._flushers: set[asyncio.Event] = set()

    async def start(self) -> "Proxy":
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every open connection, as a dropped link would."""
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def hold(self) -> None:
        """A silent partition: bytes and closes stop crossing, in both directions, new connections included."""
        self._open.clear()

    def release(self) -> None:
        """The partition heals: held bytes go on; bytes a side wrote before it gave up its
        connection are lost with it (as TCP loses them), and the other side then sees the reset."""
        self._open.set()
        for wake in self._flushers:
            wake.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_w}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            held = bytearray()
            wake = asyncio.Event()
            self._flushers.add(wake)

            async def flush() -> None:
                while True:
                    await wake.wait()
                    wake.clear()
                    if held and self._open.is_set() and not w.transport.is_closing():
                        w.write(bytes(held))
                        held.clear()

            flusher = asyncio.ensure_future(flush())
            try:
                with contextlib.suppress(Exception):
                    while data := await r.read(65536):
                        held += data
                        wake.set()
                if not self._open.is_set():
                    held.clear()  # the sender gave up during the partition: its unsent bytes are gone
                    await self._open.wait()
                elif held and not w.transport.is_closing():
                    w.write(bytes(held))
            finally:
                flusher.cancel()
                self._flushers.discard(wake)
            w.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        self._writers -= {writer, up_w}
