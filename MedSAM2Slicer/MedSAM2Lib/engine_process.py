"""The engine in a child process, driven from the application's main thread without ever blocking it.

Inside 3D Slicer the main thread keeps Python's GIL while Qt idles, so a Python worker thread in
Slicer's process runs only while the main thread happens to run Python: engine work on such a
thread crawls. So the engine runs in a child process (`python -m medsam2.remote.agent`), which
holds either the model itself (`LocalTarget`: loaded there) or a remote server's client
(`RemoteTarget`), and calls its sessions directly. This side sends requests and reads replies
over one loopback socket (child_process.py); `poll()`, called by a timer on the main thread,
moves a bounded amount of bytes and returns.

    engine = LocalEngine(model="sam2.1_hiera_tiny", checkpoint=path, device="cpu", image_size=256)
    handle = engine.open(frames, memory="sam2")          # queued; the child starts on first use
    request = handle.add_prompt(Prompt.make(5, points=[[30, 40]], labels=[1]))
    while not request.done: engine.poll()                 # e.g. from a QTimer
    engine.close()                                        # the child exits (GPU memory freed)

A child that dies (crash, SIGKILL, out of memory) fails its outstanding requests with
EngineStopped; the next request starts a new child (`restarts` counts them), and sessions opened
on the old one report `alive == False` so their owners re-open them and replay their prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import numpy as np

from medsam2 import errors
from medsam2.errors import CheckpointError
from medsam2.masks import PackedMask
from medsam2.options import DEFAULT_MODEL
from medsam2.prompt import Prompt
from medsam2.remote import channel

from .child_process import ChildGone, ChildProcess, FramePayload, default_python
from .engine_api import Request

log = logging.getLogger("MedSAM2.engine")


class EngineStopped(errors.ServerError):
    """The engine process stopped (crashed, was killed, or was closed) before answering."""


@dataclass(frozen=True)
class LocalTarget:
    """The model loaded in the child, on this machine (as `medsam2.load_model` takes it)."""

    model: str = DEFAULT_MODEL
    checkpoint: str | None = None   # None: the registry's verified, cached download (with progress)
    device: str = "auto"
    image_size: int | None = None
    precision: str = "auto"

    def config(self) -> dict:
        return {"mode": "local", **asdict(self)}

    def describe(self) -> str:
        return f"{self.model} ({self.checkpoint or 'registry download'}, device {self.device})"


@dataclass(frozen=True)
class RemoteTarget:
    """A `medsam2 serve` server; the child runs only its client (no torch needed)."""

    url: str
    token: str | None = None
    timeout: float = 300.0

    def config(self) -> dict:
        return {"mode": "remote", **asdict(self)}

    def describe(self) -> str:
        return f"the server at {self.url}"


class ChildSession:
    """An engine session (one volume along one axis) in the child; its methods return Requests."""

    def __init__(self, engine: "ChildEngine", handle: int, num_frames: int, frame_shape: tuple):
        self.engine, self.handle = engine, handle
        self.generation = engine.generation
        self.num_frames, self.frame_shape = num_frames, tuple(frame_shape)
        self.opened: Request | None = None

    @property
    def alive(self) -> bool:
        return self.generation == self.engine.generation and self.engine.state in ("starting", "ready")

    def _request(self, op, fields, payload=b"", stream=False) -> Request:
        return self.engine.request(op, {"handle": self.handle, **fields}, payload, stream)

    def add_prompt(self, prompt: Prompt) -> Request:
        return self._request("add_prompt", {"prompt": prompt.to_json()})

    def set_prompts(self, frame: int, obj_id: int, prompts: list[Prompt]) -> Request:
        return self._request("set_prompts", {"frame": int(frame), "obj_id": int(obj_id),
                                             "prompts": [p.to_json() for p in prompts]})

    def propagate(self, direction="both", start=None, stop=None, axes=None, until=None) -> Request:
        stop = list(stop) if isinstance(stop, (tuple, list)) else stop
        return self._request("propagate", {"direction": direction, "start": start, "stop": stop, "axes": axes,
                                           "until": until}, stream=True)

    def prepare(self, frame: int, now: bool = False) -> Request:
        return self._request("prepare", {"frame": int(frame), "now": bool(now)})

    def masks(self, obj_id=None) -> Request:
        return self._request("masks", {"obj_id": obj_id})

    def review(self, obj_id=None) -> Request:
        return self._request("review", {"obj_id": obj_id})

    def close(self) -> None:
        if self.alive:
            self._request("close", {})


class ChildEngine:
    """The engine in a child process, for a local model or a remote server (its `target`).

    allow_random_weights: accept a checkpoint made by `medsam2.testing.write_random_checkpoint`
    (tests only: its masks are meaningless). python: the interpreter for the child (default: this
    one, or Slicer's PythonSlicer). checkpoint_way: how a user of this application gives a local
    checkpoint file, named when the download fails.
    """

    computes_in_call = False

    def __init__(self, target: LocalTarget | RemoteTarget, allow_random_weights: bool = False,
                 python: str | None = None, checkpoint_way: str | None = None):
        self.target = target
        self.allow_random_weights = bool(allow_random_weights)
        self.checkpoint_way = checkpoint_way
        self.python = python or default_python()
        self.state = "stopped"   # stopped | starting | ready | failed | closed
        self.generation = 0      # +1 at every start of a child
        self.restarts = 0        # children started after one stopped unexpectedly
        self.info: dict = {}     # what the child reported when ready (model, device, size, pid...)
        self.status = ""         # what the child is doing while starting ("Loading the model")
        self.download = None     # (done, total) bytes while the checkpoint downloads
        self.stopped_reason = ""  # why the last child stopped unexpectedly ("" if it did not)
        self._child: ChildProcess | None = None
        self._ids = 0
        self._handles = 0
        self._requests: dict = {}        # id -> Request awaiting its reply

    @property
    def config(self) -> dict:
        return self.target.config()

    def describe(self) -> str:
        return self.target.describe()

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.running

    def start(self) -> None:
        """Start the child if none is running (returns at once; it says hello within seconds)."""
        if self.state == "closed":
            raise EngineStopped("this MedSAM2 engine was closed; create a new one")
        if self.state in ("starting", "ready") and self.running:
            return
        crashed = self.state == "failed" or self._child is not None
        self._stop_child()
        self.generation += 1
        self.restarts += int(crashed and bool(self.stopped_reason))
        self._child = ChildProcess(self.python)
        self.state, self.status, self.download, self.info = "starting", "Starting the engine", None, {}
        self.request("start", {"config": self.target.config()})
        log.info("MedSAM2 engine process %s started (%s)", self._child.pid, self.python)

    def stop(self) -> None:
        """Stop the child (frees its memory, GPU included); the next request starts a new one."""
        if self.state == "closed":
            return
        self._fail_all(EngineStopped("the MedSAM2 engine was stopped"))
        self._stop_child(timeout=5.0)
        self.state, self.stopped_reason = "stopped", ""

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child and wait for it to exit (killed after `timeout`); requests in flight fail."""
        if self.state == "closed":
            return
        self._fail_all(EngineStopped("the MedSAM2 engine was closed"))
        self._stop_child(timeout)
        self.state = "closed"

    def close_sessions(self) -> None:
        """Close every session in the child and free what they held; the model stays loaded."""
        if self.running:
            self.request("close_all", {})

    def _stop_child(self, timeout: float = 2.0) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)

    def _child_stopped(self, reason: str) -> None:
        """The child went away by itself: fail what it owed, and say why (with its last words)."""
        code = self._child.proc.poll() if self._child is not None else None
        tail = self._child.last_words() if self._child is not None else ""
        what = f"exit code {code}" if code is not None else reason
        self.stopped_reason = f"The MedSAM2 engine process stopped unexpectedly ({what})."
        log.error("%s%s", self.stopped_reason, f"\n{tail}" if tail else "")
        self._fail_all(EngineStopped(self.stopped_reason + " Your next action restarts it."))
        self.state = "failed"
        self._stop_child(timeout=0.5)

    # -- requests ------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        """A stopped or failed engine starts a child; a closed one refuses (start() raises)."""
        if self.state in ("stopped", "failed", "closed"):
            self.start()

    def request(self, op: str, fields: dict, payload=b"", stream: bool = False) -> Request:
        """Send one request to the child (starting it if needed); returns at once."""
        if op != "start":
            self._ensure_started()
        request = Request(op, stream, on_cancel=self._cancel)
        self._ids += 1
        request.id = self._ids
        self._requests[request.id] = request
        self._child.send({"id": request.id, "op": op, **fields}, payload)
        return request

    def _cancel(self, request: Request) -> None:
        if request.id in self._requests and self._child is not None:
            self._child.send({"op": "cancel", "target": request.id})
            self._child.flush()  # leaves now: the engine stops within the slice it is on

    def open(self, frames: np.ndarray, memory: str = "self-sorting", window=None, image_set: bool = False
             ) -> ChildSession:
        """Open an engine session on `frames` (slices, rows, cols); returns at once. Requests on the
        session may be made right away: the child runs them in order after the open."""
        self._ensure_started()
        self._handles += 1
        frames = np.asarray(frames)
        handle = ChildSession(self, self._handles, frames.shape[0], frames.shape[1:])
        header = {"handle": handle.handle, "memory": memory, "image_set": bool(image_set),
                  "window": None if window is None else [float(window[0]), float(window[1])],
                  "array": {"dtype": frames.dtype.str, "shape": list(frames.shape)}}
        handle.opened = self.request("open", header, FramePayload(frames))
        return handle

    # -- the main-thread pump ------------------------------------------------------------------
    def poll(self, budget_s: float = 0.01) -> int:
        """Move bytes both ways and deliver replies, within about `budget_s`; never blocks.
        Returns how many messages were delivered."""
        child = self._child
        if child is None or self.state == "closed":
            return 0
        deadline = time.monotonic() + budget_s
        try:
            if not child.pump():
                return 0
        except ChildGone as exc:
            self._child_stopped(str(exc))
            return 0
        delivered = 0
        while time.monotonic() < deadline or delivered == 0:
            message = child.reader.pop()
            if message is None:
                break
            self._deliver(*message)
            delivered += 1
        if self._child is child and child.exited():
            self._child_stopped("it exited")
        return delivered

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
            value = _decode(request.op, header.get("value"), payload)
            request.finish(value, cancelled=bool(isinstance(value, dict) and value.get("cancelled")))
            if request.op == "start":
                self._ready(request)
        else:
            error = _error_from(header, self.checkpoint_way)
            request.finish(error=error, cancelled=bool(header.get("cancelled")))
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
            self._stop_child()
            request.error, request.outcome = error, "failed"
            return
        self.state = "ready"

    def _fail_all(self, error: Exception) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            if not request.done:
                request.finish(error=error)

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


