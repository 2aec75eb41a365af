"""What the module logic asks of an engine (`Engine`, `EngineSession`), and the `Request` it gets back.

Two engines implement it in full: `ChildEngine` (engine_process.py: the engine in a child process,
the model loaded there or a remote server's client; for an application's main thread) and
`InProcessEngine` (engine_inprocess.py: a model already loaded in this process, for scripts, tests
and the Python console). Every call returns at once with a Request; `poll()` delivers replies.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from medsam2.prompt import Prompt

DONE, FAILED, CANCELLED = "done", "failed", "cancelled"  # how a request ended


class Request:
    """One request to an engine. `done` turns True when its reply (or error) has arrived; a
    propagation is a stream whose finished frames collect in `items` as (frame, {obj_id: mask}).
    `outcome` says how it ended: DONE, FAILED (`error` says why) or CANCELLED (stopped because
    `cancel()` asked; what it delivered before stays valid)."""

    def __init__(self, op: str, stream: bool = False, on_cancel: Callable[["Request"], None] | None = None):
        self.op, self.stream = op, stream
        self.done = False
        self.error: BaseException | None = None
        self.value = None
        self.outcome: str | None = None
        self.items: deque = deque()
        self._on_cancel = on_cancel
        self.cancel_requested = False

    def cancel(self) -> None:
        """Ask the engine to stop this request (a propagation stops within one frame)."""
        if not self.done and not self.cancel_requested:
            self.cancel_requested = True
            if self._on_cancel is not None:
                self._on_cancel(self)

    def finish(self, value=None, error: BaseException | None = None, cancelled: bool = False) -> None:
        self.done, self.value, self.error = True, value, (None if cancelled else error)
        self.outcome = CANCELLED if cancelled else FAILED if error is not None else DONE

    def result(self):
        """The value once done; raises the request's error."""
        if self.error is not None:
            raise self.error
        return self.value


@runtime_checkable
class EngineSession(Protocol):
    """One engine session: one volume (or image set) along one axis."""

    opened: Request          # the open's request (its error is the root cause of later failures)
    num_frames: int

    @property
    def alive(self) -> bool:
        """False once the engine that holds it has stopped (its prompts must be replayed elsewhere)."""

    def add_prompt(self, prompt: Prompt) -> Request:
        """value: the prompted frame's mask (bool (rows, cols), or a PackedMask to unpack where used)."""

    def set_prompts(self, frame: int, obj_id: int, prompts: list[Prompt]) -> Request:
        """Make the engine hold exactly these prompts there (replay after undo/redo or a restart)."""

    def propagate(self, direction: str = "both", start: int | None = None, stop=None, axes: str | None = None,
                  until: str | None = None) -> Request:
        """A stream: items (frame, {obj_id: mask}) as frames finish; value {"frames", "cancelled",
        "report"} (report: where and why each direction stopped, PropagationReport.as_dict())."""

    def prepare(self, frame: int, now: bool = False) -> Request:
        """Make a click on `frame` cheap (Session.prepare). now=False: in the engine's idle time,
        yielding to every request (the request is answered at once); now=True: answered when done."""

    def masks(self, obj_id: int | None = None) -> Request:
        """value: the engine's masks volume (one object's bool, or the uint16 label volume)."""

    def review(self, obj_id: int | None = None) -> Request:
        """value: the engine's review records (medsam2 Session.review: one dict per frame and object)."""

    def close(self) -> None:
        """Free the session in the engine (returns at once)."""


@runtime_checkable
class Engine(Protocol):
    """An engine: opens sessions, delivers replies in poll(), never blocks but in wait()."""

    state: str            # stopped | starting | ready | failed | closed
    generation: int       # +1 at every start of the engine (sessions of an older one are dead)
    restarts: int         # starts after an unexpected stop
    stopped_reason: str   # why the engine last stopped unexpectedly ("" if it did not)
    status: str           # what it is doing while starting ("Loading the model")
    download: tuple | None  # (done, total) bytes while a checkpoint downloads
    computes_in_call: bool  # True: requests run when made (a session starts its jobs at poll())
    info: dict            # what the engine reported when ready (model, device, image_size, ...)

    def start(self) -> None:
        """Start now rather than at the first request (returns at once)."""

    def open(self, frames: np.ndarray, memory: str = "self-sorting", window=None, image_set: bool = False
             ) -> EngineSession: ...

    def poll(self, budget_s: float = 0.01) -> int:
        """Deliver what has arrived within about budget_s; returns how many messages."""

    def wait(self, request: Request, timeout: float | None = None) -> Request:
        """Block until the request is done (scripts and tests; never from a GUI's main thread)."""

    def close_sessions(self) -> None:
        """Close every session and free what they hold; the model stays loaded."""

    def close(self) -> None:
        """Stop the engine (an engine process exits and frees its memory)."""
