"""A session's results: one bit-packed mask per (object, frame), unpacked on demand, and beside
each mask the decoder's record of it (review.SliceRecord), so that whatever brings a mask back
(undo, redo) brings its record back too.

A 300-slice 512 x 512 volume is 78 MB of bool per object unpacked, 10 MB packed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..masks import pack_mask, unpack_mask
from .review import SliceRecord

# what one (object, frame) keeps: the mask's bits and the decoder's record (None: no record)
Kept = tuple[np.ndarray, SliceRecord | None]


class MaskStore:
    def __init__(self, shape_of: Callable[[int], tuple[int, int]]):
        self._shape_of = shape_of  # (rows, cols) of a frame: one shape for a volume, one per image for a set
        self._kept: dict[int, dict[int, Kept]] = {}  # obj_id -> frame -> (packed bits, record)

    def shape_of(self, frame: int) -> tuple[int, int]:
        return self._shape_of(frame)

    def put(self, obj_id: int, frame: int, mask: np.ndarray, record: SliceRecord | None = None) -> None:
        """Keep a frame's mask. Without a record the frame keeps the one it had (SAM2 re-emits an
        object's unchanged mask when another object is prompted on the frame)."""
        frames = self._kept.setdefault(obj_id, {})
        if record is None and frame in frames:
            record = frames[frame][1]
        frames[frame] = (pack_mask(mask), record)

    def get(self, obj_id: int, frame: int) -> np.ndarray:
        """The stored mask, or an empty one for a frame with no result yet."""
        kept = self._kept.get(obj_id, {}).get(frame)
        shape = self._shape_of(frame)
        return np.zeros(shape, bool) if kept is None else unpack_mask(kept[0], shape)

    def area(self, obj_id: int, frame: int) -> int:
        """Pixels in the stored mask (0 for a frame with no result), counted on the packed bits."""
        kept = self._kept.get(obj_id, {}).get(frame)
        return 0 if kept is None else int(np.bitwise_count(kept[0]).sum())

    def packed(self, obj_id: int, frame: int) -> np.ndarray | None:
        """The stored bits of one frame (None: no result)."""
        kept = self._kept.get(obj_id, {}).get(frame)
        return None if kept is None else kept[0]

    def kept(self, obj_id: int, frame: int) -> Kept | None:
        """What one frame keeps (None: no result), for undo to put back with `restore`."""
        return self._kept.get(obj_id, {}).get(frame)

    def restore(self, obj_id: int, frame: int, kept: Kept | None) -> None:
        if kept is None:
            self._kept.get(obj_id, {}).pop(frame, None)
        else:
            self._kept.setdefault(obj_id, {})[frame] = kept

    def frames(self, obj_id: int) -> list[int]:
        return sorted(self._kept.get(obj_id, {}))

    def records(self, obj_id: int) -> dict[int, SliceRecord]:
        """frame -> the decoder's record, for the frames that have one."""
        return {f: rec for f, (_, rec) in self._kept.get(obj_id, {}).items() if rec is not None}

    def replace(self, obj_id: int, masks) -> None:
        """Make `masks` (frame -> bool mask, or a (frames, rows, cols) array) the object's only results.
        Frames keep their records (a fused run: the session's own axis's decoder, docs/review.md)."""
        old = self._kept.get(obj_id, {})
        items = masks.items() if isinstance(masks, dict) else enumerate(masks)
        self._kept[obj_id] = {int(f): (pack_mask(m), old[int(f)][1] if int(f) in old else None) for f, m in items}

    def drop(self, obj_id: int) -> None:
        self._kept.pop(obj_id, None)

    def clear(self) -> None:
        self._kept.clear()
