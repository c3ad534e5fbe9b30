"""A helper process for work whose memory should not stay in the gateway (drawing plots).

The gateway's allocator keeps what a big library once took (matplotlib: ~50 MB that
glibc seldom gives back), so such work runs in a child Python started on first use,
asked one thing at a time, killed past its deadline, and ended after `idle` seconds
without work: its memory goes back to the system with it.

The wire, over the child's stdin and stdout: a request is a 4-byte big-endian length
and a pickle (the child trusts the process that started it, never the other way round);
an answer is one line of JSON — `{"size": n}` followed by n bytes of result, or
`{"error": "ValueError", "message": "…", "missing": "module-or-null"}` — so nothing the
child sends is unpickled. The child's stderr is the gateway's (the journal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import BinaryIO

log = logging.getLogger("iot_gateway.worker")

HEADER = struct.Struct(">I")
MAX_ANSWER = 64 * 1024 * 1024  # bytes: far above any picture; more is a broken child


class WorkerFailed(Exception):
    """The child could not answer: it died, overran its deadline or sent nonsense. The message
    says which, for the user."""


class WorkFailed(Exception):
    """The child ran the work and it raised: `kind` is the exception's class name, `missing`
    the module that could not be imported (if that was why)."""

    def __init__(self, kind: str, message: str, missing: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.missing = missing


class Worker:
    """One child process running `command` (which must call `serve`), started on first use."""

    def __init__(self, name: str, command: Sequence[str], *, deadline: float, idle: float,
                 env: Callable[[], dict[str, str]] | None = None):
        self.name = name  # what the user is told failed: "the drawing process"
        self.command = list(command)
        self.deadline = deadline  # seconds for one answer, the child's start included
        self.idle = idle  # seconds without work after which the child is ended
        self.env = env  # the child's environment, computed when it starts; None: the gateway's
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._retire: asyncio.TimerHandle | None = None
        self._ending: set[asyncio.Task[int]] = set()  # idle children being ended

    @property
    def pid(self) -> int | None:
        """The running child's process id, None while there is none."""
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def ask(self, request: object) -> bytes:
        """The child's answer to `request`; WorkFailed if the work raised, WorkerFailed if the
        child did not answer (it is then killed, and the next request starts a new one)."""
        async with self._lock:
            if self._retire is not None:
                self._retire.cancel()
                self._retire = None
            try:
                async with asyncio.timeout(self.deadline):
                    return await self._exchange(request)
            except WorkFailed:
                raise  # a whole answer: the child is fine
            except TimeoutError:
                await self.close()
                raise WorkerFailed(f"{self.name} took longer than {self.deadline:g} s") from None
            except EOFError:  # its output ended mid-answer: it died
                code = await self.close()
                how = f" (killed by {_signal_name(-code)})" if code is not None and code < 0 else ""
                raise WorkerFailed(f"{self.name} ended without answering{how}") from None
            except (OSError, ValueError, asyncio.LimitOverrunError) as e:
                await self.close()
                raise WorkerFailed(f"{self.name} failed ({type(e).__name__}: {e})") from None
            except BaseException:
                await self.close()  # cancelled mid-answer: the pipe is out of step
                raise
            finally:
                if self.proc is not None:
                    self._retire = asyncio.get_running_loop().call_later(self.idle, self._end_idle)

    async def _exchange(self, request: object) -> bytes:
        if self.proc is None or self.proc.returncode is not None:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=self.env() if self.env is not None else None,
            )
            log.debug("worker %d started: %s", self.proc.pid, " ".join(self.command))
        assert self.proc.stdin is not None and self.proc.stdout is not None
        data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(HEADER.pack(len(data)) + data)
        await self.proc.stdin.drain()
        head = json.loads(await self.proc.stdout.readuntil(b"\n"))
        if not isinstance(head, dict):
            raise ValueError("answer is not a JSON object")
        if "error" in head:
            missing = head.get("missing")
            raise WorkFailed(str(head["error"]), str(head.get("message", "")),
                             missing if isinstance(missing, str) else None)
        size = head.get("size")
        if not isinstance(size, int) or not 0 <= size <= MAX_ANSWER:
            raise ValueError(f"bad answer size {size!r}")
        return await self.proc.stdout.readexactly(size)

    def _end_idle(self) -> None:
        self._retire = None
        proc = self.proc
        if proc is not None and not self._lock.locked():
            log.debug("worker %d idle for %g s: ending it", proc.pid, self.idle)
            self.proc = None
            task = asyncio.create_task(_end(proc, kill=False), name="worker-end")
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def close(self) -> int | None:
        """Kill the child if there is one; its exit code (negative: the signal), None if none ran."""
        if self._retire is not None:
            self._retire.cancel()
            self._retire = None
        for task in list(self._ending):
            with contextlib.suppress(Exception):
                await task
        proc, self.proc = self.proc, None
        return None if proc is None else await _end(proc, kill=True)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _end(proc: asyncio.subprocess.Process, kill: bool) -> int:
    """End a child, by closing its input (it exits when that ends) or with SIGKILL, and wait until
    its pipes are closed too; its exit code (a child that had died already keeps its own cause)."""
    if kill and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    try:
        async with asyncio.timeout(10):
            await proc.communicate(b"")  # closes stdin, reads stdout to its end, waits
    except (TimeoutError, OSError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


def serve(work: Callable[[object], bytes]) -> None:
    """The child's side: answer requests from stdin with `work` until stdin ends."""
    out: BinaryIO = sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print in the work must not corrupt the answers
    inp: BinaryIO = sys.stdin.buffer
    while True:
        head = inp.read(HEADER.size)
        if len(head) < HEADER.size:
            return
        request = pickle.loads(inp.read(HEADER.unpack(head)[0]))
        try:
            result = work(request)
        except ImportError as e:
            answer: dict[str, object] = {"error": type(e).__name__, "message": str(e), "missing": e.name or str(e)}
            result = b""
        except Exception as e:
            traceback.print_exc()  # to the gateway's stderr: the journal shows where it failed
            answer = {"error": type(e).__name__, "message": str(e)}
            result = b""
        else:
            answer = {"size": len(result)}
        out.write(json.dumps(answer).encode() + b"\n" + result)
        out.flush()


def python_module(module: str) -> list[str]:
    """The command running `python -m module` with the gateway's own interpreter."""
    return [sys.executable, "-m", module]

