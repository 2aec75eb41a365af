"""The module's logic, without Qt: what a shell's widgets and shortcuts call, and its timer's poll().

Shared by the Qt module (MedSAM2.py) and the web front end (MedSAM2Web): a shell keeps widgets,
shortcuts and wiring; everything it does to the scene or the engine goes through here. One engine
(a child process, or a remote server) for the current settings, started on first use; one
SegmentationSession per (volume, segmentation, segment) and options; jobs queue per session and
run in order; `poll()` (the shell's ~40 ms timer) applies their results within a time budget.
Errors and notices reach the shell through callbacks, never as dialogs from here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import vtk

from medsam2.errors import InputError
from medsam2.options import AXES, MEMORY_MODES
from medsam2.tracking.review import FlagRule, flag_rows

from .geometry import slice_view_center, slice_view_normal
from .jobs import PromptJob, PropagationJob
from .markers import Marker, PromptMarkers
from .models import ModelSettings
from .prompt_nodes import PromptNodes
from .review import flagged_frames, next_flagged, strip_cells
from .session import POLL_BUDGET_S, SegmentationSession

log = logging.getLogger("MedSAM2")
DIRECTIONS = ("both", "up", "down")
VIEWING_SETTLE_S = 0.15  # a view's slice must rest this long before the engine prepares it (scrolling)


@dataclass(frozen=True)
class SessionOptions:
    memory: str = "self-sorting"
    window: tuple | None = None   # (low, high); None: the volume's display window/level
    axes: str = "one"
    image_set: bool = False

    def check(self) -> None:
        if self.memory not in MEMORY_MODES:
            raise InputError(f"Memory must be one of {', '.join(MEMORY_MODES)}; got {self.memory!r}.")
        if self.axes not in AXES:
            raise InputError(f"Axes must be one of {', '.join(AXES)}; got {self.axes!r}.")
        if self.window is not None and not float(self.window[0]) < float(self.window[1]):
            raise InputError(f"The intensity window {self.window[0]} .. {self.window[1]} is empty: make the upper "
                             "value larger than the lower one, or use the volume's display window.")


@dataclass(frozen=True)
class Progress:
    text: str
    value: int = 0
    maximum: int = 0  # 0: busy, no known end


class ModuleController:
    """on_error(exc), on_message(text), on_changed(): the shell's ways to show what happened."""

    def __init__(self, scene, on_error: Callable | None = None, on_message: Callable | None = None,
                 on_changed: Callable | None = None, on_finished: Callable | None = None):
        self.scene = scene
        self.on_finished = on_finished or (lambda session, job: None)  # (session, job) after each job
        self.on_error = on_error or (lambda exc: log.error("MedSAM2: %s", exc))
        self.on_message = on_message or (lambda text: log.info("MedSAM2: %s", text))
        self.on_changed = on_changed or (lambda: None)
        self.settings = ModelSettings()
        self.options = SessionOptions()
        self.markers = PromptMarkers()
        self.prompt_nodes = PromptNodes(scene)
        self._engine = None
        self._owns_engine = False  # made here from the settings (not handed in by use_engine)
        self._sessions: dict = {}  # (volume id, segmentation id, segment id) -> (options, session)
        self._markers_of_jobs: dict = {}  # job -> (session, Marker), until the job commits or fails
        self._last_activity = time.monotonic()  # for the idle unload (settings.idle_unload_minutes)
        self._target = (None, None, "")
        self._view = None  # the slice node review navigation reads and moves (attach_view)
        self.review_rule = FlagRule()  # which slices review() flags (set_review_rule)
        self._viewing: dict = {}  # view name -> (ras, slice normal, when it last moved), until forwarded
        self._segment_watch: dict = {}  # segmentation node ID -> (node, observer tag)
        self._observers = [scene.AddObserver(scene.StartCloseEvent, self._on_scene_closing)]
        self._observers.append(scene.AddObserver(scene.NodeAboutToBeRemovedEvent, self._on_node_removed))

    # --- configuration ------------------------------------------------------------------------
    def set_settings(self, settings: ModelSettings) -> bool:
        """Use these model/server settings. Only a real change of the engine closes the sessions
        and stops the engine (a shell may call this on every focus-out of a settings field).
        Returns changed."""
        if settings == self.settings:
            return False
        settings.check()
        if not settings.same_engine(self.settings):
            self.close_sessions()
            self._drop_engine()
        self.settings = settings
        return True

    def set_options(self, **changes) -> None:
        """memory, window, axes, image_set for sessions started from now on (a session with other
        options is closed when next used)."""
        options = replace(self.options, **changes)
        options.check()
        self.options = options

    def select(self, volume_node, segmentation_node, segment_id: str) -> None:
        self._target = (volume_node, segmentation_node, segment_id or "")

    @property
    def engine(self):
        """The engine for the current settings (its child process starts on first use)."""
        if self._engine is None:
            self._engine = self.settings.create_engine()
            self._owns_engine = True
        return self._engine

    def use_engine(self, engine) -> None:
        """Use an engine made elsewhere (a test's, the web page's, or a model loaded in the Python
        console). Its maker closes it: the controller only closes the engines it made itself."""
        self.close_sessions()
        if engine is not self._engine:
            self._drop_engine()
            self._engine = engine

    def _drop_engine(self) -> None:
        """Stop using the engine; stop its child too if this controller made it."""
        if self._engine is not None and self._owns_engine:
            self._engine.close()
        self._engine, self._owns_engine = None, False

    def start_engine(self) -> None:
        """Start the engine now (e.g. 'Download model'), rather than at the first prompt."""
        self.engine.start()

    def unload_model(self) -> bool:
        """'Unload model': sessions closed and the engine's child stopped, which frees its (GPU)
        memory; the next prompt loads the model again. An engine handed in by use_engine only
        loses its sessions (its maker stops it). Returns whether a model was unloaded."""
        self.close_sessions()
        unloaded = self._engine is not None and self._owns_engine and self._engine.state in ("starting", "ready")
        self._drop_engine()
        return unloaded

    @property
    def model_loaded(self) -> bool:
        """The engine is up (its model in memory), or on its way up."""
        return self._engine is not None and self._engine.state in ("starting", "ready")

    # --- sessions -----------------------------------------------------------------------------
    def session(self, create: bool = True) -> SegmentationSession | None:
        """The session of the selected segment (created with the current options if needed)."""
        volume, segmentation, segment_id = self._target
        if volume is None or segmentation is None or not segment_id:
            if create:
                raise InputError("Select a volume, a segmentation and a segment first.")
            return None
        key = (volume.GetID(), segmentation.GetID(), segment_id)
        entry = self._sessions.get(key)
        if entry is not None and entry[0] == self.options:
            return entry[1]
        if not create:
            return None
        if entry is not None:
            self._close_session(key)
        o = self.options
        session = SegmentationSession(volume, segmentation, segment_id, self.engine, memory=o.memory,
                                      window=o.window, axes=o.axes, image_set=o.image_set)
        self._sessions[key] = (o, session)
        self._watch_segments(segmentation)
        return session

    def _watch_segments(self, segmentation) -> None:
        """A segment deleted in any editor takes its session with it (no write into a ghost)."""
        import slicer

        if segmentation.GetID() not in self._segment_watch:
            tag = segmentation.AddObserver(slicer.vtkSegmentation.SegmentRemoved, self._on_segment_removed)
            self._segment_watch[segmentation.GetID()] = (segmentation, tag)

    def _unwatch_segments(self, node_id=None) -> None:
        """Stop watching one segmentation (it left the scene) or all (scene closed: Clear() restarts
        node IDs, so a new segmentation could take a watched one's ID and go unobserved)."""
        for key in [k for k in self._segment_watch if node_id is None or k == node_id]:
            node, tag = self._segment_watch.pop(key)
            node.RemoveObserver(tag)

    def _on_segment_removed(self, segmentation, event=None) -> None:
        gone = [k for k in self._sessions
                if k[1] == segmentation.GetID() and segmentation.GetSegmentation().GetSegment(k[2]) is None]
        for key in gone:
            self._close_session(key)

    def sessions(self) -> list:
        return [s for _, s in self._sessions.values()]

    def _close_session(self, key, wait=True) -> None:
        _, session = self._sessions.pop(key)
        for job, (owner, marker) in list(self._markers_of_jobs.items()):
            if owner is session:
                marker.remove()
                del self._markers_of_jobs[job]
        self.markers.forget_session(session)  # its prompts leave the engine: their markers go too
        session.close(wait=wait)

    def close_segment(self, segment_id: str) -> None:
        """A segment was deleted: its sessions (jobs, engine sessions, undo history) go too."""
        for key in [k for k in self._sessions if k[2] == segment_id]:
            self._close_session(key)

    def close_sessions(self) -> None:
        """Cancel every job (waiting for a running one, so nothing is written afterwards) and free
        the engine sessions. The engine keeps running: the model stays loaded."""
        for key in list(self._sessions):
            self._close_session(key)
        self.on_changed()

    def shutdown(self) -> None:
        """Module cleanup or application exit: sessions closed, the engine's child stopped (if this
        controller made it; see use_engine)."""
        self.close_sessions()
        self._drop_engine()
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._unwatch_segments()
        self._observers = []

    def _on_scene_closing(self, caller=None, event=None) -> None:
        """File > Close scene: jobs cancelled and waited for, and every engine session closed,
        which frees the memory they held. The engine and its loaded model stay, so the next
        patient's first prompt does not wait for the model to load ("Unload model" or the idle
        timeout stop it)."""
        self.close_sessions()
        self._unwatch_segments()
        self._target = (None, None, "")
        if self._engine is not None:
            self._engine.close_sessions()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def _on_node_removed(self, scene, event, node) -> None:
        """A session's volume or segmentation leaves the scene: stop writing into it."""
        node_id = node.GetID() if node is not None else None
        for key in [k for k in self._sessions if node_id in k[:2]]:
            self._close_session(key)
        if node_id is not None:
            self._unwatch_segments(node_id)

    # --- actions (each returns the job, or None when refused; errors go to on_error) ----------
    def _submit(self, make_job, marker=None):
        self._last_activity = time.monotonic()
        try:
            job_session = self.session()
            job = make_job(job_session)
        except Exception as exc:  # input errors (oblique view, no segment...) and engine refusals
            if marker is not None:
                marker.remove()
            self.on_error(exc)
            return None
        if marker is not None:
            self._markers_of_jobs[job] = (job_session, marker)
        self.on_changed()
        return job

    def place_point(self, ras, slice_normal, include: bool = True, marker: Marker | None = None):
        return self._submit(lambda s: s.submit_point(ras, include, slice_normal), marker)

    def place_box(self, ras_a, ras_b, slice_normal, show: bool = True):
        marker = Marker(self.prompt_nodes.box(ras_a, ras_b, slice_normal)) if show else None
        return self._submit(lambda s: s.submit_box(ras_a, ras_b, slice_normal), marker)

    def use_edited_slice(self, ras, slice_normal):
        return self._submit(lambda s: s.submit_edited_slice(s.point_on_slice(ras, slice_normal), slice_normal))

    def propagate(self, direction: str = "both", slice_range=None, slice_normal=None):
        if direction not in DIRECTIONS + ("forward", "backward"):
            self.on_error(InputError(f"Direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}."))
            return None
        return self._submit(lambda s: s.submit_propagate(direction, slice_range=slice_range, slice_normal=slice_normal))

    def refine(self, ras, slice_normal, slice_range=None):
        """Re-propagate outward from the slice through `ras` (after correcting it)."""
        return self._submit(lambda s: s.submit_propagate(
            "both", start=s.frame_index(ras, slice_normal), slice_range=slice_range, slice_normal=slice_normal))

    def undo(self):
        return self._undo_redo("undo")

    def redo(self):
        return self._undo_redo("redo")

    def _undo_redo(self, which):
        session = self.session(create=False)
        if session is None:
            return None
        try:
            action = session.undo() if which == "undo" else session.redo()
        except InputError as exc:  # still busy
            self.on_message(str(exc))
            return None
        if action is not None:
            (self.markers.undone if which == "undo" else self.markers.redone)(session, action)
        self.on_changed()
        return action

    def viewing(self, ras, slice_normal, view: str = "") -> None:
        """A slice view (`view`: its name) now shows the slice through `ras`. Once it has rested
        VIEWING_SETTLE_S (scrolling sends many), poll() tells the selected segment's session, whose
        engine prepares a click there in its idle time. Never blocks."""
        self._viewing[view] = (tuple(float(v) for v in ras), tuple(float(v) for v in slice_normal), time.monotonic())

    def _forward_viewing(self) -> None:
        settled = [k for k, (_, _, when) in self._viewing.items() if time.monotonic() - when >= VIEWING_SETTLE_S]
        if not settled:
            return
        session = self.session(create=False)
        for view in settled:
            ras, normal, _ = self._viewing.pop(view)
            if session is not None:
                session.viewing(ras, normal)

    def cancel(self) -> None:
        """Cancel every queued and running job (finished slices of a propagation stay)."""
        for session in self.sessions():
            for job in session.jobs():
                job.cancel()
        self.on_changed()

    def slice_range_around(self, ras, slice_normal, half_width: int = 10):
        """(first, last) slices around the one through `ras`, within the volume; None without a session."""
        session = self.session(create=False)
        if session is None:
            return None
        try:
            frame = session.frame_index(ras, slice_normal)
            n = session.layout(slice_normal).num_frames
        except InputError as exc:
            self.on_error(exc)
            return None
        return max(0, frame - half_width), min(n - 1, frame + half_width)

    @staticmethod
    def model_choices() -> list:
        """(label, registry name, note) for a model list; empty when the registry cannot load."""
        try:
            import medsam2

            specs = medsam2.list_models()
        except Exception as exc:  # the custom-checkpoint path still works without it
            log.warning("MedSAM2: model registry unavailable: %s", exc)
            return []
        return [(f"{s['name']}  ({s['image_size']} px)", s["name"], s.get("note") or "") for s in specs]

    # --- review: the slices worth a look (docs/review.md) -------------------------------------
    def attach_view(self, slice_node) -> None:
        """The slice view whose slice is "the one on screen" for next_uncertain_slice, and that it
        and show_frame move (a shell's prompt view); None detaches."""
        self._view = slice_node

    def set_review_rule(self, min_confidence: float | None = None, max_jump: float | None = None) -> None:
        """A stricter or looser review (docs/review.md); what is not given stays."""
        rule = self.review_rule
        try:
            self.review_rule = FlagRule(rule.min_confidence if min_confidence is None else float(min_confidence),
                                        rule.max_jump if max_jump is None else float(max_jump))
        except (TypeError, ValueError) as exc:
            raise InputError(f"Review: {exc}.") from None

    def review(self) -> list:
        """The selected segment's review records (one dict per slice: frame, confidence, area,
        change, source, flagged, reason) along the attached view's axis (without one: the axis
        last worked on), flagged by `review_rule`. [] before the engine has said anything. Never waits."""
        session = self.session(create=False)
        if session is None:
            return []
        try:
            records = session.review(slice_view_normal(self._view) if self._view is not None else None)
        except InputError:  # an oblique view: it shows no slice of the volume
            return []
        return flag_rows([dict(r) for r in records], self.review_rule, ordered=not session.image_set)

    def review_cells(self) -> list:
        """The review strip: one cell per slice of the attached view's axis (frame, color by
        confidence, flagged, title); [] without a session or a view on a volume axis."""
        session = self.session(create=False)
        if session is None or self._view is None:
            return []
        try:
            num_frames = session.layout(slice_view_normal(self._view)).num_frames
        except InputError:
            return []
        return strip_cells(self.review(), num_frames)

    def next_uncertain_slice(self, after: int | None = None, backwards: bool = False) -> int | None:
        """The next flagged slice after `after` (default: the attached view's slice), cycling; the
        previous one with backwards=True. Moves the attached view there. None when none is flagged."""
        if after is None:
            after = self._frame_on_screen()
        frame = next_flagged(flagged_frames(self.review()), after, backwards)
        if frame is not None:
            self.show_frame(frame)
        return frame

    def _frame_on_screen(self) -> int | None:
        session = self.session(create=False)
        if session is None or self._view is None:
            return None
        try:
            return session.frame_index(slice_view_center(self._view), slice_view_normal(self._view))
        except InputError:
            return None

    def show_frame(self, frame: int) -> bool:
        """Move the attached view to slice `frame` of its axis (a strip cell clicked); False when
        there is no view or no session to say where that slice is."""
        session = self.session(create=False)
        if session is None or self._view is None:
            return False
        geometry = session.geometry
        try:
            axis = geometry.axis_for_normal(slice_view_normal(self._view))
        except InputError:
            return False
        ijk = geometry.ras_to_ijk_point(slice_view_center(self._view))
        ijk[axis] = int(frame)
        self._view.JumpSliceByOffsetting(*(geometry.ijk_to_ras @ np.append(ijk, 1.0))[:3])
        return True

    # --- state for the shell ------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A job runs or waits, or review records are on their way (the shell keeps polling)."""
        return any(s.busy or s.reviewing for s in self.sessions())

    @property
    def can_undo(self) -> bool:
        s = self.session(create=False)
        return bool(s and s.can_undo and not s.busy)

    @property
    def can_redo(self) -> bool:
        s = self.session(create=False)
        return bool(s and s.can_redo and not s.busy)

    @property
    def progress(self) -> Progress | None:
        engine = self._engine
        job = next((s.current_job for s in self.sessions() if s.current_job is not None), None)
        if engine is not None and engine.state == "starting":
            if engine.download and engine.download[1]:
                done, total = engine.download
                return Progress(f"Downloading the model: {done / 2**20:.0f} of {total / 2**20:.0f} MB",
                                done // 2**20, max(total // 2**20, 1))
            return Progress(engine.status or "Starting the MedSAM2 engine")
        if job is None:
            return None
        if isinstance(job, PromptJob):
            return Progress(f"Segmenting slice {job.frame}...")
        done, total = job.progress
        what = "three axes, then fusing" if job.steps_total != job.total else "slices"
        return Progress(f"Propagating... {done} of {total} ({what})", done, max(total, 1))

    # --- the timer tick -----------------------------------------------------------------------
    def poll(self, budget_s: float = POLL_BUDGET_S) -> None:
        """Apply what the engine has finished, within about `budget_s`; never waits."""
        deadline = time.monotonic() + budget_s
        if self._engine is not None and not self.busy:
            self._engine.poll(0.005)  # start-up messages (download progress) arrive without jobs
            self._unload_when_idle()
        else:
            self._last_activity = time.monotonic()
        if self._viewing:
            self._forward_viewing()
        changed = False
        for session in self.sessions():
            if not (session.busy or session.reviewing):
                continue
            for job in session.poll(max(0.005, deadline - time.monotonic())):
                self._finished(session, job)
            while session.notices:
                self.on_message(session.notices.pop(0))
            changed = True
        if changed:
            self.on_changed()

    def _unload_when_idle(self) -> None:
        """Past the settings' idle time, the model leaves memory (GPU memory is shared)."""
        minutes = self.settings.idle_unload_minutes
        if minutes > 0 and time.monotonic() - self._last_activity > minutes * 60 and self.unload_model():
            self.on_message(f"Unloaded the MedSAM2 model after {minutes:g} min without use, to free its memory; "
                            "the next prompt loads it again.")
            self.on_changed()

    def _finished(self, session, job) -> None:
        _, marker = self._markers_of_jobs.pop(job, (None, None))
        if job.action is not None and marker is not None and job.action.prompt is not None:
            self.markers.attach(session, job.action, marker)
        elif marker is not None:
            marker.remove()  # refused or cancelled: its marker would show a prompt the engine lacks
        self.markers.prune(session)  # a new action ends the redo history: those markers go
        if job.error is not None:
            self.on_error(job.error)
        elif job.cancelled and isinstance(job, PropagationJob) and job.done_frames:
            self.on_message(f"Cancelled after {job.done_frames} of {job.total} slices; those stay (undo removes them).")
        elif isinstance(job, PropagationJob) and job.report is not None and job.report.refine:
            self.on_message(job.report.summary())  # "Refined 7 slices; the rest agreed"
        self.on_finished(session, job)
