"""The engine in a child process, driven from the application's main thread without ever blocking it.

Inside 3D Slicer the main thread keeps Python's GIL while Qt idles, so a Python worker thread in
Slicer's process runs only while the main thread happens to run Python: engine work on such a
thread crawls. So the engine runs in a child process (`python -m medsam2.remote.agent`): locally it
serves the model with the project's own server on loopback and talks to it with the project's own
client; remotely it only runs that client. This side sends requests and reads replies over one
loopback socket in non-blocking calls: `poll()`, called by a timer on the main thread, moves a
bounded amount of bytes and returns.

    engine = LocalEngine(model="sam2.1_hiera_tiny", checkpoint=path, device="cpu", image_size=256)
    handle = engine.open(frames, memory="sam2")          # queued; the child starts on first use
    request = handle.add_prompt(5, obj_id=1, points=[[30, 40]], labels=[1])
    while not request.done: engine.poll()                 # e.g. from a QTimer
    engine.close()                                        # the child exits (GPU memory freed)

A child that dies (crash, SIGKILL, out of memory) fails its outstanding requests with
EngineStopped; the next request starts a new child (`restarts` counts them), and sessions opened
on the old one report `alive == False` so their owners re-open them and replay their prompts.
"""

from __future__ import annotations

import hmac
import logging
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

from medsam2 import errors
from medsam2.errors import CheckpointError
from medsam2.masks import pack_mask, unpack_mask
from medsam2.options import DEFAULT_MODEL
from medsam2.remote import channel

from .engine_api import Request

log = logging.getLogger("MedSAM2.engine")
SEND_BUDGET = 16 << 20   # bytes written per poll (a volume goes out over several ticks)
RECV_BUDGET = 16 << 20   # bytes read per poll
CHUNK = 4 << 20          # a volume's frames are copied out this much at a time
STARTUP_TIMEOUT_S = 60.0  # from spawning the child to its hello (not counting the model load)


class EngineStopped(errors.ServerError):
    """The engine process stopped (crashed, was killed, or was closed) before answering."""


class EngineSession:
    """An engine session (one volume along one axis) in the child; its methods return Requests."""

    def __init__(self, engine: "LocalEngine", handle: int, num_frames: int, frame_shape: tuple):
        self.engine, self.handle = engine, handle
        self.generation = engine.generation
        self.num_frames, self.frame_shape = num_frames, tuple(frame_shape)
        self.opened: Request | None = None

    @property
    def alive(self) -> bool:
        """False once the child that holds it has stopped (its prompts must be replayed elsewhere)."""
        return self.generation == self.engine.generation and self.engine.state in ("starting", "ready")

    def _request(self, op, fields, payload=b"", stream=False) -> Request:
        return self.engine._request(op, {"handle": self.handle, **fields}, payload, stream)

    def add_prompt(self, frame, obj_id=1, points=None, labels=None, box=None, mask=None) -> Request:
        prompt, payload = prompt_fields(points, labels, box, mask)
        return self._request("add_prompt", {"frame": int(frame), "obj_id": int(obj_id), "prompt": prompt}, payload)

    def set_prompts(self, frame, obj_id, prompts) -> Request:
        """Make the engine hold exactly `prompts` (dicts of points/labels/box/mask) for the object on
        this frame: replays a frame after undo/redo or a restart."""
        fields, chunks, offset = [], [], 0
        for p in prompts:
            f, body = prompt_fields(p.get("points"), p.get("labels"), p.get("box"), p.get("mask"), offset)
            fields.append(f)
            chunks.append(body)
            offset += len(body)
        return self._request("set_prompts", {"frame": int(frame), "obj_id": int(obj_id), "prompts": fields},
                             b"".join(chunks))

    def propagate(self, direction="both", start=None, stop=None, axes=None) -> Request:
        stop = list(stop) if isinstance(stop, (tuple, list)) else stop
        return self._request("propagate", {"direction": direction, "start": start, "stop": stop, "axes": axes},
                             stream=True)

    def masks(self, obj_id=None) -> Request:
        return self._request("masks", {"obj_id": obj_id})

    def close(self) -> None:
        if self.alive:
            self._request("close", {})


