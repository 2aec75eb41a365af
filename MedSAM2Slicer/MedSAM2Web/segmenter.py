"""The web shell's one door to MedSAM2Lib: every prompt, propagation, undo and the engine go
through `Segmenter`, and nothing else in MedSAM2Web imports MedSAM2Lib's session or the model.

Its surface follows the module controller MedSAM2Lib is getting (`ModuleController`: select,
place_point, place_box, propagate, refine, undo, redo, cancel, poll, busy, progress, can_undo,
can_redo, close_sessions, shutdown), so the shell keeps its calls when this class becomes a thin
wrapper around that controller and its engine process.

Until then it drives today's `SegmentationSession` through its prepare / compute / commit steps:
actions queue up, and each `poll()` (the page's 40 ms timer) advances the running action by one
engine step - one prompt, or one propagated slice - in this process. So the event loop is held
for one slice at a time (a fraction of a second at 256 px on a CPU), the page keeps its progress
bar and Cancel, and no thread is involved. Undo and redo are instant and run at once.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Callable

from medsam2.errors import InputError, MedSAM2Error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    model: str
    checkpoint: str | None = None
    device: str = "auto"
    image_size: int | None = None
    server_url: str | None = None   # set: the engine runs on a `medsam2 serve` there
    token: str | None = None        # that server's token
    memory: str = "self-sorting"

    def describe(self) -> str:
        where = f"server {self.server_url}" if self.server_url else (self.checkpoint or "registry download")
        return f"{self.model} ({where})"


@dataclass(frozen=True)
class Progress:
    text: str
    value: int
    maximum: int


class Segmenter:
    """Prompts and propagation on the selected segment; one engine session set per segment."""

    def __init__(self, settings: EngineSettings, on_error: Callable[[str], None] | None = None,
                 on_message: Callable[[str], None] | None = None):
        self.settings = settings
        self._on_error = on_error or (lambda text: log.error(text))
        self._on_message = on_message or (lambda text: None)
        self._model = None
        self._selection = (None, None, None)
        self._sessions = {}        # segment ID -> SegmentationSession
        self._queue = deque()      # actions not started yet (generators)
        self._task = None          # the running action
        self._cancel = None        # its threading.Event, for a propagation
        self._progress = None
        self.last_prompt = None    # the latest prompt handed to the engine, in voxel indices
        self.prompt_count = 0      # prompts the engine has taken so far (numbers last_prompt)

    # --- the engine ------------------------------------------------------------------------
    def start(self) -> None:
        """Load the model (or connect to the server) now, so a bad setting fails at startup."""
        import medsam2

        s = self.settings
        if s.server_url:
            self._model = medsam2.connect(s.server_url, s.token)
            self._model.refresh_info()  # fail now if the server is unreachable or refuses the token
            return
        with warnings.catch_warnings():  # the random-weights warning: the command line shows a banner
            warnings.simplefilter("ignore")
            self._model = medsam2.load_model(s.model, checkpoint=s.checkpoint, device=s.device,
                                             image_size=s.image_size)

    @property
    def weights_are_random(self) -> bool:
        return bool(getattr(self._model, "weights_are_random", False))

    @property
    def image_size(self) -> int | None:
        return getattr(self._model, "image_size", None)

    # --- what the shell reads --------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._task is not None or bool(self._queue)

    @property
    def progress(self) -> Progress | None:
        return self._progress if self.busy else None

    @property
    def can_undo(self) -> bool:
        session = self._current_session(create=False)
        return bool(session and session.can_undo) and not self.busy

    @property
    def can_redo(self) -> bool:
        session = self._current_session(create=False)
        return bool(session and session.can_redo) and not self.busy

    # --- selection -------------------------------------------------------------------------
    def select(self, volume_node, segmentation_node, segment_id: str | None) -> None:
        if (volume_node, segmentation_node) != self._selection[:2]:
            self.close_sessions()
        self._selection = (volume_node, segmentation_node, segment_id)

    def forget_segment(self, segment_id: str) -> None:
        """The segment is gone from the scene: drop its engine sessions and undo history."""
        session = self._sessions.pop(segment_id, None)
        if session is not None:
            session.close()

    def _current_session(self, create=True, target=None):
        """The session of `target` (volume, segmentation, segment ID), by default the selection."""
        volume_node, segmentation_node, segment_id = target or self._selection
        session = self._sessions.get(segment_id)
        if session is None and create:
            from MedSAM2Lib import SegmentationSession

            if self._model is None:
                raise InputError("The model is not loaded yet.")
            session = SegmentationSession(volume_node, segmentation_node, segment_id, self._model,
                                          memory=self.settings.memory)
            self._sessions[segment_id] = session
        return session

    # --- actions (queued; poll() runs them) -------------------------------------------------
    # Each action is bound to the segment selected when it is asked for, not when it starts.
    def place_point(self, ras, slice_normal, include: bool = True) -> None:
        kind = "include point" if include else "exclude point"
        self._queue.append(self._prompt(kind, self._selection, lambda s: s.prepare_point(ras, include, slice_normal)))

    def place_box(self, ras_a, ras_b, slice_normal) -> None:
        self._queue.append(self._prompt("box", self._selection, lambda s: s.prepare_box(ras_a, ras_b, slice_normal)))

    def propagate(self, direction: str = "both", slice_range=None, slice_normal=None) -> None:
        self._queue.append(self._propagation(self._selection, direction, None, slice_range, slice_normal))

    def refine(self, ras, slice_normal, slice_range=None) -> None:
        """Propagate both ways from the slice through `ras` (after correcting it with prompts)."""
        self._queue.append(self._propagation(self._selection, "both", ras, slice_range, slice_normal))

    def undo(self) -> bool:
        return self._undo_redo("undo")

    def redo(self) -> bool:
        return self._undo_redo("redo")

    def _undo_redo(self, which) -> bool:
        if self.busy:
            self._on_message(f"Wait for the running action (or cancel it) before {which}.")
            return False
        session = self._current_session(create=False)
        if session is None:
            return False
        try:
            return getattr(session, which)() is not None
        except MedSAM2Error as exc:
            self._on_error(str(exc))
            return False

    def cancel(self) -> None:
        """Stop the running propagation after its current slice (finished slices stay) and drop
        the actions still queued."""
        self._queue.clear()
        if self._cancel is not None:
            self._cancel.set()

    def frame_index(self, ras, slice_normal) -> int | None:
        """The slice number through `ras` along the selected segment's view axis, if known."""
        session = self._current_session(create=False)
        try:
            return session.frame_index(ras, slice_normal) if session else None
        except MedSAM2Error:
            return None

    # --- the timer tick ---------------------------------------------------------------------
    def poll(self) -> bool:
        """Advance the running action by one engine step; True when anything happened."""
        if self._task is None:
            if not self._queue:
                return False
            self._task = self._queue.popleft()
        try:
            next(self._task)
        except StopIteration:
            self._finish()
        except MedSAM2Error as exc:
            self._finish()
            self._on_error(str(exc))
        except Exception as exc:  # report, keep serving the page
            log.exception("MedSAM2 action failed")
            self._finish()
            self._on_error(f"Unexpected error: {exc}")
        return True

    def _finish(self):
        self._task, self._cancel = None, None
        if not self._queue:
            self._progress = None

    def _prompt(self, kind, target, prepare):
        session = self._current_session(target=target)
        job = prepare(session)
        self._progress = Progress(f"{kind}: segmenting the slice", 0, 1)
        yield
        try:
            job.compute()
        finally:
            action = job.commit()  # also forgets the prompt after an engine error
        if action is not None:
            self.prompt_count += 1
            self.last_prompt = {"number": self.prompt_count, "segment": target[2],
                                **self._describe_prompt(session, action, kind)}

    def _propagation(self, target, direction, start_ras, slice_range, slice_normal):
        session = self._current_session(target=target)
        start = session.frame_index(start_ras, slice_normal) if start_ras is not None else None
        job = session.prepare_propagation(direction, start, slice_range, slice_normal)
        what = "refining" if start is not None else f"propagating ({direction})"
        self._progress = Progress(what, 0, job.total)
        self._cancel = cancel = threading.Event()
        yield
        frames = job.frames(cancel)
        try:
            for frame, mask in frames:
                job.apply({frame: mask})
                self._progress = Progress(what, job.done, job.total)
                yield
        finally:
            frames.close()
            job.commit()  # one undo step, also after a cancel
        if cancel.is_set():
            self._on_message(f"Cancelled after {job.done} of {job.total} slices; those stay (undo removes them).")

    def _describe_prompt(self, session, action, kind):
        """What the engine was given, back in voxel (IJK) indices: for the status endpoint."""
        prompt, layout = action.prompt, session.geometry.layout(action.axis)

        def ijk(x, y):
            return [float(v) for v in layout.frame_to_ijk(prompt.frame, x, y)]

        out = {"kind": kind, "axis": int(action.axis), "frame": int(prompt.frame),
               "changed_frames": [int(f) for f in action.frames]}
        if prompt.points is not None:
            out["points"] = [{"ijk": ijk(x, y), "label": int(label)}
                             for (x, y), label in zip(prompt.points, prompt.labels)]
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            out["box"] = [ijk(x0, y0), ijk(x1, y1)]
        return out

    # --- teardown ---------------------------------------------------------------------------
    def close_sessions(self) -> None:
        """Cancel what runs, then free every segment's engine sessions and undo history."""
        self.cancel()
        if self._task is not None:
            self._task.close()  # runs its finally: the finished part stays, as one undo step
            self._finish()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def shutdown(self) -> None:
        self.close_sessions()
        model, self._model = self._model, None
        if model is not None and hasattr(model, "close"):
            model.close()
