"""SegmentationSession: MedSAM2 prompts and propagation on one segment of a Slicer scene.

Threading. Every action comes in three steps so that a GUI can keep the engine off its thread:
``prepare_*`` (main thread: geometry, reading the scene) -> ``job.compute()`` (any one thread:
engine calls only, no scene access) -> ``job.commit()`` / ``job.apply()`` (main thread: writing
the segment, recording undo). The plain methods of the contract (``add_point``, ``propagate``...)
run the three steps in a row, for scripts, tests and the Python console.

Engine sessions. One engine session per (this segment, view axis), opened on the first prompt
along that axis, each holding the segment as object 1. Segments are independent by construction:
propagating or undoing one never re-runs, or waits for, another segment's objects (an engine
session propagates all its objects at once). Sessions on the same volume, axis and window still
share the image features, because the engine caches them by the frames' content.

Undo. An action records, for each frame it changed, the frame's old and new content (bit-packed)
and the engine prompt it added. Undo writes the old frames back and drops the prompt; the engine
learns of it lazily: the frames whose prompts changed are replayed (clear, then re-add what is
left, in order) at the start of the next engine job on that axis, so undo itself is instant and
never touches the engine from the main thread. Undo restores the segment exactly; the engine's
propagated (non-prompted) frames are simply recomputed by the next propagation.
"""

from dataclasses import dataclass, field

import numpy as np

from medsam2.errors import InputError

from .geometry import AXIS_NAMES, VolumeGeometry
from .segment_io import SegmentFrames, pack, unpack

OBJ_ID = 1
DIRECTIONS = ("both", "forward", "backward", "up", "down")
MAX_UNDO = 200


def display_window(volume_node):
    """(low, high) of the volume's display window/level, or None when it has none."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width, level = float(display.GetWindow()), float(display.GetLevel())
    if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
        return None
    return (level - width / 2.0, level + width / 2.0)


def volume_array(volume_node):
    """The volume's voxels as a (K, J, I) numpy view of its VTK image (no copy)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])


@dataclass
class Prompt:
    """One engine prompt on one frame, kept so it can be replayed after an undo."""

    frame: int
    points: tuple = None   # ((x, y), ...)
    labels: tuple = None
    box: tuple = None      # (x0, y0, x1, y1)
    mask: tuple = None     # packed bool (rows, cols)

    def engine_kwargs(self):
        kw = {}
        if self.points is not None:
            kw["points"] = np.asarray(self.points, dtype=float).reshape(-1, 2)
            kw["labels"] = np.asarray(self.labels, dtype=int)
        if self.box is not None:
            kw["box"] = np.asarray(self.box, dtype=float)
        if self.mask is not None:
            kw["mask"] = unpack(self.mask)
        return kw


@dataclass
class Action:
    """What one user action changed: enough to undo and redo it exactly."""

    kind: str                  # "point" | "box" | "edited slice" | "propagation"
    axis: int
    prompt: Prompt = None
    changes: dict = field(default_factory=dict)  # frame -> (old, new) packed

    @property
    def frames(self):
        return sorted(self.changes)


class AxisState:
    """The engine session and prompt history of one segment along one volume axis."""

    def __init__(self, layout, normal):
        self.layout = layout
        self.normal = np.asarray(normal, dtype=float)  # last view normal used on this axis
        self.engine = None          # opened by the first job (worker side)
        self.prompts = {}           # frame -> [Prompt] in the order given to the engine
        self.dirty = set()          # frames whose engine prompts must be replayed

    def engine_ops(self):
        """Replay instructions for dirty frames (all prompted frames if no engine session is open
        yet); the caller hands them to a job, which runs them on the worker side."""
        frames = set(self.dirty) | (set(self.prompts) if self.engine is None else set())
        ops = [(f, list(self.prompts.get(f, []))) for f in sorted(frames)]
        self.dirty.clear()
        return ops


