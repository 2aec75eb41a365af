"""Prepared clicks: a slice's memory-conditioned features, computed before the click needs them.

After propagation every click on a tracked slice runs memory attention over the object's memories
(about nine tenths of the click). Those features depend on the slice's image and on the object's
memory as it stands, not on the prompt, so `Session.prepare(frame)` computes them ahead and the
click path (MedSAM2Predictor._run_single_frame_inference) reuses them. Exactness rests on one
rule: an entry is used only while the memory it was computed from is unchanged. Every change to an
object's memory (a propagated frame, a prompt that takes a bank entry, undo, removal, reset) bumps
that object's memory version, which invalidates its entries. Memory stays bounded: the entries of
the last PREPARED_FRAMES prepared frames (one feature map per object there).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# A view shows one slice; two leave room for the slice a second view (or the previous scroll
# position) shows without growing with the volume. One entry is (256, 32, 32) floats at 512 px.
PREPARED_FRAMES = 2


@dataclass
class PreparedFeatures:
    """One (frame, object)'s memory-conditioned features and what the memory read left behind."""

    reverse: bool  # the direction the frame was tracked in: it selects the memories read
    version: int  # the object's memory version they were computed under
    pix_feat: torch.Tensor
    read: object  # the predictor's MemoryRead for the frame
    descriptor: object  # the frame's image descriptor (self-sorting), or None
    rng_before: torch.Tensor | None  # the bank's read generator before the read (softmax read)
    rng_after: torch.Tensor | None  # ... and after it: a reuse leaves the bank as a fresh read would


class PreparedClicks:
    """The prepared entries of one session, keyed by frame then object id."""

    def __init__(self, max_frames: int = PREPARED_FRAMES):
        self.max_frames = max_frames
        self._entries: OrderedDict[int, dict[int, PreparedFeatures]] = OrderedDict()
        self._versions: dict[int, int] = {}  # obj_id -> when its memory last changed
        self._epoch = 0  # when every object's memory last changed
        self._clock = 0
        self.reused = 0  # clicks (or tracked frames) that used an entry: for tests and the bench

    # -- versions ---------------------------------------------------------------------------
    def version(self, obj_id: int) -> int:
        """The object's memory version: entries computed under another one are stale."""
        return max(self._epoch, self._versions.get(obj_id, 0))

    def memory_changed(self, obj_id: int | None = None, unchanged_frame: int | None = None) -> None:
        """An object's memory (every object's, for None) changed: its entries no longer hold.
        `unchanged_frame`: the one frame whose read provably did not change (a bank entry taken
        out for a prompt on that frame: a frame never reads its own entry); its entry is kept."""
        self._clock += 1
        if obj_id is None:
            self._epoch = self._clock
            self._entries.clear()
            return
        self._versions[obj_id] = self._clock
        for frame, per_obj in list(self._entries.items()):
            entry = per_obj.get(obj_id)
            if entry is None:
                continue
            if frame == unchanged_frame:
                entry.version = self._clock
            else:
                del per_obj[obj_id]
                if not per_obj:
                    del self._entries[frame]

    def clear(self) -> None:
        self.memory_changed(None)

    # -- entries ----------------------------------------------------------------------------
    def get(self, frame: int, obj_id: int, reverse: bool) -> PreparedFeatures | None:
        """The entry valid now for this frame, object and direction, or None."""
        entry = self._entries.get(frame, {}).get(obj_id)
        if entry is None or entry.reverse != reverse or entry.version != self.version(obj_id):
            return None
        return entry

    def matching(self, frame: int, obj_id: int, reverse: bool, bank) -> PreparedFeatures | None:
        """The entry a frame about to read memory may use instead: valid, and (softmax read) the
        bank's generator where it was when the entry was computed."""
        entry = self.get(frame, obj_id, reverse)
        if entry is None:
            return None
        if entry.rng_before is not None and (bank is None or not torch.equal(bank.rng_state(), entry.rng_before)):
            return None
        return entry

    def put(self, frame: int, obj_id: int, entry: PreparedFeatures) -> None:
        self._entries.setdefault(frame, {})[obj_id] = entry
        self._entries.move_to_end(frame)
        while len(self._entries) > self.max_frames:
            self._entries.popitem(last=False)

    def touch(self, frame: int) -> None:
        """The frame was asked for again: it is the last one the bound drops."""
        if frame in self._entries:
            self._entries.move_to_end(frame)

    def frames(self) -> list[int]:
        return list(self._entries)
