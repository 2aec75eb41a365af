"""The web shell's one door to MedSAM2Lib's module logic: a thin wrapper around `ModuleController`.

The controller is the one the Slicer module uses: the engine in a child process (the project's
server on loopback, or a remote `medsam2 serve` through --server), jobs queued per segment, and a
`poll()` that applies what the engine has finished within a few milliseconds and never waits. So
the trame server's event loop never computes: its 40 ms task calls `poll()`, as the module's timer
does. This wrapper adds what only the page needs: texts instead of exceptions, and the last
prompt the engine received, in voxel indices, for the status endpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from medsam2.errors import MedSAM2Error
from medsam2.options import MEMORY_MODES
from MedSAM2Lib.models import ModelSettings  # the module's settings type, the page's too

log = logging.getLogger(__name__)
__all__ = ["ModelSettings", "Segmenter", "duration_text"]


class Segmenter:
    """Prompts and propagation on the selected segment, through the module's controller."""

    def __init__(self, settings: ModelSettings, memory: str = MEMORY_MODES[0],
                 on_error: Callable[[str], None] | None = None, on_message: Callable[[str], None] | None = None):
        """settings: the Slicer module's own model settings (the command line asked for this model,
        so a random-weight file gets a banner there: allow_random is the caller's to set)."""
        self.settings = settings
        self.memory = memory
        self._on_error = on_error or (lambda text: log.error(text))
        self._on_message = on_message or (lambda text: None)
        self._engine = None
        self._controller = None
        self.last_prompt = None    # the latest prompt handed to the engine, in voxel indices
        self.prompt_count = 0      # prompts the engine has taken so far (numbers last_prompt)
        self._propagation_asked = None  # monotonic time of the latest propagate/refine, for its report
        self.review_view = None    # the slice node "Next uncertain slice" reads and moves (the Red view)
        from medsam2.tracking.review import FlagRule

        self._review_rule = FlagRule()  # kept for the controller of the next scene too

    # --- the engine ------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> None:
        """Start the engine process and wait until the model is loaded (or the server answers),
        so that a bad setting fails before the page is served."""
        from MedSAM2Lib.engine_process import EngineStopped

        self._engine = self.settings.create_engine()
        try:
            self._engine.wait_ready(timeout=timeout)
        except (MedSAM2Error, TimeoutError, EngineStopped):
            self._engine.close()
            raise

    @property
    def weights_are_random(self) -> bool:
        return bool(self._engine is not None and self._engine.info.get("weights_are_random"))

    @property
    def image_size(self) -> int | None:
        return self._engine.info.get("image_size") if self._engine is not None else None

    def _controller_for(self, scene):
        """The controller on this scene (a new scene, e.g. another volume opened, gets a new one)."""
        from MedSAM2Lib.controller import ModuleController
        from MedSAM2Lib.messages import describe_error

        if self._controller is not None and self._controller.scene is scene:
            return self._controller
        if self._controller is not None:
            self._controller.shutdown()  # not the engine: it is ours, and serves the new scene too
        self._controller = ModuleController(scene, on_error=lambda exc: self._on_error(describe_error(exc)[1]),
                                            on_message=self._on_message, on_finished=self._finished)
        self._controller.set_options(memory=self.memory)
        self._controller.attach_view(self.review_view)
        self._controller.review_rule = self._review_rule
        self._controller.use_engine(self._engine)
        return self._controller

    # --- what the shell reads --------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._controller and self._controller.busy)

    @property
    def progress(self):
        return self._controller.progress if self._controller else None

    @property
    def can_undo(self) -> bool:
        return bool(self._controller and self._controller.can_undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._controller and self._controller.can_redo)

    # --- selection -------------------------------------------------------------------------
    def select(self, volume_node, segmentation_node, segment_id: str | None) -> None:
        scene = (volume_node or segmentation_node).GetScene() if (volume_node or segmentation_node) else None
        if scene is not None:
            self._controller_for(scene).select(volume_node, segmentation_node, segment_id or "")
        elif self._controller is not None:
            self._controller.select(None, None, "")

    def forget_segment(self, segment_id: str) -> None:
        """The segment is gone from the scene: drop its engine sessions and undo history."""
        if self._controller is not None:
            self._controller.close_segment(segment_id)

    # --- actions (each is bound to the segment selected when it is asked for) ---------------
    def place_point(self, ras, slice_normal, include: bool = True) -> None:
        """The prompt, and its marker in the views where it was placed (undo hides it, redo shows it:
        the controller's PromptMarkers, as in the Slicer module)."""
        marker = None
        if self._controller is not None:
            from MedSAM2Lib.markers import Marker

            marker = Marker.for_point(*self._controller.prompt_nodes.point(ras, include))
        self._call("place_point", ras, slice_normal, include, marker=marker)

    def place_box(self, ras_a, ras_b, slice_normal) -> None:
        self._call("place_box", ras_a, ras_b, slice_normal, show=True)

    def propagate(self, direction: str = "both", slice_range=None, slice_normal=None) -> None:
        self._propagation_asked = time.monotonic()
        self._call("propagate", direction, slice_range, slice_normal)

    def refine(self, ras, slice_normal, slice_range=None) -> None:
        """Propagate both ways from the slice through `ras` (after correcting it with prompts)."""
        self._propagation_asked = time.monotonic()
        self._call("refine", ras, slice_normal, slice_range)

    def viewing(self, ras, slice_normal, view: str) -> None:
        """A slice view moved to the slice through `ras`: the engine prepares a click there when idle."""
        if self._controller is not None:
            self._controller.viewing(ras, slice_normal, view)

    def use_edited_slice(self, ras, slice_normal) -> None:
        """The segment as it is on the slice through `ras` becomes that slice's prompt (a mask)."""
        self._call("use_edited_slice", ras, slice_normal)

    def _call(self, name, *args, **kwargs):
        if self._controller is None:
            self._on_error("Open a volume and select a segment first.")
            return None
        return getattr(self._controller, name)(*args, **kwargs)

    def undo(self) -> bool:
        return self._call("undo") is not None

    def redo(self) -> bool:
        return self._call("redo") is not None

    def cancel(self) -> None:
        """Stop the running propagation after its current slice (finished slices stay) and drop
        the actions still queued."""
        if self._controller is not None:
            self._controller.cancel()

    # --- review (docs/review.md) -------------------------------------------------------------
    def review(self) -> list:
        """The selected segment's review records along the Red view's axis ([] before any)."""
        return self._controller.review() if self._controller is not None else []

    def review_strip(self) -> list:
        """One cell per slice of the Red view's axis: frame, color (by confidence), flagged, title."""
        return self._controller.review_cells() if self._controller is not None else []

    def next_uncertain_slice(self, backwards: bool = False) -> int | None:
        """Show the next (previous) flagged slice after the one on screen; None when none is flagged."""
        return self._controller.next_uncertain_slice(backwards=backwards) if self._controller is not None else None

    def show_frame(self, frame: int) -> None:
        if self._controller is not None:
            self._controller.show_frame(frame)

    def set_review_rule(self, min_confidence: float) -> None:
        """Flag slices whose confidence is below this (a stricter or looser review)."""
        from medsam2.tracking.review import FlagRule

        try:
            self._review_rule = FlagRule(float(min_confidence), self._review_rule.max_jump)
        except (TypeError, ValueError) as exc:
            return self._on_error(f"Review: {exc}.")
        if self._controller is not None:
            self._controller.review_rule = self._review_rule

    def frame_index(self, ras, slice_normal) -> int | None:
        """The slice number through `ras` along the selected segment's view axis, if known."""
        session = self._controller.session(create=False) if self._controller else None
        try:
            return session.frame_index(ras, slice_normal) if session else None
        except MedSAM2Error:
            return None

    # --- the timer tick ---------------------------------------------------------------------
    def poll(self) -> bool:
        """Apply what the engine has finished (never waits); True while anything is going on."""
        if self._controller is None:
            return False
        was_busy = self._controller.busy
        self._controller.poll()
        return was_busy or self._controller.busy

    def _finished(self, session, job) -> None:
        if job.kind == "propagation" and job.error is None and not job.cancelled and self._propagation_asked:
            # the page's bar goes away: say what happened (a cancel says so itself)
            took = duration_text(time.monotonic() - self._propagation_asked)
            self._on_message(f"Propagated {job.done_frames} slice{'s' * (job.done_frames != 1)} in {took}.")
        action = job.action
        if action is None or action.prompt is None:
            return
        self.prompt_count += 1
        kind = action.kind
        if kind == "point":
            kind = "include point" if action.prompt.labels[-1] else "exclude point"
        self.last_prompt = {"number": self.prompt_count, "segment": session.segment_id,
                            **_describe_prompt(session, action, kind)}

    # --- teardown ---------------------------------------------------------------------------
    def close_sessions(self) -> None:
        """Cancel what runs (waiting for it to stop), then free every segment's engine sessions."""
        if self._controller is not None:
            self._controller.close_sessions()

    def shutdown(self) -> None:
        """The page server stops: sessions closed and the engine process stopped."""
        if self._controller is not None:
            self._controller.shutdown()
            self._controller = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None


def _describe_prompt(session, action, kind) -> dict:
    """What the engine was given, back in voxel (IJK) indices: for the status endpoint."""
    prompt, layout = action.prompt, session.geometry.layout(action.axis)

    def ijk(x, y):
        return [float(v) for v in layout.frame_to_ijk(prompt.frame, x, y)]

    out = {"kind": kind, "axis": int(action.axis), "frame": int(prompt.frame),
           "changed_frames": [int(f) for f in action.frames]}
    if prompt.points is not None:
        out["points"] = [{"ijk": ijk(x, y), "label": int(label)} for (x, y), label in zip(prompt.points, prompt.labels)]
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        out["box"] = [ijk(x0, y0), ijk(x1, y1)]
    return out


def duration_text(seconds: float) -> str:
    """A duration as a user reads it: "0.8 s", "12 s", "1 min 43 s"."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    return f"{whole} s" if whole < 60 else f"{whole // 60} min {whole % 60} s"
