"""The paho client as the `Broker` (broker.py) drives it from the event loop, and the
check whether a broker lets anonymous clients in.

Apart from the broker's session handling: this is how bytes go in and out of paho.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from ..config import MqttSection

log = logging.getLogger("iot_gateway.mqtt")

PROBE_TIMEOUT = 5.0  # seconds the anonymous test connection may take
READ_CHUNK = 65536  # bytes asked of the socket per recv()
PUBLISH = 0x30  # the packet type of PUBLISH, in the first byte's high nibble


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
    `send()`. Here reads come from one `recv()` of up to READ_CHUNK bytes, the
    PUBLISH packets whole in them are taken apart here (`publishes`), and
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
        # (topic, payload, retain) of each message `publishes` reads; paho's on_message for the rest.
        self.on_publish_fast: Callable[[str, bytes, bool], None] | None = None

    def read(self, limit: int) -> bool:
        """Handle up to `limit` packets: the PUBLISH packets already read with `publishes`, anything
        else and the next read from the socket with paho's `loop_read`. True when more may be
        waiting (the limit was reached); False once the socket had nothing more, or is closed."""
        self.drained = False
        left = limit
        while left > 0 and self._sock is not None:
            if self.rpos >= len(self.rbuf) and not self._in_packet["command"] and not self._fill():
                return False
            n = self.publishes(left)
            left -= n
            if left <= 0 or (n and self.rpos >= len(self.rbuf)):
                continue  # all taken: read the socket again (or stop at the limit)
            rc = self.loop_read()  # what `publishes` left: one packet, paho's way
            left -= 1
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self.drained:
                return False
        return self._sock is not None

    def _fill(self) -> bool:
        """Read the socket into the buffer; False when nothing came: it would block (`drained`),
        or the broker closed it or it failed, which ends the connection as paho's read does."""
        try:
            buf = super()._sock_recv(READ_CHUNK)  # SSL's want-read/want-write become BlockingIOError
        except BlockingIOError:
            self.drained = True
            return False
        except OSError as e:
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", e)
            self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return False
        if not buf:
            self.eof = True
            self._loop_rc_handle(MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return False
        self.rbuf, self.rpos = buf, 0
        self._last_bytes_received = time.monotonic()  # keepalive: what paho notes per packet it reads
        return True

    def publishes(self, limit: int) -> int:
        """Handle up to `limit` PUBLISH packets (QoS 0 and 1) that are whole in what was already
        read: `on_publish_fast` for each, then the PUBACK at QoS 1, as paho's `_handle_publish`
        does, without its per-packet machinery (three reads, a dict, a lock, a message object
        with a `threading.Condition`, its callback matcher), which cost as much again as
        everything the gateway does with a reading. The number handled. It stops at anything
        else (another packet, QoS 2, a packet not whole yet, one that is malformed, a topic that
        is not UTF-8): paho's own read takes that, with its errors, as before.
        """
        handler = self.on_publish_fast
        if handler is None or self._in_packet["command"]:
            return 0  # paho is in the middle of a packet
        buf = self.rbuf
        end = len(buf)
        n = 0
        while n < limit and self.rpos < end and self._sock is not None:
            pos = self.rpos
            header = buf[pos]
            qos = (header >> 1) & 3
            if header & 0xF0 != PUBLISH or qos > 1:
                break
            i, length, shift = pos + 1, 0, 0  # the remaining length: 7 bits a byte, at most 4 bytes
            while i < end and shift < 28:
                byte = buf[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                break  # not all read yet, or too long: paho's read
            stop = i + length
            if length < 2 or stop > end:
                break
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            body = topic_end + 2 if qos else topic_end
            if topic_end == i + 2 or body > stop:
                break  # an empty topic, or lengths that do not fit: paho says it is malformed
            try:
                topic = buf[i + 2:topic_end].decode()
            except UnicodeDecodeError:
                break
            self.rpos = stop
            n += 1
            try:
                handler(topic, buf[body:stop], bool(header & 1))
            except Exception:
                log.exception("mqtt: error handling a message on %s (ignored)", topic)
            if qos and not self._manual_ack:
                self._send_puback(buf[topic_end] << 8 | buf[topic_end + 1])
        return n

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
            self._last_bytes_received = time.monotonic()  # keepalive: what paho notes per packet it reads
        end = pos + bufsize
        self.rpos = min(end, len(buf))
        return buf[pos:end]

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self.batch is not None:
            self.batch += buf
            return len(buf)
        return super()._sock_send(buf)