def prompt_fields(points=None, labels=None, box=None, mask=None, offset=0):
    """A prompt as JSON fields plus payload bytes (a mask travels packed, at payload[span])."""
    fields, payload = {}, b""
    if points is not None:
        fields["points"] = np.asarray(points, dtype=float).reshape(-1, 2).tolist()
        fields["labels"] = np.asarray(labels, dtype=int).reshape(-1).tolist()
    if box is not None:
        fields["box"] = np.asarray(box, dtype=float).reshape(-1).tolist()
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        payload = pack_mask(mask).tobytes()
        fields["mask"] = {"shape": list(mask.shape), "span": [offset, offset + len(payload)]}
    return fields, payload


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


class LocalEngine:
    """The engine in a child process on this machine: the model loads there, and runs there.

    model, checkpoint, device, image_size, precision: as `medsam2.load_model` (checkpoint None = the
    registry's verified, cached download, with progress). allow_random_weights: accept a checkpoint
    made by `medsam2.testing.write_random_checkpoint` (tests only: its masks are meaningless).
    python: the interpreter for the child (default: this one, or Slicer's PythonSlicer).
    checkpoint_way: how a user of this application gives a local checkpoint file, named when the
    download fails (e.g. "the Checkpoint file field in MedSAM2's Settings").
    """

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | None = None, device: str = "auto",
                 image_size: int | None = None, precision: str = "auto", allow_random_weights: bool = False,
                 python: str | None = None, checkpoint_way: str | None = None):
        self.config = {"mode": "local", "model": model, "checkpoint": str(checkpoint) if checkpoint else None,
                       "device": device, "image_size": image_size or None, "precision": precision}
        self.allow_random_weights = bool(allow_random_weights)
        self.checkpoint_way = checkpoint_way  # how this application's user gives a checkpoint file
        self.python = python or default_python()
        self.state = "stopped"   # stopped | starting | ready | failed | closed
        self.generation = 0      # +1 at every start of a child
        self.restarts = 0        # children started after one stopped unexpectedly
        self.info: dict = {}     # what the child reported when ready (model, device, size, pid...)
        self.status = ""         # what the child is doing while starting ("Loading the model")
        self.download = None     # (done, total) bytes while the checkpoint downloads
        self.stopped_reason = ""  # why the last child stopped unexpectedly ("" if it did not)
        self._ids = 0
        self._proc = None
        self._listener = None
        self._sock = None
        self._key = ""
        self._reader = None
        self._outbox: deque = deque()    # byte chunks, or iterators of them (a volume's frames)
        self._requests: dict = {}        # id -> Request awaiting its reply
        self._handles = 0
        self._spawned_at = 0.0
        self._hello = None               # (socket, reader) of a connection that has not said hello yet
        self._stderr_path = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child if none is running (returns at once; it says hello within seconds)."""
        if self.state == "closed":
            raise EngineStopped("this MedSAM2 engine was closed; create a new one")
        if self.state in ("starting", "ready") and self.running:
            return
        crashed = self.state == "failed" or self._proc is not None
        self._teardown()
        self.generation += 1
        self.restarts += int(crashed and bool(self.stopped_reason))
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1)
        self._listener.setblocking(False)
        port = self._listener.getsockname()[1]
        self._key = secrets.token_hex(32)
        env = dict(os.environ)
        env[channel.KEY_ENV] = self._key
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # medsam2 lies beside MedSAM2Lib
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        fd, self._stderr_path = tempfile.mkstemp(prefix="medsam2-engine-", suffix=".log")
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if os.name == "nt" else 0
        with os.fdopen(fd, "wb") as stderr:
            self._proc = subprocess.Popen(
                [self.python, "-m", "medsam2.remote.agent", "--connect", f"127.0.0.1:{port}"],
                env=env, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, creationflags=flags)
        self._spawned_at = time.monotonic()
        self._reader = channel.MessageReader()
        self.state, self.status, self.download, self.info = "starting", "Starting the engine", None, {}
        self._request("start", {"config": self._start_config()})
        log.info("MedSAM2 engine process %s started (%s)", self._proc.pid, self.python)

    def _start_config(self) -> dict:
        return dict(self.config)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child and wait for it to exit (killed after `timeout`); requests in flight fail."""
        if self.state == "closed":
            return
        # closing our end of the socket is the child's signal to exit
        self._fail_all(EngineStopped("the MedSAM2 engine was closed"))
        self._teardown(timeout)
        self.state = "closed"

    def _teardown(self, timeout: float = 2.0) -> None:
        for s in (self._sock, self._listener):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        if self._hello is not None:
            self._hello[0].close()
            self._hello = None
        self._sock = self._listener = None
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self._stderr_path:
            try:
                os.unlink(self._stderr_path)
            except OSError:
                pass
            self._stderr_path = None
        self._outbox.clear()

    def _child_stopped(self, reason: str) -> None:
        """The child went away by itself: fail what it owed, and say why (with its last words)."""
        code = self._proc.poll() if self._proc is not None else None
        tail = ""
        if self._stderr_path:
            try:
                with open(self._stderr_path, "rb") as f:
                    f.seek(max(0, os.path.getsize(self._stderr_path) - 2000))
                    tail = f.read().decode("utf-8", "replace").strip()
            except OSError:
                pass
        what = f"exit code {code}" if code is not None else reason
        self.stopped_reason = f"The MedSAM2 engine process stopped unexpectedly ({what})."
        log.error("%s%s", self.stopped_reason, f"\n{tail}" if tail else "")
        self._fail_all(EngineStopped(self.stopped_reason + " Your next action restarts it."))
        self.state = "failed"
        self._teardown(timeout=0.5)

    # -- requests ------------------------------------------------------------------------------
    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _ensure_started(self) -> None:
        """A stopped or failed engine starts a child; a closed one refuses."""
        if self.state in ("stopped", "failed", "closed"):
            self.start()

    def _request(self, op, fields, payload=b"", stream=False) -> Request:
        if op != "start":
            self._ensure_started()
        request = Request(op, stream, on_cancel=self._cancel)
        request.id = self._next_id()
        self._requests[request.id] = request
        self._send({"id": request.id, "op": op, **fields}, payload)
        return request

    def _cancel(self, request: Request) -> None:
        if request.id in self._requests:
            self._send({"op": "cancel", "target": request.id})

    def _send(self, header, payload=b"") -> None:
        """Queue a message; poll() writes it once the child is connected (a volume in slabs)."""
        self._outbox.append(channel.frame_head(header, len(payload)))
        if len(payload):
            self._outbox.append(payload)

    def open(self, frames: np.ndarray, memory: str = "self-sorting", window=None, image_set: bool = False
             ) -> EngineSession:
        """Open an engine session on `frames` (slices, rows, cols); returns at once. Requests on the
        session may be made right away: the child runs them in order after the open."""
        self._ensure_started()
        self._handles += 1
        frames = np.asarray(frames)
        handle = EngineSession(self, self._handles, frames.shape[0], frames.shape[1:])
        header = {"handle": handle.handle, "memory": memory, "image_set": bool(image_set),
                  "window": None if window is None else [float(window[0]), float(window[1])],
                  "array": {"dtype": frames.dtype.str, "shape": list(frames.shape)}}
        handle.opened = self._request("open", header, FramePayload(frames))
        return handle

    # -- the main-thread pump ------------------------------------------------------------------
    def poll(self, budget_s: float = 0.01) -> int:
        """Move bytes both ways and deliver replies, within about `budget_s`; never blocks.
        Returns how many messages were delivered."""
        if self._proc is None or self.state == "closed":
            return 0
        if self._sock is None:
            self._accept()
            if self._sock is None:
                return 0
        deadline = time.monotonic() + budget_s
        try:
            self._flush()
            received = 0
            while received < RECV_BUDGET:
                try:
                    data = self._sock.recv(1 << 20)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    self._child_stopped("its connection closed")
                    return 0
                received += len(data)
                self._reader.feed(data)
        except (ConnectionError, OSError) as exc:
            if self._proc is not None:
                self._child_stopped(f"connection lost: {exc}")
            return 0
        except channel.ChannelError as exc:
            self._child_stopped(str(exc))
            return 0
        delivered = 0
        while time.monotonic() < deadline or delivered == 0:
            message = self._reader.pop()
            if message is None:
                break
            self._deliver(*message)
            delivered += 1
        if self._proc is not None and self._proc.poll() is not None and not self._reader.pending():
            self._child_stopped("it exited")
        return delivered

    def _accept(self) -> None:
        """Take the child's connection and its hello, without blocking: over as many polls as it takes."""
        if self._proc.poll() is not None:
            self._child_stopped("it exited while starting")
            return
        if self._hello is None:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                if time.monotonic() - self._spawned_at > STARTUP_TIMEOUT_S:
                    self._child_stopped(f"it did not connect within {STARTUP_TIMEOUT_S:.0f} s")
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
        self._reader = reader  # anything the child sent after its hello is already in there
        self._listener.close()
        self._listener = None

    def _flush(self) -> None:
        sent = 0
        while self._outbox and sent < SEND_BUDGET:
            chunk = self._outbox[0]
            if isinstance(chunk, FramePayload):
                piece = chunk.next_piece()
                if piece is None:
                    self._outbox.popleft()
                    continue
                self._outbox.appendleft(piece)
                continue
            if not len(chunk):
                self._outbox.popleft()
                continue
            try:
                n = self._sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return
            sent += n
            if n < len(chunk):
                self._outbox[0] = memoryview(chunk)[n:]
                return
            self._outbox.popleft()

    def _deliver(self, header: dict, payload: bytes) -> None:
        kind = header.get("type")
        if kind == "log":
            log.log(int(header.get("level", logging.INFO)), "[engine] %s", header.get("message", ""))
            return
        if kind == "status":
            self.status = header.get("text", "")
            return
        if kind == "progress":
            self.download = (header.get("done", 0), header.get("total", 0))
            return
        request = self._requests.get(header.get("id"))
        if request is None:
            return
        if kind == "item":
            request.items.append((int(header["frame"]), channel.masks_from(header, payload)))
            return
        del self._requests[request.id]
        if kind == "done":
            request.finish(_decode(request.op, header.get("value"), payload))
            if request.op == "start":
                self._ready(request)
        else:
            error = _error_from(header, self.checkpoint_way)
            request.finish(error=error)
            if request.op == "start":
                self.state = "failed"
                self.stopped_reason = ""
                self._fail_all(error)

    def _ready(self, request: Request) -> None:
        self.info = request.value or {}
        self.status, self.download = "", None
        if self.info.get("weights_are_random") and not self.allow_random_weights:
            error = errors.CheckpointError(
                f"{self.describe()} holds random test weights, not a trained model: its masks would be "
                "meaningless. Choose a registry model (leave the checkpoint empty), a trained checkpoint file, or a "
                "server running one. (Developers can allow test weights: Developer mode in Slicer's Application "
                "Settings, or allow_random_weights=True.)")
            self._fail_all(error)
            self.state = "failed"
            self._teardown()
            request.error = error
            return
        self.state = "ready"

    def _fail_all(self, error: Exception) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            if not request.done:
                request.finish(error=error)

    def describe(self) -> str:
        c = self.config
        return f"{c['model']} ({c.get('checkpoint') or 'registry download'}, device {c.get('device')})"

    # -- blocking helpers (scripts and tests; never from a GUI's main thread) -------------------
    def wait(self, request: Request, timeout: float | None = None) -> Request:
        """Pump until `request` is done (raises TimeoutError after `timeout` seconds)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.done:
            if self.poll(0.05) == 0:
                time.sleep(0.005)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not answer {request.op} within {timeout:g} s")
        return request

    def wait_ready(self, timeout: float | None = None) -> dict:
        """Start the child if needed and wait until the model is loaded; returns its info."""
        self._ensure_started()
        start = next((r for r in self._requests.values() if r.op == "start"), None)
        if start is not None:
            self.wait(start, timeout)
            start.result()
        if self.state != "ready":
            raise EngineStopped(self.stopped_reason or f"the MedSAM2 engine is {self.state}")
        return self.info


class RemoteEngine(LocalEngine):
    """The engine on a `medsam2 serve` server: the child runs only the client (no torch needed)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, allow_random_weights: bool = False,
                 python: str | None = None):
        super().__init__(allow_random_weights=allow_random_weights, python=python)
        self.config = {"mode": "remote", "url": url, "token": token or None, "timeout": float(timeout)}

    def describe(self) -> str:
        return f"the server at {self.config['url']}"


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


def _decode(op: str, value, payload: bytes):
    """A reply's value as the in-process engine gives it (masks unpacked, arrays rebuilt)."""
    if op == "add_prompt":
        return unpack_mask(payload, value["shape"])
    if op == "masks":
        return channel.array_from(value["array"], payload).copy()
    return value


def _error_from(header: dict, checkpoint_way: str | None = None) -> Exception:
    """The child's error as the exception a local call would have raised. A missing checkpoint
    names the application's own way to give a file (`checkpoint_way`), not the Python argument."""
    kind, message = header.get("kind", ""), header.get("message", "engine error")
    if "template" in header:
        from medsam2.models.checkpoints import CheckpointUnavailable

        error = CheckpointUnavailable(header["template"], header.get("model"))
        return CheckpointError(error.text(checkpoint_way)) if checkpoint_way else error
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, errors.MedSAM2Error):
        return cls(message)
    if kind == "ValueError":
        return ValueError(message)
    return RuntimeError(f"MedSAM2 engine error ({kind}): {message}")
