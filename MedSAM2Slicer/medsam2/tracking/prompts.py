"""Prompts: checking what a user gives a session, and keeping the history of accepted prompts.

Checks raise InputError with a message that names the wrong value and the valid range. They take
the shape of the frame being prompted, so a volume (one shape) and an image set (one shape per
image) share them. `place` words the messages: "the frame" for a volume, "this image" for an image.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError
from ..masks import mask_shape_error
from ..options import DIRECTIONS


def check_frame(frame, num_frames: int) -> int:
    if isinstance(frame, (bool, np.bool_)) or not isinstance(frame, (int, np.integer)):
        raise InputError(f"frame must be an integer slice index; got {frame!r}")
    if not 0 <= frame < num_frames:
        raise InputError(f"frame {frame} is outside the volume (frames 0..{num_frames - 1})")
    return int(frame)


def check_obj_id(obj_id) -> int:
    if isinstance(obj_id, (bool, np.bool_)) or not isinstance(obj_id, (int, np.integer)) or obj_id < 1:
        raise InputError(f"obj_id must be a positive integer; got {obj_id!r}")
    return int(obj_id)


def check_direction(direction) -> str:
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}; got {direction!r}")
    return direction


def _check_xy(what, x, y, shape, place):
    rows, cols = shape
    # a pixel covers [-0.5, n - 0.5) around its centre; continuous positions inside are valid
    if not (np.isfinite(x) and -0.5 <= x <= cols - 0.5):
        raise InputError(f"{what}: x={x:g} is outside {place} (columns 0..{cols - 1})")
    if not (np.isfinite(y) and -0.5 <= y <= rows - 0.5):
        raise InputError(f"{what}: y={y:g} is outside {place} (rows 0..{rows - 1})")


def check_points(points, labels, shape, place="the frame"):
    """(N, 2) float32 (x=col, y=row) points and int32 labels, or (None, None) when neither is given."""
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
        _check_xy(f"point {i}", x, y, shape, place)
    return pts.astype(np.float32), lbl.astype(np.int32)


def check_box(box, shape, place="the frame"):
    """(x0, y0, x1, y1) float32 with x0 <= x1, y0 <= y1, or None."""
    if box is None:
        return None
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.size != 4:
        raise InputError(f"box must be (x0, y0, x1, y1); got {np.asarray(box).tolist()}")
    x0, x1 = sorted((b[0], b[2]))  # corners in any order
    y0, y1 = sorted((b[1], b[3]))
    if not (x1 > x0 and y1 > y0):  # SAM2 would take a line as a box and segment something anyway
        side = "width (x0 == x1)" if not x1 > x0 else "height (y0 == y1)"
        raise InputError(f"box {np.round(b, 2).tolist()} in {place} has zero {side}; a box needs two opposite "
                         "corners apart in both directions")
    _check_xy("box corner (x0, y0)", x0, y0, shape, place)
    _check_xy("box corner (x1, y1)", x1, y1, shape, place)
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def check_mask(mask, shape, place="the frame") -> torch.Tensor:
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise mask_shape_error(m.shape, shape, place)
    return torch.from_numpy(m.astype(bool))


def check_stop(direction, start, stop, num_frames):
    """(low, high) frames a propagation may reach (None = no limit on that side)."""
    if stop is None:
        return None, None
    if direction == "both":
        try:
            low, high = (check_frame(s, num_frames) for s in stop)
        except TypeError:
            raise InputError("for direction 'both', stop is a (low, high) pair of frames") from None
        if not low <= start <= high:
            raise InputError(f"stop range ({low}, {high}) must contain the start frame {start}")
        return low, high
    stop = check_frame(stop, num_frames)
    if direction == "forward" and stop < start:
        raise InputError(f"forward propagation cannot stop at {stop}, before its start frame {start}")
    if direction == "backward" and stop > start:
        raise InputError(f"backward propagation cannot stop at {stop}, after its start frame {start}")
    return (stop, None) if direction == "backward" else (None, stop)


class PromptBook:
    """The prompts in force, oldest first, and what each prompted frame held before its first prompt.

    The "before" record (whatever the tracking state hands over: the frame's tracked output, its
    bank entry) is what undo (clearing the frame's prompts) restores, so redo gives the same result.
    """

    def __init__(self):
        self._prompts: list[dict] = []
        self._before: dict[tuple[int, int], object] = {}

    def prompts(self, obj_id=None) -> list[dict]:
        return [dict(p) for p in self._prompts if obj_id is None or p["obj_id"] == obj_id]

    def add(self, prompt: dict, starts_afresh: bool) -> None:
        """Record a prompt; `starts_afresh` (a box, a mask, a frame's first click) drops the frame's earlier ones."""
        if starts_afresh:
            self.forget(prompt["obj_id"], prompt["frame"])
        self._prompts.append(prompt)

    def forget(self, obj_id, frame) -> None:
        self._prompts = [p for p in self._prompts if not (p["obj_id"] == obj_id and p["frame"] == frame)]

    def has_before(self, obj_id, frame) -> bool:
        return (obj_id, frame) in self._before

    def keep_before(self, obj_id, frame, record) -> None:
        self._before[(obj_id, frame)] = record

    def pop_before(self, obj_id, frame):
        return self._before.pop((obj_id, frame), None)

    def drop_object(self, obj_id) -> None:
        self._prompts = [p for p in self._prompts if p["obj_id"] != obj_id]
        self._before = {k: v for k, v in self._before.items() if k[0] != obj_id}

    def clear(self) -> None:
        self._prompts.clear()
        self._before.clear()
