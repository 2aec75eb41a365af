"""SegmentationSession: MedSAM2 prompts and propagation on one segment of a Slicer scene.

Asynchronous by design. `submit_point/box/edited_slice/propagate` check the input on the calling
(main) thread and return a Job at once; `poll()`, called from the shell's timer on the main
thread, sends the next job's requests to the engine and writes whatever the engine has finished
into the segment, within a time budget, never waiting. The engine runs elsewhere (LocalEngine:
a child process; RemoteEngine: a server), so nothing in the application's process computes on a
Python thread (inside Slicer such a thread would starve: Slicer's main thread keeps the GIL).
The synchronous `add_point`, `add_box`, `use_edited_slice`, `propagate` submit and wait, for
scripts, tests and the Python console; they also accept a model loaded in this process.

Engine sessions. One per (this segment, view axis), opened by the first job along that axis,
each holding the segment as object 1, so segments are independent: propagating or undoing one
never re-runs another's objects. Sessions on the same volume, axis and window still share image
features (the engine caches them by the frames' content).

Undo. An action records, for each frame it changed, the old and new content (bit-packed) and the
prompt it added. Undo writes the old frames back and drops the prompt at once; the engine learns of
it at the start of the next job on that axis (the frame's prompts are replayed), so undo never
waits for the engine. A child process that died is replaced on the next action, and the axis's
prompts are replayed into it: nothing in the segment is lost.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from medsam2.errors import InputError

from medsam2.prompt import Prompt

from .actions import OBJ_ID, AxisState, pack, unpack
from .engine_api import Engine
from .engine_inprocess import InProcessEngine
from .geometry import AXIS_NAMES, VolumeGeometry
from .jobs import FINISHED, JobContext, PromptJob, PropagationJob
from .segment_io import SegmentFrames
from .volume import display_window, volume_array

DIRECTIONS = ("both", "forward", "backward", "up", "down")
MAX_UNDO = 200
POLL_BUDGET_S = 0.025  # what one poll() may spend writing slices (a 40 ms timer stays smooth)


def as_engine(engine_or_model) -> Engine:
    """An engine (engine_api.Engine) as it is, or a model loaded in this process (a medsam2 Model
    or RemoteModel) wrapped as one."""
    return engine_or_model if isinstance(engine_or_model, Engine) else InProcessEngine(engine_or_model)


class SegmentationSession:
    """MedSAM2 on one segment: prompts in slice views, propagation, undo/redo.

    volumeNode, segmentationNode: nodes of one scene; segmentId: the segment to write.
    engine: LocalEngine / RemoteEngine, or a model (medsam2.load_model / medsam2.connect) to run
    in this process. window: (low, high), or None for the volume's display window/level (read
    once, here). axes="all": propagate along the three axes and fuse; image_set: the slices are
    independent 2D images.
    """

    def __init__(self, volumeNode, segmentationNode, segmentId: str, engine, memory: str = "self-sorting",
                 window=None, axes: str = "one", image_set: bool = False):
        if volumeNode is None or segmentationNode is None:
            raise InputError("Select a volume and a segmentation first.")
        if not segmentId:
            raise InputError("Select a segment (or add one) first.")
        if axes not in ("one", "all"):
            raise InputError(f"Axes must be 'one' or 'all'; got {axes!r}.")
        self.volume_node, self.segmentation_node, self.segment_id = volumeNode, segmentationNode, segmentId
        if segmentationNode.GetDisplayNode() is None:
            # e.g. made by a node selector's "Create new": without a display node results are invisible
            segmentationNode.CreateDefaultDisplayNodes()
        self.engine = as_engine(engine)
        self.memory, self.axes, self.image_set = memory, axes, bool(image_set)
        self.geometry = VolumeGeometry(volumeNode)
        self.window = tuple(float(v) for v in window) if window is not None else display_window(volumeNode)
        self._array = volume_array(volumeNode)
        self._segment = SegmentFrames(segmentationNode, segmentId, self.geometry)
        self._context = JobContext(engine_session=self._engine_for, segment=self._segment, record=self._push)
        self._axes: dict = {}
        self._last_axis = None
        self._undo: list = []
        self._redo: list = []
        self._queue: deque = deque()
        self._running = None
        self._reviews: list = []  # (engine request, action): review records on their way
        self._viewed: dict = {}   # axis -> the slice a view shows along it (prepared in the engine's idle time)
        self.notices: list = []   # messages for the user (e.g. the engine was restarted)
        self.closed = False

    # --- introspection --------------------------------------------------------------------
    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def busy(self) -> bool:
        return self._running is not None or any(not j.done for j in self._queue)

    @property
    def reviewing(self) -> bool:
        """Review records are on their way from the engine (poll() takes them; undo need not wait)."""
        return bool(self._reviews)

    @property
    def current_job(self):
        """The job the engine is working on (None when idle)."""
        return self._running

    def jobs(self) -> list:
        """The running job and the queued ones, in order."""
        return [j for j in (self._running, *self._queue) if j is not None and not j.done]

    def redoable(self, action) -> bool:
        return any(a is action for a in self._redo)

    def layout(self, slice_normal):
        return self.geometry.layout(self.geometry.axis_for_normal(slice_normal))

    def frame_index(self, ras, slice_normal=(0, 0, 1)) -> int:
        """The slice (frame) index through `ras` along this view's axis; only the slice is
        range-checked, so the centre of a panned slice view works too."""
        axis = self.geometry.axis_for_normal(slice_normal)
        frame = int(np.floor(self.geometry.ras_to_ijk_point(ras)[axis] + 0.5))
        n = self.geometry.dims[axis]
        if not 0 <= frame < n:
            raise InputError(f"This slice ({frame}) is outside {self.geometry.name} (slices 0..{n - 1} "
                             f"along {AXIS_NAMES[axis]}); scroll to a slice of the volume.")
        return frame

    def point_on_slice(self, ras, slice_normal=(0, 0, 1)):
        """The point of the slice through `ras` nearest to the volume's centre (inside the volume)."""
        normal = np.asarray(slice_normal, float) / np.linalg.norm(slice_normal)
        centre = (self.geometry.ijk_to_ras @ np.append((np.asarray(self.geometry.dims) - 1) / 2.0, 1.0))[:3]
        ras = np.asarray(ras, float)
        return centre - np.dot(centre - ras, normal) * normal

    def engine_masks(self, slice_normal=None, timeout: float = 120.0) -> np.ndarray:
        """The engine's own current mask of this segment along an axis, bool (frames, rows, cols).
        Blocks: for tests and the console."""
        axis = self.geometry.axis_for_normal(slice_normal) if slice_normal is not None else self._last_axis
        state = self._axes.get(axis)
        if state is None or state.engine is None:
            raise InputError("No engine session along this axis yet: place a prompt first.")
        return np.asarray(self.engine.wait(state.engine.masks(1), timeout).result(), dtype=bool)

    # --- submitting jobs (main thread; each returns at once) --------------------------------
    def _check_open(self):
        if self.closed:
            raise InputError("This MedSAM2 session was closed (scene closed or settings changed); start again.")

    def _state(self, layout, slice_normal) -> AxisState:
        state = self._axes.get(layout.axis)
        if state is None:
            state = self._axes[layout.axis] = AxisState(layout, slice_normal)
        state.normal = np.asarray(slice_normal, dtype=float)
        return state

    def _enqueue(self, job):
        self._queue.append(job)
        if self._running is None and not self.engine.computes_in_call:
            # an engine elsewhere: send the requests now rather than at the next timer tick (a
            # click's mask comes back one tick sooner); nothing is written here, only in poll()
            self._start_next()
            self.engine.poll(0.0)
        return job

    def _start_next(self):
        """Start the next queued job (jobs cancelled while queued are dropped); None if none."""
        while self._queue:
            job = self._queue.popleft()
            if job.done:
                continue
            self._running = job
            try:
                job.start()
            except Exception as exc:  # e.g. the segment was deleted, the engine was closed
                job.finish(exc)
            return job
        return None

    def _prompt_job(self, kind, prompt, layout, slice_normal, write_result=True) -> PromptJob:
        self._check_open()
        self._segment.segment()  # the segment may have been deleted meanwhile
        state = self._state(layout, slice_normal)
        self._last_axis = layout.axis
        return self._enqueue(PromptJob(self._context, state, kind, prompt, write_result))

    def submit_point(self, ras, include: bool = True, slice_normal=(0, 0, 1)) -> PromptJob:
        """Include (or exclude) point at RAS `ras` in the view with this normal; returns at once."""
        layout, frame, x, y = self.geometry.locate(ras, slice_normal)
        prompt = Prompt.make(frame, OBJ_ID, points=((x, y),), labels=(1 if include else 0,))
        return self._prompt_job("point", prompt, layout, slice_normal)

    def submit_box(self, ras_a, ras_b, slice_normal=(0, 0, 1)) -> PromptJob:
        """Box from two opposite RAS corners on one slice; returns at once."""
        layout, frame_a, xa, ya = self.geometry.locate(ras_a, slice_normal)
        _, frame_b, xb, yb = self.geometry.locate(ras_b, slice_normal)
        if frame_a != frame_b:
            raise InputError(f"The two box corners are on different slices ({frame_a} and {frame_b}); draw the "
                             "box within one slice.")
        if abs(xa - xb) < 1 or abs(ya - yb) < 1:  # either side: a line is no box
            raise InputError("The box is narrower or lower than a voxel; drag out a box around the structure.")
        prompt = Prompt.make(frame_a, OBJ_ID, box=(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        return self._prompt_job("box", prompt, layout, slice_normal)

    def submit_edited_slice(self, ras, slice_normal=(0, 0, 1)) -> PromptJob:
        """The segment as it is now on this slice (e.g. painted) becomes a mask prompt, and stays."""
        layout, frame, _, _ = self.geometry.locate(ras, slice_normal)
        current = self._segment.read(layout, frame)[0]
        if not current.any():
            raise InputError(f"Segment '{self.segment_id}' is empty on this slice ({frame}); paint it in Segment "
                             "Editor first, or place a point or box instead.")
        return self._prompt_job("edited slice", Prompt.make(frame, OBJ_ID, mask=pack(current)), layout, slice_normal,
                                write_result=False)

    def submit_propagate(self, direction: str = "both", start=None, slice_range=None,
                         slice_normal=None) -> PropagationJob:
        """Propagate along the axis of `slice_normal` (default: the last prompted axis); returns at once.

        direction: both | forward | backward (voxel index order) | up | down (along the view normal).
        start: refine from this frame outward (stopping at the next prompted slices).
        slice_range: (low, high) frames to stay within.
        """
        self._check_open()
        if direction not in DIRECTIONS:
            raise InputError(f"Direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}.")
        axis = self.geometry.axis_for_normal(slice_normal) if slice_normal is not None else self._last_axis
        state = self._axes.get(axis)
        prompted = self._prompted_frames(state) if state else []
        if not prompted:
            where = f" along {AXIS_NAMES[axis]}" if axis is not None else ""
            raise InputError(f"Nothing to propagate{where}: place a point or box on a slice first.")
        if slice_normal is not None:
            state.normal = np.asarray(slice_normal, dtype=float)
        if direction in ("up", "down"):  # 'up' = towards larger slice offset, i.e. along the view normal
            along = float(np.dot(self.geometry.world_direction_of_axis(axis), state.normal)) > 0
            direction = "forward" if along == (direction == "up") else "backward"
        n = state.layout.num_frames
        if self.axes == "all" and (direction != "both" or start is not None or slice_range is not None):
            raise InputError("Fusing all three axes runs the whole volume in both directions: use 'both' without "
                             "a slice range or refine, or set Axes to 'one' for that.")
        if start is not None and not 0 <= int(start) < n:
            raise InputError(f"Slice {start} is outside the volume (0..{n - 1}).")
        origin = int(start) if start is not None else prompted[0]
        stop, low, high = None, 0, n - 1
        if slice_range is not None:
            low, high = sorted(int(v) for v in slice_range)
            low, high = max(low, 0), min(high, n - 1)
            if not low <= origin <= high:
                raise InputError(f"The slice range {low}-{high} must include the slice propagation starts from "
                                 f"({origin}).")
            stop = {"forward": high, "backward": low, "both": (low, high)}[direction]
        total = _frames_reached(direction, origin, low, high, prompted if start is not None else [])
        steps_total = None
        if self.axes == "all":
            from medsam2.tracking.fusion import total_steps

            total, steps_total = n, total_steps((n, *state.layout.frame_shape))
        self._last_axis = axis
        return self._enqueue(PropagationJob(self._context, state, direction, start, stop, total, steps_total,
                                            self.axes))

    def _prompted_frames(self, state) -> list:
        """Frames with prompts, counting prompts still waiting in the queue."""
        queued = {j.frame for j in self._queue if isinstance(j, PromptJob) and j.state is state and not j.done}
        return sorted(set(state.prompted_frames()) | queued)

    # --- the slice a view shows: the engine prepares a click there ---------------------------
    def viewing(self, ras, slice_normal) -> None:
        """A view shows the slice through `ras`: the engine prepares a click there in its idle time,
        so that click runs only the prompt encoder and mask decoder. Never blocks; nothing is sent
        along an axis without an engine session yet (nothing tracked there), or for an oblique view."""
        if self.closed:
            return
        try:
            axis = self.geometry.axis_for_normal(slice_normal)
            frame = self.frame_index(ras, slice_normal)
        except InputError:
            return
        if self._viewed.get(axis) != frame:
            self._viewed[axis] = frame
            self._prepare_viewed(axis)

    def _prepare_viewed(self, axis) -> None:
        """Ask the axis's engine session to prepare the viewed slice (again: a finished job changed
        the memory it is prepared under). The request is answered at once; no reply is awaited."""
        state, frame = self._axes.get(axis), self._viewed.get(axis)
        if frame is None or state is None or state.engine is None or not state.engine.alive:
            return
        if state.engine.opened is not None and state.engine.opened.error is not None:
            return
        state.engine.prepare(frame)

    # --- the main-thread pump ---------------------------------------------------------------
    def poll(self, budget_s: float = POLL_BUDGET_S) -> list:
        """Start queued jobs and apply what the engine has finished, within about `budget_s`.
        Never waits. Returns the jobs that finished during this call."""
        deadline = time.monotonic() + budget_s
        self.engine.poll(min(0.01, budget_s / 3))
        finished = []
        while True:
            job = self._running or self._start_next()
            if job is None:
                break
            try:
                ended = job.status == FINISHED or job.step(deadline)
            except Exception as exc:  # segment deleted, converted or regridded mid-job: end it once
                ended = job.abandon(exc)
            if ended:
                finished.append(job)
                self._running = None
                self._ask_review(job)
                if not self._queue:  # idle now: the viewed slices are prepared under the new memory
                    for axis in self._viewed:
                        self._prepare_viewed(axis)
                if time.monotonic() < deadline:
                    continue
            break
        self._take_reviews()
        return finished

    # --- review records (docs/review.md): fetched after each action, kept with it -------------
    def _ask_review(self, job) -> None:
        """After an action, ask its axis's engine session for the review records (in order behind
        the job's own requests); they are kept with the action, so undo and redo bring them back."""
        handle = job.state.engine
        if job.action is not None and job.error is None and handle is not None and handle.alive:
            self._reviews.append((handle.review(OBJ_ID), job.action))

    def _take_reviews(self) -> None:
        waiting = []
        for request, action in self._reviews:
            if not request.done:
                waiting.append((request, action))
            elif request.error is None:
                action.review = list(request.value)
        self._reviews = waiting

    def review(self, slice_normal=None) -> list:
        """The review records (medsam2 Session.review) of the slices this segment shows from the
        engine along an axis (the view's; default the last one worked on), frames ascending: those
        of the last action done on that axis, on the frames the actions still done wrote. An undo
        takes its action's records away, a redo brings them back. Never waits ([] until known)."""
        axis = self.geometry.axis_for_normal(slice_normal) if slice_normal is not None else self._last_axis
        done = [a for a in self._undo if a.axis == axis]
        latest = next((a.review for a in reversed(done) if a.review is not None), None)
        if not latest:
            return []
        # the frames they wrote, and the prompted ones (an edited slice is a prompt that writes nothing)
        shown = {f for a in done for f in a.changes} | {a.prompt.frame for a in done if a.prompt is not None}
        return [r for r in latest if r["frame"] in shown]

    def _engine_for(self, state: AxisState):
        """The axis's engine session, (re)opened with every prompt replayed when needed."""
        if state.engine is not None and not state.engine.alive:
            n = sum(len(p) for p in state.prompts.values())
            self.notices.append(f"{self.engine.stopped_reason or 'The MedSAM2 engine was restarted.'} "
                                f"It was restarted, and segment '{self.segment_id}' got its {n} prompt(s) back.")
            state.engine = None
        if state.engine is None:
            opened = self.engine.open(state.layout.frames(self._array), memory=self.memory, window=self.window,
                                      image_set=self.image_set)
            state.attach(opened)
        return state.engine

    def _push(self, action):
        self._undo.append(action)
        del self._undo[:-MAX_UNDO]
        self._redo.clear()
        return action

    # --- synchronous actions (scripts, tests, console) --------------------------------------
    def _wait(self, job, on_step=None, cancel=None):
        try:
            while not job.done:
                if cancel is not None and cancel.is_set() and not job.cancelled:
                    job.cancel()
                before = job.status
                self.poll(0.05)
                if on_step is not None:
                    on_step(job)
                if not job.done and before == job.status and not job.written:
                    time.sleep(0.002)
        finally:
            if not job.done:  # interrupted: leave nothing running behind the caller's back
                job.cancel()
        deadline = time.monotonic() + 30.0
        while self._reviews and time.monotonic() < deadline:  # a script reads review() next
            self.poll(0.05)
        if job.error is not None:
            raise job.error
        return job.action

    def add_point(self, ras, include=True, slice_normal=(0, 0, 1)):
        """Include (or exclude) point; updates that slice. Returns the Action (one undo step)."""
        return self._wait(self.submit_point(ras, include, slice_normal))

    def add_box(self, ras_a, ras_b, slice_normal=(0, 0, 1)):
        return self._wait(self.submit_box(ras_a, ras_b, slice_normal))

    def use_edited_slice(self, ras, slice_normal=(0, 0, 1)):
        return self._wait(self.submit_edited_slice(ras, slice_normal))

    def propagate(self, direction="both", cancel=None, on_frame=None, *, start=None, slice_range=None,
                  slice_normal=None):
        """Propagate and wait; each finished frame is written at once. cancel: a threading.Event
        (finished frames are kept); on_frame(frame, done, total) after each frame is written.
        Returns the Action (one undo step)."""
        job = self.submit_propagate(direction, start, slice_range, slice_normal)

        def written(j):
            if on_frame is not None:
                for frame in j.written:
                    on_frame(frame, j.done_frames, j.total)

        return self._wait(job, written, cancel)

    # --- undo / redo (main thread, instant) -----------------------------------------------
    def _refuse_while_busy(self, what):
        if self.busy:
            raise InputError(f"MedSAM2 is still working: wait for it to finish (or cancel it) before {what}.")

    def _restore(self, action, version: str):
        """Write the action's frames back as they were ('old') or as it left them ('new')."""
        state = self._axes[action.axis]
        index = 0 if version == "old" else 1
        masks = {f: unpack(rec[index]) for f, rec in action.changes.items()}
        if masks:
            self._segment.write(state.layout, masks)
        return state

    def undo(self):
        """Undo the last action exactly; returns it, or None when there is nothing to undo."""
        self._refuse_while_busy("undoing")
        if not self._undo:
            return None
        action = self._undo.pop()
        state = self._restore(action, "old")
        if action.prompt is not None:
            state.remove(action.prompt)
        self._redo.append(action)
        return action

    def redo(self):
        """Redo the last undone action exactly; returns it, or None."""
        self._refuse_while_busy("redoing")
        if not self._redo:
            return None
        action = self._redo.pop()
        state = self._restore(action, "new")
        if action.prompt is not None:
            state.add(action.prompt)
            state.dirty.add(action.prompt.frame)
            self._last_axis = action.axis
        self._undo.append(action)
        return action

    # --- closing ----------------------------------------------------------------------------
    def close(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Cancel the jobs (waiting for a running one to stop, so no write comes later and the
        engine is idle), then free the engine sessions and the undo history."""
        for job in list(self._queue):
            job.cancel()
        self._queue.clear()
        job = self._running
        if job is not None:
            job.discard = True
            job.cancel()
            deadline = time.monotonic() + timeout
            while wait and not job.settled and time.monotonic() < deadline:
                if self.engine.poll(0.05) == 0:
                    time.sleep(0.005)
            job.finish()
            self._running = None
        for state in self._axes.values():
            engine, state.engine = state.engine, None
            if engine is not None:
                try:
                    engine.close()
                except Exception:  # best effort: the engine may be gone already
                    pass
        self._axes.clear()
        self._reviews.clear()
        self._undo.clear()
        self._redo.clear()
        self._last_axis = None
        self.closed = True


def _frames_reached(direction, origin, low, high, prompted) -> int:
    """How many slices a propagation from `origin` reaches (a refine stops at prompted slices)."""
    up_to, down_to = high, low
    if prompted:  # refine: each pass ends before the next prompted slice
        up_to = min([f - 1 for f in prompted if f > origin] + [high])
        down_to = max([f + 1 for f in prompted if f < origin] + [low])
    frames = set()
    if direction in ("forward", "both"):
        frames |= set(range(origin, up_to + 1))
    if direction in ("backward", "both"):
        frames |= set(range(down_to, origin + 1))
    return max(len(frames), 1)
