"""The paho client as the `Broker` (broker.py) drives it from the event loop, and the
check whether a broker lets anonymous clients in.

Apart from the broker's session handling: this is how bytes go in and out of paho.
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ..config import MqttSection

PROBE_TIMEOUT = 5.0  # seconds the anonymous test connection may take
READ_CHUNK = 65536  # bytes asked of the socket per recv()


def describe(err: BaseException | None) -> str:
    """A short reason for a failed connection attempt."""
    if err is None:
        return "connection failed"
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {err.verify_message or err}"
    if isinstance(err, ssl.SSLError):
        return f"TLS error: {err.reason or err}"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def accepts_anonymous(cfg: MqttSection, timeout: float = PROBE_TIMEOUT) -> bool | None:
    """Whether the broker of `cfg` accepts a connection without username and password; None when
    it could not be told (unreachable, no answer in `timeout`). Blocks: run it in a worker thread."""
    answers: list[bool] = []
    c = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"iot-gateway-probe-{os.urandom(4).hex()}",
        clean_session=True, protocol=paho.MQTTv311,
    )
    if cfg.tls:
        c.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None)
    c.connect_timeout = timeout
    c.on_connect = lambda _c, _u, _f, reason, _p: answers.append(not reason.is_failure)
    try:
        c.connect(cfg.host, cfg.port, keepalive=max(5, int(timeout) * 2))
        deadline = time.monotonic() + timeout
        while not answers and time.monotonic() < deadline:
            if c.loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
        if answers and answers[0]:
            c.disconnect()
            c.loop(0.1)
    except (OSError, ValueError):  # unreachable, TLS refused (ssl.SSLError is an OSError), a bad host name
        return None
    finally:
        sock = c.socket()
        if sock is not None:
            sock.close()
    return answers[0] if answers else None


class LoopClient(paho.Client):
    """paho's client, driven from the event loop, reading and writing in bulk.

    paho reads a packet with three or more `recv()` calls (one byte of type,
    the length byte by byte, the body) and sends each packet with its own
    `send()`. Here reads come from one `recv()` of up to READ_CHUNK bytes, and
    while `batch` is set, packets are collected and sent with one `send()`: a
    turn's PUBACKs go out together. `drained` tells that the socket had
    nothing more to read (EAGAIN), `eof` that the broker closed it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.rbuf = b""
        self.rpos = 0
        self.drained = False
        self.eof = False
        self.batch: bytearray | None = None

    def reset_buffers(self) -> None:
        """Forget what was read or collected on a previous connection."""
        self.rbuf, self.rpos, self.drained, self.eof, self.batch = b"", 0, False, False, None

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self.rbuf, self.rpos
        if pos >= len(buf):
            try:
                buf = super()._sock_recv(READ_CHUNK)  # SSL's want-read/want-write become BlockingIOError
            except BlockingIOError:
                self.drained = True
                raise
            if not buf:
                self.eof = True
                return buf
            self.rbuf, pos = buf, 0
        end = pos + bufsize
        self.rpos = min(end, len(buf))
        return buf[pos:end]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self.batch is not None:
            self.batch += buf
            return len(buf)
        return super()._sock_send(buf)
