"""The client's copy of the masks it received, as they travelled (encoded).

The server marks a frame it already sent, unchanged, as {"same": digest}; the mirror turns that
back into the mask, and asks for the frame again when its copy is missing or different (e.g.
after a cancelled stream).
"""

from __future__ import annotations

from typing import Callable

from ..errors import ServerError


class MaskMirror:
    def __init__(self):
        self._masks: dict[int, dict[int, dict]] = {}  # obj_id -> {frame: encoded mask}

    def keep(self, obj_id: int, frame: int, encoded: dict) -> None:
        self._masks.setdefault(int(obj_id), {})[int(frame)] = encoded

    def forget(self, obj_id: int) -> None:
        self._masks.pop(int(obj_id), None)

    def clear(self) -> None:
        self._masks.clear()

    def resolve(self, obj_id: int, frame: int, encoded: dict, fetch_frame: Callable[[int], dict]) -> dict:
        """The encoded mask a stream line stands for: the line's own, or the kept copy it names."""
        if "same" not in encoded:
            self.keep(obj_id, frame, encoded)
            return encoded
        known = self._masks.get(obj_id, {}).get(frame)
        if known is None or known.get("digest") != encoded["same"]:
            known = fetch_frame(frame).get(str(obj_id))  # we missed it
            if known is None:
                raise ServerError(f"propagate: the server has no mask for object {obj_id} on frame {frame}")
            self.keep(obj_id, frame, known)
        return known
