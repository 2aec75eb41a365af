"""A segmentation session: one volume, its prompts and objects, propagation, corrections, cancel.

The session owns an inference state in the layout of the official SAM2VideoPredictor and drives
the predictor's own per-frame step, so `memory="sam2"` gives the official masks. What it adds:
lazy frames and a shared feature cache, prompt validation with clear messages, per-frame cancel,
re-propagation limited to a correction's span, and compact (bit-packed) storage of results.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

from .errors import InputError
from .features import release_free_memory
from .frames import FrameSource
from .predictor import BANK_KEY

DIRECTIONS = ("forward", "backward", "both")
TRIM_EVERY = 8  # frames between returns of freed heap memory to the OS (a trim costs ~1 ms)


class Session:
    def __init__(self, model, frames: FrameSource, feature_cache, bank_params=None):
        self.model = model
        self.frames = frames
        self._predictor = model.predictor
        self._lock = model.lock
        rows, cols = frames.frame_shape
        device = model.device
        # the official inference-state layout (see SAM2VideoPredictor.init_state), frames lazy
        self._state = {
            "images": frames,
            "num_frames": len(frames),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": rows,
            "video_width": cols,
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
            "feature_cache": feature_cache,
            "memory_bank_params": bank_params,  # None = stock SAM2 memory
        }
        self._masks: dict[int, dict[int, np.ndarray]] = {}  # obj_id -> frame -> packed bits
        self._prompts: list[dict] = []  # every accepted prompt, in order (replay, other axes, undo)
        # what a frame held before its first prompt, so clearing the prompts restores it exactly
        self._before_prompt: dict[tuple[int, int], tuple] = {}

    # -- facts ------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return self.frames.frame_shape

    @property
    def obj_ids(self) -> list[int]:
        return list(self._state["obj_ids"])

    @property
    def memory(self) -> str:
        return "sam2" if self._state["memory_bank_params"] is None else "self-sorting"

    def conditioning_frames(self, obj_id=None) -> list[int]:
        """Frames whose prompts condition tracking (for one object, or any)."""
        frames = set()
        for obj_idx in self._obj_indices(obj_id):
            for d in (self._state["output_dict_per_obj"][obj_idx], self._state["temp_output_dict_per_obj"][obj_idx]):
                frames.update(d["cond_frame_outputs"])
        return sorted(frames)

    def memory_bank(self, obj_id):
        """The object's self-sorting bank (None in sam2 mode); for inspection and tests."""
        idx = self._known_obj(obj_id)
        return self._state["output_dict_per_obj"][idx].get(BANK_KEY)

    def prompts(self, obj_id=None) -> list[dict]:
        """The prompts in force, oldest first: dicts of frame, obj_id, points, labels, box, mask."""
        return [dict(p) for p in self._prompts if obj_id is None or p["obj_id"] == obj_id]

    def frame_tensor(self, frame: int) -> torch.Tensor:
        """The exact normalised (3, S, S) input the model sees for this frame."""
        self._check_frame(frame)
        return self.frames[frame]

    # -- prompts ----------------------------------------------------------------------------
    def add_prompt(self, frame, obj_id=1, points=None, labels=None, box=None, mask=None) -> np.ndarray:
        """Add a prompt for one object on one frame; returns that frame's mask (rows, cols) at once.

        Points on a frame accumulate (each click refines the last result); a box starts the frame
        afresh (SAM2 needs the box before any click); a mask replaces the frame's prompts. A prompt
        on a frame that was already propagated is a correction: the frame becomes conditioning.
        """
        frame = self._check_frame(frame)
        obj_id = self._check_obj_id(obj_id)
        self._remember_before_prompt(obj_id, frame)
        if mask is not None:
            if points is not None or box is not None:
                raise InputError("give either a mask or points/box for a frame, not both")
            mask_t = self._check_mask(mask)
            with self._lock, torch.inference_mode(), self.model.autocast():
                self._discard_bank_frame(obj_id, frame)
                _, obj_ids, logits = self._predictor.add_new_mask(self._state, frame, obj_id, mask_t)
            self._forget_prompts(obj_id, frame)
            self._prompts.append(dict(frame=frame, obj_id=obj_id, points=None, labels=None, box=None,
                                      mask=mask_t.numpy().copy()))
        else:
            pts, lbl = self._check_points(points, labels)
            box_arr = self._check_box(box)
            if pts is None and box_arr is None:
                raise InputError("a prompt needs points (with labels), a box, or a mask")
            with self._lock, torch.inference_mode(), self.model.autocast():
                existing = self._state["point_inputs_per_obj"].get(
                    self._state["obj_id_to_idx"].get(obj_id), {}).get(frame)
                self._discard_bank_frame(obj_id, frame)
                _, obj_ids, logits = self._predictor.add_new_points_or_box(
                    self._state, frame, obj_id, points=pts, labels=lbl,
                    clear_old_points=box_arr is not None or existing is None, box=box_arr)
            if box_arr is not None or existing is None:
                self._forget_prompts(obj_id, frame)
            self._prompts.append(dict(frame=frame, obj_id=obj_id, points=pts, labels=lbl, box=box_arr, mask=None))
        result = self._store(frame, obj_ids, logits)
        return result[obj_id]

    def clear_prompts(self, frame, obj_id) -> None:
        """Forget one object's prompts on one frame (it is no longer conditioning).

        The frame gets back what it held before its first prompt (its propagated result, or
        nothing), so re-adding the same prompts later (redo) gives the same mask as the first time.
        """
        frame = self._check_frame(frame)
        obj_idx = self._known_obj(obj_id)
        with self._lock, torch.inference_mode():
            self._predictor.clear_all_prompts_in_frame(self._state, frame, obj_id, need_output=False)
            before = self._before_prompt.pop((obj_id, frame), None)
            if before is not None:
                out, tracked = before
                non_cond = self._state["output_dict_per_obj"][obj_idx]["non_cond_frame_outputs"]
                tracked_frames = self._state["frames_tracked_per_obj"][obj_idx]
                non_cond.pop(frame, None)
                tracked_frames.pop(frame, None)
                if out is not None:
                    non_cond[frame] = out
                if tracked is not None:
                    tracked_frames[frame] = tracked
        self._forget_prompts(obj_id, frame)

    # -- propagation ------------------------------------------------------------------------
    def propagate(self, direction="both", start=None, stop=None, cancel: threading.Event | None = None,
                  probabilities=False, axes=None):
        """Track the objects through the volume; yields (frame, {obj_id: mask}) as frames finish.

        Default (start=None): from the earliest prompted frame to the end and (for "both") back to
        the first slice, as the official predictor's forward then reverse propagate_in_video.
        With `start=f` (refine after a correction at f): from f outward, each pass stopping before
        the next conditioning frame (or at the volume's end), leaving the other slices untouched.
        `stop` is the last frame to reach: an int for forward/backward, a (low, high) pair for both.
        `cancel` is checked before every frame; finished frames are kept.
        probabilities=True yields (frame, masks, {obj_id: float32 probability (rows, cols)}) instead.
        axes="all": propagate along all three axes of the volume and fuse them (see fusion.py).
        """
        if axes not in (None, "one"):
            from .fusion import propagate_all_axes

            return propagate_all_axes(self, direction, start, stop, cancel, probabilities, axes)
        if direction not in DIRECTIONS:
            raise InputError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
        if not self._state["obj_ids"]:
            raise InputError("nothing to propagate: add a prompt first")
        for obj_id in self.obj_ids:
            if not self.conditioning_frames(obj_id):
                raise InputError(f"object {obj_id} has no prompts left; add one, or remove the object")
        cond = self.conditioning_frames()
        refine = start is not None
        start = self._check_frame(start) if refine else cond[0]
        low_stop, high_stop = self._check_stop(direction, start, stop)
        passes = []
        if direction in ("forward", "both"):
            end = self.num_frames - 1
            if refine:
                end = min([c - 1 for c in cond if c > start] + [end])
            passes.append((False, start, end if high_stop is None else min(end, high_stop)))
        if direction in ("backward", "both"):
            end = 0
            if refine:
                end = max([c + 1 for c in cond if c < start] + [end])
            passes.append((True, start, end if low_stop is None else max(end, low_stop)))
        return self._run_passes(passes, cancel, probabilities)  # validated before the first frame is asked for

    def _run_passes(self, passes, cancel, probabilities):
        for reverse, first, last in passes:
            finished = yield from self._run_pass(reverse, first, last, cancel, probabilities)
            if not finished:
                return

    def _run_pass(self, reverse, first, last, cancel, probabilities=False):
        """One official-style propagation pass; returns False if cancelled."""
        step = -1 if reverse else 1
        if (last - first) * step < 0:
            return True
        order = range(first, last + step, step)
        prefetcher = self.model.prefetcher(self._state, order)
        try:
            finished = yield from self._track_frames(order, reverse, first, cancel, probabilities, prefetcher)
        finally:
            if prefetcher is not None:
                prefetcher.stop()
                self._state.pop("prefetcher", None)
        return finished

    def _track_frames(self, order, reverse, first, cancel, probabilities, prefetcher):
        with self._lock, torch.inference_mode():
            self._predictor.propagate_in_video_preflight(self._state)
            for obj_idx, out_dict in self._state["output_dict_per_obj"].items():
                bank = out_dict.get(BANK_KEY)
                if bank is not None:  # memories of slices about to be redone are stale
                    bank.discard(f for f in order if f != first)
        for position, frame in enumerate(order):
            if cancel is not None and cancel.is_set():
                return False
            if prefetcher is not None:
                prefetcher.advance(position)
            if position % TRIM_EVERY == TRIM_EVERY - 1:
                release_free_memory()
            with self._lock, torch.inference_mode(), self.model.autocast():
                logits = self._track_frame(frame, reverse)
                _, video_res = self._predictor._get_orig_video_res_output(self._state, logits)
                masks = self._store(frame, self._state["obj_ids"], video_res)
                if probabilities:
                    probs = torch.sigmoid(video_res[:, 0].float()).cpu().numpy()
                    obj_probs = {o: probs[i] for i, o in enumerate(self._state["obj_ids"])}
            yield (frame, masks, obj_probs) if probabilities else (frame, masks)
        return True

    def _track_frame(self, frame, reverse):
        """All objects' mask logits on one frame (conditioning frames reuse their prompt result)."""
        state, predictor = self._state, self._predictor
        per_obj = []
        for obj_idx in range(len(state["obj_ids"])):
            out_dict = state["output_dict_per_obj"][obj_idx]
            cond_out = out_dict["cond_frame_outputs"].get(frame)
            if cond_out is not None:
                logits = cond_out["pred_masks"].to(state["device"], non_blocking=True)
            else:
                out, logits = predictor._run_single_frame_inference(
                    inference_state=state, output_dict=out_dict, frame_idx=frame, batch_size=1,
                    is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                    run_mem_encoder=True)
                out_dict["non_cond_frame_outputs"][frame] = out
            state["frames_tracked_per_obj"][obj_idx][frame] = {"reverse": reverse}
            per_obj.append(logits)
        return torch.cat(per_obj, dim=0)

    # -- results ----------------------------------------------------------------------------
    def mask(self, obj_id) -> np.ndarray:
        """The object's mask over the whole volume, bool (slices, rows, cols)."""
        self._known_obj(obj_id)
        rows, cols = self.frame_shape
        out = np.zeros((self.num_frames, rows, cols), dtype=bool)
        for frame, packed in self._masks.get(obj_id, {}).items():
            out[frame] = self._unpack(packed)
        return out

    def masks(self) -> np.ndarray:
        """All objects as a uint16 label volume (value = obj_id; a later object wins an overlap)."""
        rows, cols = self.frame_shape
        labels = np.zeros((self.num_frames, rows, cols), dtype=np.uint16)
        for obj_id in self.obj_ids:
            for frame, packed in self._masks.get(obj_id, {}).items():
                labels[frame][self._unpack(packed)] = obj_id
        return labels

    def frame_masks(self, frame) -> dict:
        """Every object's current mask on one frame."""
        frame = self._check_frame(frame)
        rows, cols = self.frame_shape
        return {o: self._unpack(self._masks[o][frame]) if frame in self._masks.get(o, {})
                else np.zeros((rows, cols), bool) for o in self.obj_ids}

    def remove_object(self, obj_id) -> None:
        self._known_obj(obj_id)
        with self._lock, torch.inference_mode():
            self._predictor.remove_object(self._state, obj_id, strict=True, need_output=False)
        self._masks.pop(obj_id, None)
        self._prompts = [p for p in self._prompts if p["obj_id"] != obj_id]
        self._before_prompt = {k: v for k, v in self._before_prompt.items() if k[0] != obj_id}

    def reset(self) -> None:
        """Forget every prompt, object and result; cached image features are kept."""
        with self._lock, torch.inference_mode():
            self._predictor.reset_state(self._state)
        self._masks.clear()
        self._prompts.clear()
        self._before_prompt.clear()

    def close(self) -> None:
        self.reset()

    # -- internals --------------------------------------------------------------------------
    def _store(self, frame, obj_ids, video_res_logits) -> dict:
        masks = (video_res_logits[:, 0] > 0.0).cpu().numpy()
        result = {}
        for i, obj_id in enumerate(obj_ids):
            result[obj_id] = masks[i]
            self._masks.setdefault(obj_id, {})[frame] = np.packbits(masks[i])
        return result

    def _unpack(self, packed) -> np.ndarray:
        rows, cols = self.frame_shape
        return np.unpackbits(packed, count=rows * cols).reshape(rows, cols).astype(bool)

    def _discard_bank_frame(self, obj_id, frame):
        idx = self._state["obj_id_to_idx"].get(obj_id)
        if idx is not None:
            bank = self._state["output_dict_per_obj"][idx].get(BANK_KEY)
            if bank is not None:  # a conditioning frame is never a bank entry
                bank.discard([frame])

    def _remember_before_prompt(self, obj_id, frame):
        if (obj_id, frame) in self._before_prompt:
            return
        idx = self._state["obj_id_to_idx"].get(obj_id)
        if idx is None:
            self._before_prompt[(obj_id, frame)] = (None, None)
            return
        out_dict = self._state["output_dict_per_obj"][idx]
        if frame in out_dict["cond_frame_outputs"]:
            return  # already conditioning with no record: nothing earlier to restore
        self._before_prompt[(obj_id, frame)] = (out_dict["non_cond_frame_outputs"].get(frame),
                                                self._state["frames_tracked_per_obj"][idx].get(frame))

    def _forget_prompts(self, obj_id, frame):
        self._prompts = [p for p in self._prompts if not (p["obj_id"] == obj_id and p["frame"] == frame)]

    def _obj_indices(self, obj_id):
        if obj_id is None:
            return list(range(len(self._state["obj_ids"])))
        return [self._known_obj(obj_id)]

    def _known_obj(self, obj_id) -> int:
        idx = self._state["obj_id_to_idx"].get(obj_id)
        if idx is None:
            raise InputError(f"unknown object id {obj_id!r}; known: {self.obj_ids}")
        return idx

    def _check_obj_id(self, obj_id) -> int:
        if isinstance(obj_id, (bool, np.bool_)) or not isinstance(obj_id, (int, np.integer)) or obj_id < 1:
            raise InputError(f"obj_id must be a positive integer; got {obj_id!r}")
        return int(obj_id)

    def _check_frame(self, frame) -> int:
        if isinstance(frame, (bool, np.bool_)) or not isinstance(frame, (int, np.integer)):
            raise InputError(f"frame must be an integer slice index; got {frame!r}")
        if not 0 <= frame < self.num_frames:
            raise InputError(f"frame {frame} is outside the volume (frames 0..{self.num_frames - 1})")
        return int(frame)

    def _check_xy(self, what, x, y):
        rows, cols = self.frame_shape
        # a pixel covers [-0.5, n - 0.5) around its centre; continuous positions inside are valid
        if not (np.isfinite(x) and -0.5 <= x <= cols - 0.5):
            raise InputError(f"{what}: x={x:g} is outside the frame (columns 0..{cols - 1})")
        if not (np.isfinite(y) and -0.5 <= y <= rows - 0.5):
            raise InputError(f"{what}: y={y:g} is outside the frame (rows 0..{rows - 1})")

    def _check_points(self, points, labels):
        if points is None and labels is None:
            return None, None
        if points is None or labels is None:
            raise InputError("points and labels must be given together (labels: 1 include, 0 exclude)")
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 1 and pts.size == 2:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise InputError(f"points must be an (N, 2) array of (x=col, y=row); got shape {pts.shape}")
        lbl = np.asarray(labels).reshape(-1)
        if len(lbl) != len(pts):
            raise InputError(f"got {len(pts)} points but {len(lbl)} labels")
        if not np.isin(lbl, (0, 1)).all():
            raise InputError(f"labels must be 1 (include) or 0 (exclude); got {lbl.tolist()}")
        for i, (x, y) in enumerate(pts):
            self._check_xy(f"point {i}", x, y)
        return pts.astype(np.float32), lbl.astype(np.int32)

    def _check_box(self, box):
        if box is None:
            return None
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.size != 4:
            raise InputError(f"box must be (x0, y0, x1, y1); got {np.asarray(box).tolist()}")
        x0, x1 = sorted((b[0], b[2]))
        y0, y1 = sorted((b[1], b[3]))
        self._check_xy("box corner (x0, y0)", x0, y0)
        self._check_xy("box corner (x1, y1)", x1, y1)
        return np.array([x0, y0, x1, y1], dtype=np.float32)

    def _check_mask(self, mask):
        m = np.asarray(mask)
        if m.shape != self.frame_shape:
            raise InputError(f"mask shape {m.shape} does not match the frame (rows, cols) {self.frame_shape}")
        return torch.from_numpy(m.astype(bool))

    def _check_stop(self, direction, start, stop):
        if stop is None:
            return None, None
        if direction == "both":
            try:
                low, high = (self._check_frame(s) for s in stop)
            except TypeError:
                raise InputError("for direction 'both', stop is a (low, high) pair of frames") from None
            if not low <= start <= high:
                raise InputError(f"stop range ({low}, {high}) must contain the start frame {start}")
            return low, high
        stop = self._check_frame(stop)
        if direction == "forward" and stop < start:
            raise InputError(f"forward propagation cannot stop at {stop}, before its start frame {start}")
        if direction == "backward" and stop > start:
            raise InputError(f"backward propagation cannot stop at {stop}, after its start frame {start}")
        return (stop, None) if direction == "backward" else (None, stop)
