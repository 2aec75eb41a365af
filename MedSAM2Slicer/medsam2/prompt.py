"""One prompt value, and its one codec.

A prompt (points with labels, a box, or a mask, for one object on one frame) is made once, where a
user gives it (a click in Slicer, a request to the server, a prompts file), as a `Prompt`, and
crosses every boundary in the same JSON form (`to_json` / `from_json`): Slicer to its engine child,
a client to the server. A mask prompt stays packed (`PackedMask`) until the engine uses it.
Numpy only: Slicer's process uses it before torch is installed.

Only what the form itself needs is checked here (integers where JSON could carry 3.0, pairs that
are pairs); ranges and labels are the engine's to check, with the messages a local caller sees
(tracking/prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .masks import PackedMask, decode_packed, encode_mask, mask_shape_error

MAX_OBJ_ID = int(np.iinfo(np.uint16).max)  # label maps store object ids as uint16


@dataclass(frozen=True, eq=False)  # compared by identity: two identical clicks are two prompts
class Prompt:
    frame: int
    obj_id: int = 1
    points: tuple | None = None   # ((x=col, y=row), ...)
    labels: tuple | None = None   # (1 include | 0 exclude, ...)
    box: tuple | None = None      # (x0, y0, x1, y1)
    mask: PackedMask | None = None

    @classmethod
    def make(cls, frame, obj_id=1, points=None, labels=None, box=None, mask=None) -> "Prompt":
        """A prompt from what a caller has at hand (arrays, lists, a bool mask)."""
        if mask is not None and not isinstance(mask, PackedMask):
            m = np.asarray(mask)
            if m.ndim != 2:
                raise mask_shape_error(m.shape, ("rows", "cols"))
            mask = PackedMask.of(m)
        return cls(frame=as_integer(frame, "frame"), obj_id=as_obj_id(obj_id), points=_points(points),
                   labels=None if labels is None else tuple(np.asarray(labels).reshape(-1).tolist()),
                   box=None if box is None else tuple(float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)),
                   mask=mask)

    def arguments(self) -> dict:
        """The engine session's add_prompt keywords (a mask is unpacked here, where it is used)."""
        return {"frame": self.frame, "obj_id": self.obj_id,
                "points": None if self.points is None else np.asarray(self.points, dtype=np.float64).reshape(-1, 2),
                "labels": None if self.labels is None else np.asarray(self.labels),
                "box": None if self.box is None else np.asarray(self.box, dtype=np.float64),
                "mask": None if self.mask is None else self.mask.unpack()}

    def to_json(self) -> dict:
        data = {"frame": self.frame, "obj_id": self.obj_id}
        for name in ("points", "labels", "box"):
            value = getattr(self, name)
            if value is not None:
                data[name] = [list(v) for v in value] if name == "points" else list(value)
        if self.mask is not None:
            data["mask"] = encode_mask(self.mask)
        return data

    @classmethod
    def from_json(cls, data: dict, mask_shape=None, max_points: int | None = None) -> "Prompt":
        """The inverse of to_json. mask_shape: the (rows, cols) a mask must have (checked before it
        is decoded); max_points: refuse more points or labels than that (a server's limit)."""
        if not isinstance(data, dict):
            raise InputError("a prompt must be a JSON object with frame, obj_id and points/labels, box or mask")
        for name in ("points", "labels"):
            values = data.get(name)
            if values is not None and max_points is not None and len(values) > max_points:
                raise InputError(f"a prompt may carry at most {max_points} {name} on this server; this one has "
                                 f"{len(values)}: send fewer (points on a frame add up over several prompts)")
        points = data.get("points")
        if points is not None:
            for i, point in enumerate(points):
                if not isinstance(point, (list, tuple)) or len(point) != 2:
                    raise InputError(f"points must be (x, y) pairs; point {i} is {point!r}")
        box = data.get("box")
        if box is not None and len(box) > 4:
            raise InputError(f"box must be (x0, y0, x1, y1); got {len(box)} numbers")
        mask = data.get("mask")
        if mask is not None:
            mask = decode_packed(mask, shape=mask_shape)
        return cls.make(data.get("frame"), data.get("obj_id", 1), points, data.get("labels"), box, mask)


def as_integer(value, name: str) -> int:
    """Integers only, as the engine wants (JSON would quietly turn 3.0 into 3)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer; got {value!r}")
    return int(value)


def as_obj_id(value) -> int:
    obj_id = as_integer(value, "obj_id")
    if obj_id > MAX_OBJ_ID:
        raise InputError(f"obj_id {obj_id} is over {MAX_OBJ_ID}: label maps store object ids as uint16")
    return obj_id


def _points(points) -> tuple | None:
    if points is None:
        return None
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1 and pts.size == 2:
        pts = pts[None]
    if pts.ndim != 2 or (pts.size and pts.shape[1] != 2):
        raise InputError(f"points must be an (N, 2) array of (x=col, y=row); got shape {pts.shape}")
    return tuple((float(x), float(y)) for x, y in pts)


def hold_prompts(session, frame: int, obj_id: int, prompts: list[Prompt]) -> None:
    """Make an engine session hold exactly `prompts` for one object on one frame: its earlier
    prompts there are cleared, then these are added in order (replay after an undo, a redo or a
    restart of the engine)."""
    if obj_id in session.obj_ids:
        session.clear_prompts(frame, obj_id)
    for prompt in prompts:
        if (prompt.frame, prompt.obj_id) != (frame, obj_id):
            raise InputError(f"a prompt for frame {prompt.frame}, object {prompt.obj_id} cannot be held on frame "
                             f"{frame} for object {obj_id}")
        session.add_prompt(**prompt.arguments())