class LocalEngine(ChildEngine):
    """The engine in a child process on this machine: the model loads there, and runs there.

    model, checkpoint, device, image_size, precision: as `medsam2.load_model` (checkpoint None = the
    registry's verified, cached download, with progress). Other arguments: ChildEngine's.
    """

    def __init__(self, model: str = DEFAULT_MODEL, checkpoint: str | None = None, device: str = "auto",
                 image_size: int | None = None, precision: str = "auto", allow_random_weights: bool = False,
                 python: str | None = None, checkpoint_way: str | None = None):
        target = LocalTarget(model, str(checkpoint) if checkpoint else None, device, image_size or None, precision)
        super().__init__(target, allow_random_weights, python, checkpoint_way)


class RemoteEngine(ChildEngine):
    """The engine on a `medsam2 serve` server: the child runs only the client (no torch needed)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, allow_random_weights: bool = False,
                 python: str | None = None):
        super().__init__(RemoteTarget(url, token or None, float(timeout)), allow_random_weights, python)


def _decode(op: str, value, payload: bytes):
    """A reply's value as the in-process engine gives it (a mask stays packed until used)."""
    if op == "add_prompt":
        return PackedMask(value["shape"], payload)
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
    if header.get("cancelled"):
        return errors.Cancelled(message)
    if kind == "ValueError":
        return ValueError(message)
    return RuntimeError(f"MedSAM2 engine error ({kind}): {message}")
