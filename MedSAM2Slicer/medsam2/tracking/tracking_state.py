"""SAM2's inference state for one session, and the per-object facts the session reads from it.

The state is a dict in the layout of the official SAM2VideoPredictor.init_state (frames lazy, a
shared feature cache, a memory bank per object in self-sorting mode), so the predictor's own
methods run on it unchanged. Everything here reads or edits that dict; nothing runs the network.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import InputError
from .memory_bank import BankParams, MemoryEntry, SelfSortingMemoryBank
from .predictor import BANK_KEY, PREPARED_KEY
from .prepared import PreparedClicks


@dataclass
class FrameBeforePrompt:
    """What one object's frame held before its first prompt: undo (clearing the prompts) restores it."""

    output: dict | None  # its tracked (non-conditioning) output, if it had been tracked
    tracked: dict | None  # SAM2's "frames tracked" record for it
    bank_slot: tuple[int, MemoryEntry] | None  # its bank entry and position (a prompted frame leaves the bank)
    bank_rng: torch.Tensor | None  # the bank's sampling generator state (read="softmax")


class TrackingState:
    def __init__(self, frames, feature_cache, device: torch.device, bank_params: BankParams | None,
                 shape_of: Callable[[int], tuple[int, int]]):
        self._shape_of = shape_of
        rows, cols = shape_of(0)
        self.inference_state = {
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
            "memory_bank_params": bank_params,  # None = stock SAM2 memory (the predictor makes the banks)
            PREPARED_KEY: PreparedClicks(),  # memory-conditioned features computed ahead of clicks
        }

    # -- facts ------------------------------------------------------------------------------
    @property
    def obj_ids(self) -> list[int]:
        return list(self.inference_state["obj_ids"])

    @property
    def bank_params(self) -> BankParams | None:
        return self.inference_state["memory_bank_params"]

    @property
    def feature_cache(self):
        return self.inference_state["feature_cache"]

    def index_of(self, obj_id) -> int | None:
        return self.inference_state["obj_id_to_idx"].get(obj_id)

    def known(self, obj_id) -> int:
        """The object's index; InputError naming the known ids if there is no such object."""
        idx = self.index_of(obj_id)
        if idx is None:
            raise InputError(f"unknown object id {obj_id!r}; known: {self.obj_ids}")
        return idx

    def outputs(self, obj_idx: int) -> dict:
        return self.inference_state["output_dict_per_obj"][obj_idx]

    def conditioning_frames(self, obj_id=None) -> list[int]:
        """Frames whose prompts condition tracking (for one object, or any)."""
        indices = range(len(self.obj_ids)) if obj_id is None else [self.known(obj_id)]
        frames = set()
        for idx in indices:
            for d in (self.outputs(idx), self.inference_state["temp_output_dict_per_obj"][idx]):
                frames.update(d["cond_frame_outputs"])
        return sorted(frames)

    @property
    def prepared(self) -> PreparedClicks:
        return self.inference_state[PREPARED_KEY]

    def memory_changed(self, obj_id=None, unchanged_frame=None) -> None:
        """Called wherever an object's memory (or every object's) changes: prepared clicks made
        under the old memory are stale."""
        self.prepared.memory_changed(obj_id, unchanged_frame)

    def bank(self, obj_idx: int) -> SelfSortingMemoryBank | None:
        return self.outputs(obj_idx).get(BANK_KEY)

    def use_frame(self, frame: int) -> None:
        """Tell SAM2 the size of the frame about to be prompted or tracked: it scales prompts into
        its square input, and logits back out, by the state's video size (one per image in a set)."""
        self.inference_state["video_height"], self.inference_state["video_width"] = self._shape_of(frame)

    # -- memory that a propagation replaces ---------------------------------------------------
    def take_bank_frames(self, frames) -> dict[int, list[tuple[int, MemoryEntry]]]:
        """Take every object's bank entries of these frames out (their segmentation is about to be
        redone); returns them with their positions, per object index, for put_back_bank_frames."""
        taken, frames = {}, set(frames)
        for idx in range(len(self.obj_ids)):
            bank = self.bank(idx)
            if bank is not None:
                slots = [(pos, e) for pos, e in enumerate(bank.entries) if e.frame in frames]
                bank.discard(frames)
                taken[idx] = slots
        self.memory_changed()
        return taken

    def put_back_bank_frames(self, taken: dict[int, list[tuple[int, MemoryEntry]]], frames: set[int]) -> None:
        """A pass that stopped early: the entries of the frames it did not redo go back to their
        places (unless the bank has filled since: SelfSortingMemoryBank.put_back)."""
        for idx, slots in taken.items():
            bank = self.bank(idx)
            for position, entry in slots:  # in position order, so earlier places are filled first
                if entry.frame in frames:
                    bank.put_back(position, entry)
        self.memory_changed()

    # -- undo of a frame's prompts --------------------------------------------------------------
    def leave_for_prompt(self, obj_id, frame) -> FrameBeforePrompt | None:
        """Before an object's first prompt on a frame: take the frame out of the bank (a prompted
        frame conditions tracking and is never a bank entry) and return what undo needs to put back.
        None when the frame already conditions with no record (nothing earlier to restore)."""
        idx = self.index_of(obj_id)
        if idx is None:
            return FrameBeforePrompt(None, None, None, None)
        out_dict = self.outputs(idx)
        if frame in out_dict["cond_frame_outputs"]:
            return None
        bank = self.bank(idx)
        before = FrameBeforePrompt(
            output=out_dict["non_cond_frame_outputs"].get(frame),
            tracked=self.inference_state["frames_tracked_per_obj"][idx].get(frame),
            bank_slot=bank.take(frame) if bank is not None else None,
            bank_rng=bank.rng_state() if bank is not None else None,
        )
        if before.bank_slot is not None:  # other frames would read that entry; this one never does
            self.memory_changed(obj_id, unchanged_frame=frame)
        return before

    def restore_before_prompt(self, obj_id, frame, before: FrameBeforePrompt) -> None:
        """Undo: the frame holds again what it held before its first prompt, bank entry included."""
        idx = self.known(obj_id)
        non_cond = self.outputs(idx)["non_cond_frame_outputs"]
        tracked = self.inference_state["frames_tracked_per_obj"][idx]
        non_cond.pop(frame, None)
        tracked.pop(frame, None)
        if before.output is not None:
            non_cond[frame] = before.output
        if before.tracked is not None:
            tracked[frame] = before.tracked
        bank = self.bank(idx)
        if bank is not None:
            if before.bank_slot is not None:
                bank.put_back(*before.bank_slot)
            if before.bank_rng is not None:
                bank.set_rng_state(before.bank_rng)
        self.memory_changed(obj_id)