class _Job:
    def __init__(self, owner, state, ops):
        self.owner, self.state, self._ops = owner, state, ops
        self.error = None

    def _engine(self):
        """Open the engine session if needed and replay undone/redone frames. Worker side."""
        state = self.state
        if state.engine is None:
            frames = state.layout.frames(self.owner._array)
            opener = self.owner.model.open_images if self.owner.image_set else self.owner.model.open
            state.engine = opener(frames, memory=self.owner.memory, window=self.owner.window)
        ops, self._ops = self._ops, []
        i = 0
        try:
            for i, (frame, prompts) in enumerate(ops):
                if OBJ_ID in list(state.engine.obj_ids):
                    state.engine.clear_prompts(frame, OBJ_ID)
                for p in prompts:
                    state.engine.add_prompt(frame, obj_id=OBJ_ID, **p.engine_kwargs())
        except BaseException:
            state.dirty.update(f for f, _ in ops[i:])  # retry them on the next job
            raise
        return state.engine


class PromptJob(_Job):
    """One prompt on one frame."""

    def __init__(self, owner, state, ops, kind, prompt, write_result=True):
        super().__init__(owner, state, ops)
        self.kind, self.prompt, self.write_result = kind, prompt, write_result
        self.mask = None

    @property
    def frame(self):
        return self.prompt.frame

    def compute(self):
        """Engine side: returns the frame's new mask (frame layout). Safe off the main thread."""
        try:
            engine = self._engine()
            self.mask = np.asarray(engine.add_prompt(self.frame, obj_id=OBJ_ID, **self.prompt.engine_kwargs()), dtype=bool)
        except BaseException as exc:
            self.error = exc
            raise
        return self.mask

    def commit(self):
        """Main thread: write the slice and record the undo step. Returns the Action."""
        return self.owner._commit_prompt(self)


class PropagationJob(_Job):
    """Propagation along one axis; masks flow worker -> main thread frame by frame."""

    def __init__(self, owner, state, ops, direction, start, stop, total):
        super().__init__(owner, state, ops)
        self.direction, self.start, self.stop, self.total = direction, start, stop, total
        self.action = Action("propagation", owner._axis_of(state))
        self.done = 0
        # progress in engine items, for the progress bar: a fused run does three single-axis runs
        # (items without masks) before it yields the fused slices. Plain ints, set by the worker.
        self.steps = 0
        self.steps_total = total
        if owner.axes == "all":
            from medsam2.fusion import total_steps

            self.steps_total = total_steps((state.layout.num_frames, *state.layout.frame_shape))

    def frames(self, cancel=None):
        """Engine side: yields (frame, bool mask) as the engine finishes them. No scene access."""
        try:
            engine = self._engine()
            # fused runs first yield progress items without masks, then every fused frame
            extra = {"axes": "all"} if self.owner.axes == "all" else {}
            for frame, masks in engine.propagate(direction=self.direction, start=self.start,
                                                 stop=self.stop, cancel=cancel, **extra):
                self.steps += 1
                mask = masks.get(OBJ_ID)
                if mask is not None:
                    yield int(frame), np.asarray(mask, dtype=bool)
        except BaseException as exc:
            self.error = exc
            raise

    def compute(self, cancel=None, emit=None):
        """Engine side: run the whole propagation, handing each frame to emit(frame, mask)."""
        for frame, mask in self.frames(cancel):
            if emit is not None:
                emit(frame, mask)

    def apply(self, masks):
        """Main thread: write {frame: mask} (any number of finished frames at once).

        Prompted slices keep what their prompt gave (the engine re-yields them unchanged, and a
        hand-edited slice would otherwise come back at the model's coarser mask resolution).
        """
        prompted = {f for f, p in self.state.prompts.items() if p}
        writable = {f: m for f, m in masks.items() if f not in prompted}
        changed = self.owner._segment.write(self.state.layout, writable) if writable else {}
        for frame, (old, new) in changed.items():
            # keep the oldest 'old' if a frame is written twice (the two passes of "both")
            previous = self.action.changes.get(frame)
            self.action.changes[frame] = (previous[0] if previous else old, new)
        self.done += len(masks)
        return sorted(changed)

    def commit(self):
        """Main thread: record the undo step (even after a cancel: finished frames stay)."""
        return self.owner._push(self.action) if self.action.changes else self.action


