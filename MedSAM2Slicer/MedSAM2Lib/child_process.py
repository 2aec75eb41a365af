"""The engine's child process and its one loopback socket, pumped without ever blocking.

Starts `python -m medsam2.remote.agent`, takes its connection and hello (proving, by a shared key,
that it is our child) over as many polls as it takes, then moves bytes both ways in bounded,
non-blocking steps: a volume goes out a slab at a time, replies come in as framed messages
(medsam2.remote.channel). It knows nothing of requests: engine_process.py builds on it.
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque

import numpy as np

from medsam2.remote import channel

SEND_BUDGET = 16 << 20   # bytes written per pump (a volume goes out over several ticks)
RECV_BUDGET = 16 << 20   # bytes read per pump
CHUNK = 4 << 20          # a volume's frames are copied out this much at a time
STARTUP_TIMEOUT_S = 60.0  # from spawning the child to its hello (not counting the model load)


class ChildGone(Exception):
    """The child process stopped, or its connection broke; the message says how."""


def default_python() -> str:
    """The Python to run the child with: this one, or inside Slicer (whose sys.executable is the
    application itself) the PythonSlicer launcher next to it, which sets up Slicer's Python."""
    exe = sys.executable or ""
    if os.path.basename(exe).lower().startswith("python"):
        return exe
    folder = os.path.dirname(exe)
    for candidate in (os.path.join(folder, "PythonSlicer"), os.path.join(folder, "PythonSlicer.exe"),
                      shutil.which("PythonSlicer") or ""):
        if candidate and os.path.isfile(candidate):
            return candidate
    return exe


class ChildProcess:
    """One running child and its socket. `pump()` never blocks; `stop()` ends the child."""

    def __init__(self, python: str):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        self._listener, self._sock, self._hello = listener, None, None
        self._key = secrets.token_hex(32)
        env = dict(os.environ)
        env[channel.KEY_ENV] = self._key
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # medsam2 lies beside MedSAM2Lib
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        fd, self._stderr_path = tempfile.mkstemp(prefix="medsam2-engine-", suffix=".log")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        port = listener.getsockname()[1]
        with os.fdopen(fd, "wb") as stderr:
            self.proc = subprocess.Popen(
                [python, "-m", "medsam2.remote.agent", "--connect", f"127.0.0.1:{port}"],
                env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, creationflags=flags)
        self._spawned_at = time.monotonic()
        self.reader = channel.MessageReader()
        self.outbox: deque = deque()  # byte chunks, or FramePayloads (a volume's frames)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, header: dict, payload=b"") -> None:
        """Queue a message; pump() writes it once the child is connected."""
        self.outbox.append(channel.frame_head(header, len(payload)))
        if len(payload):
            self.outbox.append(payload)

    def pump(self) -> bool:
        """Move bytes both ways within the budgets; False while the child has not connected yet.
        Raises ChildGone when the child stopped or its stream broke."""
        if self._sock is None:
            self._accept()
            if self._sock is None:
                return False
        try:
            self._flush()
            received = 0
            while received < RECV_BUDGET:
                try:
                    data = self._sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    raise ChildGone("its connection closed")
                received += len(data)
                self.reader.feed(data)
        except (ConnectionError, OSError) as exc:
            raise ChildGone(f"connection lost: {exc}") from None
        except channel.ChannelError as exc:
            raise ChildGone(str(exc)) from None
        return True

    def flush(self) -> None:
        """Write what is queued now, as far as the socket takes it without blocking (a cancel
        should not wait for the next tick)."""
        if self._sock is not None:
            try:
                self._flush()
            except (ConnectionError, OSError):
                pass  # the next pump() reports the broken connection

    def exited(self) -> bool:
        """The process is gone and every message it sent has been read."""
        return self.proc.poll() is not None and not self.reader.pending()

    def _accept(self) -> None:
        """Take the child's connection and its hello, without blocking: over as many polls as it takes."""
        if self.proc.poll() is not None:
            raise ChildGone("it exited while starting")
        if self._hello is None:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() - self._spawned_at > STARTUP_TIMEOUT_S:
                    raise ChildGone(f"it did not connect within {STARTUP_TIMEOUT_S:.0f} s") from None
                return
            sock.setblocking(False)
            self._hello = (sock, channel.MessageReader())
        sock, reader = self._hello
        try:
            while reader.pending() == 0:
                data = sock.recv(4096)
                if not data:
                    raise OSError("closed before saying hello")
                reader.feed(data)
        except (BlockingIOError, InterruptedError):
            return  # the rest of the hello comes with a later poll
        except (OSError, channel.ChannelError):
            sock.close()
            self._hello = None
            return
        self._hello = None
        hello, _ = reader.pop()
        if hello.get("type") != "hello" or not hmac.compare_digest(str(hello.get("key", "")), self._key):
            sock.close()  # not our child: keep listening for it
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self.reader = reader  # anything the child sent after its hello is already in there
        self._listener.close()
        self._listener = None

    def _flush(self) -> None:
        sent = 0
        while self.outbox and sent < SEND_BUDGET:
            chunk = self.outbox[0]
            if isinstance(chunk, FramePayload):
                piece = chunk.next_piece()
                if piece is None:
                    self.outbox.popleft()
                    continue
                self.outbox.appendleft(piece)
                continue
            if not len(chunk):
                self.outbox.popleft()
                continue
            try:
                n = self._sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            sent += n
            if n < len(chunk):
                self.outbox[0] = memoryview(chunk)[n:]
                return
            self.outbox.popleft()

    def last_words(self) -> str:
        """The end of what the child wrote to stderr (why it crashed)."""
        try:
            with open(self._stderr_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self._stderr_path) - 2000))
                return f.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def stop(self, timeout: float = 2.0) -> None:
        """Close our end (the child's signal to exit), wait for it, kill it after `timeout`."""
        for s in (self._sock, self._listener, self._hello[0] if self._hello else None):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self._sock = self._listener = self._hello = None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        try:
            os.unlink(self._stderr_path)
        except OSError:
            pass
        self.outbox.clear()


class FramePayload:
    """A volume's frames as message payload, copied out a slab at a time while being sent, so
    no single poll copies or writes the whole volume."""

    def __init__(self, frames: np.ndarray):
        self.frames = frames
        self.nbytes = int(frames.nbytes)
        per_frame = max(1, int(np.prod(frames.shape[1:])) * frames.dtype.itemsize)
        self.step = max(1, CHUNK // per_frame)
        self._next = 0

    def __len__(self):
        return self.nbytes

    def next_piece(self):
        if self._next >= self.frames.shape[0]:
            return None
        slab = np.ascontiguousarray(self.frames[self._next:self._next + self.step])
        self._next += self.step
        return memoryview(slab).cast("B")
