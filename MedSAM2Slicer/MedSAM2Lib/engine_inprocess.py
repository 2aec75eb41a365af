"""A model loaded in this process, behind the engine interface (engine_api.Engine).

For scripts, tests and the Python console: `SegmentationSession(..., medsam2.load_model(...))`
or `(..., medsam2.connect(url))` wraps the model in an InProcessEngine. Requests run at the call
(the caller's thread computes), except a propagation, which advances one frame per `poll()` so
a caller can write and show frames as they come. Not for a GUI's main thread: use LocalEngine.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from medsam2.prompt import Prompt, hold_prompts

from .engine_api import Request

log = logging.getLogger("MedSAM2")


class InProcessEngine:
    computes_in_call = True  # requests run when made: a session must not start jobs at submission
    state = "ready"
    generation = 1
    restarts = 0
    stopped_reason = ""
    status = ""
    download = None

    def __init__(self, model):
        self.model = model
        self._streams: list = []  # (request, generator) of running propagations
        self._sessions: list = []
        self._idle: dict = {}  # session handle -> the frame to prepare when nothing else runs

    def start(self) -> None:
        """The model is loaded already."""

    @property
    def info(self) -> dict:
        return {"model": self.model.name, "device": str(self.model.device), "image_size": self.model.image_size,
                "weights_are_random": bool(self.model.weights_are_random)}

    def open(self, frames, memory="self-sorting", window=None, image_set=False) -> "InProcessSession":
        handle = InProcessSession(self)

        def opening():
            if image_set:
                return self.model.open_images(list(np.asarray(frames)), memory=memory, window=window)
            return self.model.open(frames, memory=memory, window=window)

        handle.opened = _run("open", opening)
        handle.session = handle.opened.value
        self._sessions.append(handle)
        return handle

    def poll(self, budget_s: float = 0.01) -> int:
        """Advance each running propagation by one frame."""
        delivered = 0
        for request, frames in list(self._streams):
            try:
                item = next(frames)
            except StopIteration:
                report = getattr(getattr(request, "session", None), "last_propagation", None)
                request.finish({"cancelled": request.cancel_requested,
                                **({} if report is None else {"report": report.as_dict()})},
                               cancelled=request.cancel_requested)
            except BaseException as exc:  # the error belongs to the request
                request.finish(error=exc)
            else:
                request.items.append((_frame_of(item[0]), {int(o): np.asarray(m, dtype=bool) for o, m in item[1].items()}))
                delivered += 1
                continue
            self._streams.remove((request, frames))
        if not self._streams and self._idle:  # idle time: prepare one viewed slice
            handle, frame = self._idle.popitem()
            if handle.session is not None:
                try:
                    handle.session.prepare(frame)
                except Exception:  # an optimisation: a failure must not break the caller's poll
                    log.exception("preparing slice %s failed", frame)
        return delivered

    def wait(self, request: Request, timeout: float | None = None) -> Request:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not request.done:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{request.op} did not finish within {timeout:g} s")
        return request

    def _stream(self, request: Request, frames) -> Request:
        self._streams.append((request, frames))
        return request

    def close_sessions(self) -> None:
        """Stop running propagations and close every session; the model stays loaded."""
        for request, frames in self._streams:
            frames.close()
            request.finish({"cancelled": True}, cancelled=True)
        self._streams.clear()
        sessions, self._sessions = self._sessions, []
        for handle in sessions:
            handle.close()

    def close(self) -> None:
        """The model belongs to the caller: only the sessions close."""
        self.close_sessions()


class InProcessSession:
    """An engine session of the in-process model (see engine_api.py for the interface)."""

    def __init__(self, engine: InProcessEngine):
        self.engine = engine
        self.session = None
        self.opened: Request | None = None
        self.alive = True

    def _call(self, op, fn) -> Request:
        if self.session is None:
            return _failed(op, self.opened.error)
        return _run(op, fn)

    @property
    def num_frames(self):
        return self.session.num_frames

    def add_prompt(self, prompt: Prompt) -> Request:
        return self._call("add_prompt", lambda: np.asarray(self.session.add_prompt(**prompt.arguments()), dtype=bool))

    def set_prompts(self, frame: int, obj_id: int, prompts: list[Prompt]) -> Request:
        return self._call("set_prompts", lambda: hold_prompts(self.session, frame, obj_id, prompts) or {})

    def propagate(self, direction="both", start=None, stop=None, axes=None, until=None) -> Request:
        if self.session is None:
            return _failed("propagate", self.opened.error)
        cancel = threading.Event()
        request = Request("propagate", stream=True, on_cancel=lambda r: cancel.set())
        kwargs = {"axes": axes} if axes not in (None, "one") else {}
        if until is not None:
            kwargs["until"] = until
        try:  # arguments are checked at the call, as the engine does
            frames = iter(self.session.propagate(direction=direction, start=start, stop=stop, cancel=cancel, **kwargs))
        except BaseException as exc:
            request.finish(error=exc)
            return request
        request.session = self.session  # its last_propagation is the stream's report
        return self.engine._stream(request, frames)

    def prepare(self, frame: int, now: bool = False) -> Request:
        """now: prepare in the call; else at a later poll() with no propagation running (as this
        engine computes everything: in the caller's thread, one step per poll)."""
        if not now and self.session is not None:
            self.engine._idle[self] = int(frame)
        return self._call("prepare", lambda: (self.session.prepare(frame) if now else None) or {"prepared": now})

    def masks(self, obj_id=None) -> Request:
        return self._call("masks", lambda: self.session.masks() if obj_id is None else self.session.mask(obj_id))

    def review(self, obj_id=None) -> Request:
        return self._call("review", lambda: self.session.review(obj_id))

    def close(self) -> None:
        self.alive = False
        self.engine._idle.pop(self, None)
        session, self.session = self.session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # best effort (e.g. a remote server that is gone)
                pass


def _frame_of(item) -> int:
    """A propagation item's frame index (a fused run's progress items carry it as `.frame`)."""
    return int(getattr(item, "frame", item))


def _run(op, fn) -> Request:
    request = Request(op)
    try:
        request.finish(fn())
    except BaseException as exc:  # the error belongs to the request, as an engine process's would
        request.finish(error=exc)
    return request


def _failed(op, error) -> Request:
    request = Request(op)
    request.finish(error=error)
    return request