class SegmentationSession:
    """MedSAM2 on one segment: prompts in slice views, propagation, undo/redo.

    volumeNode, segmentationNode: nodes of one scene; segmentId: the segment to write.
    model: what medsam2.load_model returns, or the remote client: only model.open(...) and the
    engine session's methods are used. window: (low, high), or None for the volume's display
    window/level (read once, here).
    """

    def __init__(self, volumeNode, segmentationNode, segmentId, model, memory="self-sorting", window=None,
                 axes="one", image_set=False):
        if volumeNode is None or segmentationNode is None:
            raise InputError("Select a volume and a segmentation first.")
        if not segmentId:
            raise InputError("Select a segment (or add one) first.")
        self.volume_node, self.segmentation_node, self.segment_id = volumeNode, segmentationNode, segmentId
        self.model, self.memory = model, memory
        if axes not in ("one", "all"):
            raise InputError(f"Axes must be 'one' or 'all'; got {axes!r}.")
        # axes="all": propagate along the three axes and fuse (medsam2.fusion); image_set: the
        # slices are independent 2D images, segmented without slice order (medsam2.image_set)
        self.axes, self.image_set = axes, bool(image_set)
        self.geometry = VolumeGeometry(volumeNode)
        self.window = tuple(float(v) for v in window) if window is not None else display_window(volumeNode)
        self._array = volume_array(volumeNode)
        self._segment = SegmentFrames(segmentationNode, segmentId, self.geometry)
        self._axes = {}
        self._last_axis = None
        self._undo, self._redo = [], []

    # --- introspection --------------------------------------------------------------------
    @property
    def write_log(self):
        """VTK extents written into the segment so far (each covers only changed frames)."""
        return self._segment.write_log

    @property
    def can_undo(self):
        return bool(self._undo)

    @property
    def can_redo(self):
        return bool(self._redo)

    def redoable(self, action):
        """Whether `action` (an undone one) can still be redone."""
        return any(a is action for a in self._redo)

    def layout(self, slice_normal):
        return self.geometry.layout(self.geometry.axis_for_normal(slice_normal))

    def engine_session(self, slice_normal):
        """The engine session along this view's axis (None before the first prompt there)."""
        state = self._axes.get(self.geometry.axis_for_normal(slice_normal))
        return state.engine if state else None

    def frame_index(self, ras, slice_normal=(0, 0, 1)):
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

    def read_frame(self, ras, slice_normal=(0, 0, 1)):
        """The segment's current content on the slice through `ras` (frame layout, bool)."""
        layout, frame, _, _ = self.geometry.locate(ras, slice_normal)
        return self._segment.read(layout, frame)[0]

    # --- preparing jobs (main thread) -----------------------------------------------------
    def _state(self, layout, slice_normal):
        state = self._axes.get(layout.axis)
        if state is None:
            state = self._axes[layout.axis] = AxisState(layout, slice_normal)
        state.normal = np.asarray(slice_normal, dtype=float)
        return state

    def _axis_of(self, state):
        return state.layout.axis

    def _prompt_job(self, kind, prompt, layout, slice_normal, write_result=True):
        state = self._state(layout, slice_normal)
        self._segment.segment()  # the segment may have been deleted meanwhile
        job = PromptJob(self, state, state.engine_ops(), kind, prompt, write_result)
        state.prompts.setdefault(prompt.frame, []).append(prompt)
        self._last_axis = layout.axis
        return job

    def prepare_point(self, ras, include=True, slice_normal=(0, 0, 1)):
        layout, frame, x, y = self.geometry.locate(ras, slice_normal)
        prompt = Prompt(frame, points=((x, y),), labels=(1 if include else 0,))
        return self._prompt_job("point", prompt, layout, slice_normal)

    def prepare_box(self, ras_a, ras_b, slice_normal=(0, 0, 1)):
        layout, frame_a, xa, ya = self.geometry.locate(ras_a, slice_normal)
        _, frame_b, xb, yb = self.geometry.locate(ras_b, slice_normal)
        if frame_a != frame_b:
            raise InputError(
                f"The two box corners are on different slices ({frame_a} and {frame_b}); draw the box "
                "within one slice.")
        if abs(xa - xb) < 1 and abs(ya - yb) < 1:
            raise InputError("The box is smaller than a voxel; drag out a box around the structure.")
        prompt = Prompt(frame_a, box=(min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)))
        return self._prompt_job("box", prompt, layout, slice_normal)

    def prepare_edited_slice(self, ras, slice_normal=(0, 0, 1)):
        layout, frame, _, _ = self.geometry.locate(ras, slice_normal)
        current = self._segment.read(layout, frame)[0]
        if not current.any():
            raise InputError(
                f"Segment '{self.segment_id}' is empty on this slice ({frame}); paint it in Segment Editor "
                "first, or place a point or box instead.")
        # the hand-edited slice is what the user wants: it becomes the prompt and stays as painted
        return self._prompt_job("edited slice", Prompt(frame, mask=pack(current)), layout, slice_normal,
                                write_result=False)

    def prepare_propagation(self, direction="both", start=None, slice_range=None, slice_normal=None):
        """start: refine from this frame outward; slice_range: (low, high) frames to stay within."""
        if direction not in DIRECTIONS:
            raise InputError(f"Direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}.")
        axis = self.geometry.axis_for_normal(slice_normal) if slice_normal is not None else self._last_axis
        state = self._axes.get(axis)
        prompted = sorted(f for f, p in state.prompts.items() if p) if state else []
        if not prompted:
            where = f" along {AXIS_NAMES[axis]}" if axis is not None else ""
            raise InputError(f"Nothing to propagate{where}: place a point or box on a slice first.")
        if slice_normal is not None:
            state.normal = np.asarray(slice_normal, dtype=float)
        if direction in ("up", "down"):
            # 'up' = towards larger slice offset, i.e. along the view normal
            along = float(np.dot(self.geometry.world_direction_of_axis(axis), state.normal)) > 0
            direction = "forward" if along == (direction == "up") else "backward"
        n = state.layout.num_frames
        if self.axes == "all" and (direction != "both" or start is not None or slice_range is not None):
            raise InputError("Fusing all three axes runs the whole volume in both directions: use 'both' "
                             "without a slice range or refine, or set Axes to 'one' for that.")
        if start is not None and not 0 <= int(start) < n:
            raise InputError(f"Slice {start} is outside the volume (0..{n - 1}).")
        origin = int(start) if start is not None else prompted[0]
        stop, low, high = None, 0, n - 1
        if slice_range is not None:
            low, high = sorted(int(v) for v in slice_range)
            low, high = max(low, 0), min(high, n - 1)
            if not low <= origin <= high:
                raise InputError(
                    f"The slice range {low}-{high} must include the slice propagation starts from ({origin}).")
            stop = {"forward": high, "backward": low, "both": (low, high)}[direction]
        total = {"forward": high - origin + 1, "backward": origin - low + 1,
                 "both": (high - origin + 1) + (origin - low + 1)}[direction]
        if self.axes == "all":
            total = n  # a fused run yields each fused slice once
        self._last_axis = axis
        return PropagationJob(self, state, state.engine_ops(), direction, start, stop, total)

    # --- committing (main thread) ---------------------------------------------------------
    def _commit_prompt(self, job):
        state = job.state
        if job.error is not None or job.mask is None:
            # the engine refused it: forget the prompt and make the engine forget it too
            prompts = state.prompts.get(job.frame, [])
            if job.prompt in prompts:
                prompts.remove(job.prompt)
            state.dirty.add(job.frame)
            return None
        action = Action(job.kind, state.layout.axis, prompt=job.prompt)
        if job.write_result:
            action.changes = self._segment.write(state.layout, {job.frame: job.mask})
        return self._push(action)

    def _push(self, action):
        self._undo.append(action)
        del self._undo[:-MAX_UNDO]
        self._redo.clear()
        return action

    # --- the contract: synchronous actions ------------------------------------------------
    def _run(self, job):
        try:
            job.compute()
        finally:
            action = job.commit()  # also cleans up after an engine error
        return action

    def add_point(self, ras, include=True, slice_normal=(0, 0, 1)):
        """Include (or exclude) point at RAS `ras` in the view with this normal; updates that slice."""
        return self._run(self.prepare_point(ras, include, slice_normal))

    def add_box(self, ras_a, ras_b, slice_normal=(0, 0, 1)):
        """Box from two opposite RAS corners on one slice; updates that slice."""
        return self._run(self.prepare_box(ras_a, ras_b, slice_normal))

    def use_edited_slice(self, ras, slice_normal=(0, 0, 1)):
        """The segment as it is now on this slice (e.g. after painting) becomes a mask prompt."""
        return self._run(self.prepare_edited_slice(ras, slice_normal))

    def propagate(self, direction="both", cancel=None, on_frame=None, *, start=None, slice_range=None,
                  slice_normal=None):
        """Propagate along the last prompted axis; each finished frame is written at once.

        direction: both | forward | backward (voxel index order) | up | down (along the view
        normal). cancel: a threading.Event; finished frames are kept. on_frame(frame, done, total)
        is called after each frame is written. Returns the Action (one undo step).
        """
        job = self.prepare_propagation(direction, start, slice_range, slice_normal)
        try:
            for frame, mask in job.frames(cancel):
                job.apply({frame: mask})
                if on_frame is not None:
                    on_frame(frame, job.done, job.total)
        finally:
            action = job.commit()
        return action

    # --- undo / redo (main thread, instant) -----------------------------------------------
    def _restore(self, action, which):
        state = self._axes[action.axis]
        masks = {f: unpack(rec[which]) for f, rec in action.changes.items()}
        if masks:
            self._segment.write(state.layout, masks)
        return state

    def undo(self):
        """Undo the last action exactly; returns it, or None when there is nothing to undo."""
        if not self._undo:
            return None
        action = self._undo.pop()
        state = self._restore(action, 0)
        if action.prompt is not None:
            prompts = state.prompts.get(action.prompt.frame, [])
            if prompts and prompts[-1] is action.prompt:
                prompts.pop()
            elif action.prompt in prompts:
                prompts.remove(action.prompt)
            state.dirty.add(action.prompt.frame)
        self._redo.append(action)
        return action

    def redo(self):
        """Redo the last undone action exactly; returns it, or None."""
        if not self._redo:
            return None
        action = self._redo.pop()
        state = self._restore(action, 1)
        if action.prompt is not None:
            state.prompts.setdefault(action.prompt.frame, []).append(action.prompt)
            state.dirty.add(action.prompt.frame)
            self._last_axis = action.axis
        self._undo.append(action)
        return action

    def close(self):
        """Drop the engine sessions and the undo history (frees memory; remote sessions close)."""
        for state in self._axes.values():
            engine, state.engine = state.engine, None
            if engine is not None and hasattr(engine, "close"):
                try:
                    engine.close()
                except Exception:  # closing is best effort (e.g. the server is gone)
                    pass
        self._axes.clear()
        self._undo.clear()
        self._redo.clear()
        self._last_axis = None
