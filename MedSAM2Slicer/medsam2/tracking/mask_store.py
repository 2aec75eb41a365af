"""A session's results: one bit-packed mask per (object, frame), unpacked on demand.

A 300-slice 512 x 512 volume is 78 MB of bool per object unpacked, 10 MB packed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..masks import pack_mask, unpack_mask


class MaskStore:
    def __init__(self, shape_of: Callable[[int], tuple[int, int]]):
        self._shape_of = shape_of  # (rows, cols) of a frame: one shape for a volume, one per image for a set
        self._packed: dict[int, dict[int, np.ndarray]] = {}  # obj_id -> frame -> packed bits

    def shape_of(self, frame: int) -> tuple[int, int]:
        return self._shape_of(frame)

    def put(self, obj_id: int, frame: int, mask: np.ndarray) -> None:
        self._packed.setdefault(obj_id, {})[frame] = pack_mask(mask)

    def get(self, obj_id: int, frame: int) -> np.ndarray:
        """The stored mask, or an empty one for a frame with no result yet."""
        packed = self._packed.get(obj_id, {}).get(frame)
        shape = self._shape_of(frame)
        return np.zeros(shape, bool) if packed is None else unpack_mask(packed, shape)

    def packed(self, obj_id: int, frame: int) -> np.ndarray | None:
        """The stored bits of one frame (None: no result), for undo to put back with `restore`."""
        return self._packed.get(obj_id, {}).get(frame)

    def restore(self, obj_id: int, frame: int, packed: np.ndarray | None) -> None:
        if packed is None:
            self._packed.get(obj_id, {}).pop(frame, None)
        else:
            self._packed.setdefault(obj_id, {})[frame] = packed

    def frames(self, obj_id: int) -> list[int]:
        return sorted(self._packed.get(obj_id, {}))

    def replace(self, obj_id: int, masks) -> None:
        """Make `masks` (frame -> bool mask, or a (frames, rows, cols) array) the object's only results."""
        items = masks.items() if isinstance(masks, dict) else enumerate(masks)
        self._packed[obj_id] = {int(f): pack_mask(m) for f, m in items}

    def drop(self, obj_id: int) -> None:
        self._packed.pop(obj_id, None)

    def clear(self) -> None:
        self._packed.clear()
