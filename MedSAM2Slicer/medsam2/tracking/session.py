"""A segmentation session: one volume, its prompts and objects, propagation, corrections, cancel.

The session drives the official SAM2VideoPredictor's own per-frame step on an inference state in
the official layout, so `memory="sam2"` gives the official masks. It is the public face of parts
with one role each: prompt checks and history (prompts.py), SAM2's state and the per-object
facts in it (tracking_state.py), the propagation passes (propagation.py), the results
(mask_store.py) and the memory trace (memory_trace.py). What they add to SAM2: lazy frames and a
shared feature cache, prompt validation with clear messages, per-frame cancel, re-propagation
limited to a correction's span, undo that restores the memory bank, and bit-packed results.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..errors import InputError
from ..masks import PackedMask
from .frames import FrameSource
from .mask_store import MaskStore
from .memory_bank import BankParams, SelfSortingMemoryBank
from .memory_trace import MemoryTrace
from .prompts import PromptBook, check_box, check_direction, check_frame, check_mask, check_obj_id, check_points, \
    check_stop
from .propagation import Propagator, keep_logits, plan_passes
from .review import FlagRule, SliceRecord, review_rows
from .refine import AgreementRule, PropagationReport, check_until
from .tracking_state import TrackingState


class Session:
    # how prompt-check messages name the place a prompt is on ("this image" in an image set)
    _place = "the frame"

    def __init__(self, model, frames: FrameSource, feature_cache, bank_params: BankParams | None = None):
        self.model = model
        self.frames = frames
        self._predictor = model.predictor
        self._lock = model.lock
        self._tracking = TrackingState(frames, feature_cache, model.device, bank_params, self._shape_of)
        self._results = MaskStore(self._shape_of)
        self._book = PromptBook()
        self._trace = MemoryTrace()
        self._propagator = Propagator(model, self._tracking, self._results, self._trace)

    def _shape_of(self, frame: int) -> tuple[int, int]:
        """(rows, cols) of one frame's mask: the volume's for every frame (image sets: each image's)."""
        return self.frames.frame_shape

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.frames.frame_shape

    @property
    def obj_ids(self) -> list[int]:
        return self._tracking.obj_ids

    @property
    def memory(self) -> str:
        return "sam2" if self.bank_params is None else "self-sorting"

    @property
    def bank_params(self) -> BankParams | None:
        """The self-sorting bank's settings (None in sam2 mode): open another session like this one."""
        return self._tracking.bank_params

    @property
    def feature_cache(self):
        """The cache of encoded frames, shared by the sessions on the same frames."""
        return self._tracking.feature_cache

    def conditioning_frames(self, obj_id=None) -> list[int]:
        """Frames whose prompts condition tracking (for one object, or any)."""
        return self._tracking.conditioning_frames(obj_id)

    def memory_bank(self, obj_id) -> SelfSortingMemoryBank | None:
        """The object's self-sorting bank (None in sam2 mode); for inspection and tests."""
        return self._tracking.bank(self._tracking.known(obj_id))

    def memory_trace(self) -> list[dict]:
        """One record per tracked (frame, object), in tracking order: what it attended to, what the
        bank held after it (fields: memory_trace.py, docs/memory-bank.md). Both memory modes."""
        return self._trace.records()

    def prompts(self, obj_id=None) -> list[dict]:
        """The prompts in force, oldest first: dicts of frame, obj_id, points, labels, box, mask."""
        return self._book.prompts(obj_id)

    def frame_tensor(self, frame: int) -> torch.Tensor:
        """The exact normalised (3, S, S) input the model sees for this frame."""
        return self.frames[check_frame(frame, self.num_frames)]

    # -- prompts ----------------------------------------------------------------------------
    def add_prompt(self, frame, obj_id=1, points=None, labels=None, box=None, mask=None, packed=False):
        """Add a prompt for one object on one frame; returns that frame's mask (rows, cols) at once
        (packed=True: as a PackedMask, for a caller that passes it on across a process boundary).

        Points on a frame accumulate (each click refines the last result); a box starts the frame
        afresh (SAM2 needs the box before any click); a mask replaces the frame's prompts. A prompt
        on a frame that was already propagated is a correction: the frame becomes conditioning
        (and leaves the object's memory bank).
        """
        frame = check_frame(frame, self.num_frames)
        obj_id = check_obj_id(obj_id)
        shape = self._shape_of(frame)
        if mask is not None:
            if points is not None or box is not None:
                raise InputError("give either a mask or points/box for a frame, not both")
            mask_t = check_mask(mask, shape, self._place)
            prompt = dict(frame=frame, obj_id=obj_id, points=None, labels=None, box=None, mask=mask_t.numpy().copy())
        else:
            pts, lbl = check_points(points, labels, shape, self._place)
            box_arr = check_box(box, shape, self._place)
            if pts is None and box_arr is None:
                raise InputError("a prompt needs points (with labels), a box, or a mask")
            prompt = dict(frame=frame, obj_id=obj_id, points=pts, labels=lbl, box=box_arr, mask=None)
        state = self._tracking.inference_state
        with self._lock, torch.inference_mode(), self.model.autocast():
            self._tracking.use_frame(frame)
            first_here = not self._book.has_before(obj_id, frame)
            before = self._tracking.leave_for_prompt(obj_id, frame) if first_here else None
            shown = self._results.kept(obj_id, frame)
            try:
                if mask is not None:
                    starts_afresh = True
                    _, obj_ids, logits = self._predictor.add_new_mask(state, frame, obj_id, mask_t)
                else:
                    existing = state["point_inputs_per_obj"].get(self._tracking.index_of(obj_id), {}).get(frame)
                    starts_afresh = box_arr is not None or existing is None
                    _, obj_ids, logits = self._predictor.add_new_points_or_box(
                        state, frame, obj_id, points=pts, labels=lbl, clear_old_points=starts_afresh, box=box_arr)
            except BaseException:
                if before is not None and self._tracking.index_of(obj_id) is not None:
                    self._tracking.restore_before_prompt(obj_id, frame, before)
                raise
            if before is not None:
                self._book.keep_before(obj_id, frame, (before, shown))
            verdict = self._predictor.last_verdict
            masks = keep_logits(self._results, frame, obj_ids, logits,
                                {obj_id: SliceRecord(verdict.confidence, verdict.object_score, "prompt")})
        self._book.add(prompt, starts_afresh)
        return PackedMask.of(masks[obj_id]) if packed else masks[obj_id]

    def clear_prompts(self, frame, obj_id) -> None:
        """Forget one object's prompts on one frame (it is no longer conditioning): undo of a prompt.

        The frame gets back what it held before its first prompt (its propagated result and mask,
        or nothing) and so does the object's memory bank (the frame's entry at its place, the
        read's generator state), so re-adding the same prompts later (redo) gives the same masks
        and bank.
        """
        frame = check_frame(frame, self.num_frames)
        self._tracking.known(obj_id)
        with self._lock, torch.inference_mode():
            self._tracking.use_frame(frame)
            self._predictor.clear_all_prompts_in_frame(self._tracking.inference_state, frame, obj_id,
                                                       need_output=False)
            self._tracking.memory_changed(obj_id)  # the frame's conditioning memory is gone
            before = self._book.pop_before(obj_id, frame)
            if before is not None:
                tracked, shown = before
                self._tracking.restore_before_prompt(obj_id, frame, tracked)
                self._results.restore(obj_id, frame, shown)
        self._book.forget(obj_id, frame)

    def prepare(self, frame) -> None:
        """Make a click on `frame` cheap: compute what it needs except the prompt, under the memory
        as it stands now (blocking, idempotent; cheap when already prepared). That is the frame's
        image features and, for each object tracked there, its memory-conditioned features; a click
        then runs only the prompt encoder and mask decoder, with exactly the mask it would give
        without this (prepared.py says when the prepared state is dropped)."""
        frame = check_frame(frame, self.num_frames)
        state, prepared = self._tracking.inference_state, self._tracking.prepared
        with self._lock, torch.inference_mode(), self.model.autocast():
            prepared.touch(frame)
            self.feature_cache.keep_in_ram(frame)  # the click reads its image features from RAM
            todo = []
            for obj_idx, obj_id in enumerate(state["obj_ids"]):
                tracked = state["frames_tracked_per_obj"][obj_idx].get(frame)
                if tracked is not None and prepared.get(frame, obj_id, tracked["reverse"]) is None:
                    todo.append((obj_idx, obj_id, tracked["reverse"]))
            if not todo:  # untracked here, or already prepared: a click needs the image features
                if frame not in self.feature_cache:
                    self._predictor._get_image_feature(state, frame, 1)
                return
            for obj_idx, obj_id, reverse in todo:
                entry = self._predictor.prepared_features(state, self._tracking.outputs(obj_idx), frame, reverse,
                                                          prepared.version(obj_id))
                prepared.put(frame, obj_id, entry)

    # -- propagation ------------------------------------------------------------------------
    def propagate(self, direction="both", start=None, stop=None, cancel: threading.Event | None = None,
                  probabilities=False, axes=None, packed=False, until: str | None = None):
        """Track the objects through the volume; yields (frame, {obj_id: mask}) as frames finish.

        Default (start=None): from the earliest prompted frame to the end and (for "both") back to
        the first slice, as the official predictor's forward then reverse propagate_in_video.
        With `start=f` (refine after a correction at f): from f outward, leaving the other slices
        untouched. until="agreement" (the refine's default) stops a direction once the new masks
        agree with the previous ones on a few consecutive slices (refine.py); until="conditioning"
        stops it only before the next conditioning frame (or at the volume's end).
        `stop` is the last frame to reach: an int for forward/backward, a (low, high) pair for both.
        Each frame is yielded once, with the result the session keeps: "forward" yields start..high,
        "backward" start..low, "both" start+1..high then start..low (the backward pass tracks the
        start frame again, as SAM2 does; a call cancelled before that yields it last).
        `cancel` is checked before every frame; finished frames are kept.
        Where and why each direction stopped: `last_propagation` (also the generator's return value).
        probabilities=True yields (frame, masks, {obj_id: float32 probability (rows, cols)}) instead.
        axes="all": propagate along all three axes of the volume and fuse them (see fusion.py).
        packed=True yields each mask as a PackedMask (for a caller that passes it on).
        """
        refine = start is not None
        until = check_until(until, refine)
        if packed:
            return _packed_items(self.propagate(direction, start, stop, cancel, probabilities, axes, until=until))
        if axes not in (None, "one"):
            from .fusion import propagate_all_axes

            return propagate_all_axes(self, direction, start, stop, cancel, probabilities, axes)
        check_direction(direction)
        if not self.obj_ids:
            raise InputError("nothing to propagate: add a prompt first")
        for obj_id in self.obj_ids:
            if not self.conditioning_frames(obj_id):
                raise InputError(f"object {obj_id} has no prompts left; add one, or remove the object")
        cond = self.conditioning_frames()
        start = check_frame(start, self.num_frames) if refine else cond[0]
        low, high = check_stop(direction, start, stop, self.num_frames)
        passes = plan_passes(direction, start, cond, self.num_frames, low, high, refine)
        report = PropagationReport(start, refine, until)
        agreement = AgreementRule(start) if until == "agreement" else None
        # validated before the first frame is asked for
        return self._propagator.run(passes, cancel, probabilities, report, agreement,
                                    "refined" if refine else "propagated")

    @property
    def last_propagation(self) -> PropagationReport | None:
        """The latest propagate call's report, filled as it runs: per direction the frames
        re-tracked and why it stopped ("agreement", "conditioning", "end", "stop", "cancelled")."""
        return self._propagator.last_report

    # -- results ----------------------------------------------------------------------------
    def mask(self, obj_id) -> np.ndarray:
        """The object's mask over the whole volume, bool (slices, rows, cols)."""
        self._tracking.known(obj_id)
        rows, cols = self.frame_shape
        out = np.zeros((self.num_frames, rows, cols), dtype=bool)
        for frame in self._results.frames(obj_id):
            out[frame] = self._results.get(obj_id, frame)
        return out

    def masks(self) -> np.ndarray:
        """All objects as a uint16 label volume (value = obj_id; a later object wins an overlap)."""
        rows, cols = self.frame_shape
        labels = np.zeros((self.num_frames, rows, cols), dtype=np.uint16)
        for obj_id in self.obj_ids:
            for frame in self._results.frames(obj_id):
                labels[frame][self._results.get(obj_id, frame)] = obj_id
        return labels

    def frame_masks(self, frame) -> dict:
        """Every object's current mask on one frame."""
        frame = check_frame(frame, self.num_frames)
        return {o: self._results.get(o, frame) for o in self.obj_ids}

    def review(self, obj_id=None, rule: FlagRule | None = None) -> list[dict]:
        """Per (frame, object) with a result, frames ascending: what the decoder said and whether
        the slice is worth a look. Keys: frame, obj_id, confidence (the chosen mask's predicted
        IoU, 0.0 where the object score says absent), object_score (logit), area (pixels of the
        kept mask), change (|area - previous slice's| / max of the two, 1), source ("prompt",
        "propagated", "refined"), flagged and reason (the rule: review.py, docs/review.md)."""
        obj_ids = self.obj_ids if obj_id is None else [obj_id]
        for o in obj_ids:
            self._tracking.known(o)
        return review_rows(obj_ids, self._results.records, self._results.area,
                           ordered=not getattr(self, "is_image_set", False), rule=rule)

    def replace_masks(self, obj_id, volume: np.ndarray) -> None:
        """Make `volume` (bool, (slices, rows, cols)) the object's result on every frame, as
        mask() / masks() / frame_masks() return it (multi-axis fusion writes its result here).
        Tracking state and memory are untouched: a later propagation starts from them."""
        self._tracking.known(obj_id)
        volume = np.asarray(volume, dtype=bool)
        if volume.shape != (self.num_frames, *self.frame_shape):
            raise InputError(f"masks of shape {volume.shape} do not fit the session's "
                             f"{(self.num_frames, *self.frame_shape)}")
        self._results.replace(obj_id, volume)

    # -- objects ----------------------------------------------------------------------------
    def remove_object(self, obj_id) -> None:
        self._tracking.known(obj_id)
        with self._lock, torch.inference_mode():
            self._predictor.remove_object(self._tracking.inference_state, obj_id, strict=True, need_output=False)
            self._tracking.memory_changed()
        self._results.drop(obj_id)
        self._book.drop_object(obj_id)
        self._trace.drop_object(obj_id)

    def reset(self) -> None:
        """Forget every prompt, object, result and trace record; cached image features are kept."""
        with self._lock, torch.inference_mode():
            self._predictor.reset_state(self._tracking.inference_state)
            self._tracking.memory_changed()
        self._results.clear()
        self._book.clear()
        self._trace.clear()

    def close(self) -> None:
        self.reset()


def _packed_items(items):
    for frame, masks, *rest in items:
        yield (frame, {o: PackedMask.of(m) for o, m in masks.items()}, *rest)
