"""Propagation: which frames a `Session.propagate` call tracks, in what order, and running it.

Passes follow the official predictor (`propagate_in_video`, forward then reverse), driven one
frame at a time so that each frame can be cancelled, encoded ahead, stored compactly and traced.

What a call yields: each frame at most once, with the result it keeps. A "both" call tracks the
start frame twice, as SAM2 does (the backward pass starts on it again, and an object not
prompted there gets a new result from it), so that frame is yielded once, from the backward pass:
forward start+1..high, then backward start..low. A call cancelled before the backward pass
reaches the start frame yields it last, with the forward result that then stays.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from .features import release_free_memory
from .mask_store import MaskStore
from .memory_trace import MemoryTrace, trace_record
from .review import SliceRecord
from .refine import AgreementRule, DirectionReport, PropagationReport
from .tracking_state import TrackingState

TRIM_EVERY = 8  # frames between returns of freed heap memory to the OS (a trim costs ~1 ms)


@dataclass(frozen=True)
class Pass:
    reverse: bool
    first: int
    last: int
    yields_first: bool = True
    ends: str = "end"  # why it stops at `last`: "end" (volume), "conditioning" (refine), "stop" (asked)

    @property
    def frames(self) -> range:
        step = -1 if self.reverse else 1
        return range(self.first, self.last + step, step)


def plan_passes(direction: str, start: int, conditioning: list[int], num_frames: int, low_stop=None,
                high_stop=None, refine=False) -> list[Pass]:
    """The passes of one call. Default: from `start` to the volume's ends. `refine` (a correction at
    `start`): each pass stops before the next conditioning frame. low/high_stop: the last frames to reach."""
    passes = []
    if direction in ("forward", "both"):
        end, ends = num_frames - 1, "end"
        if refine and any(c > start for c in conditioning):
            end, ends = min(c - 1 for c in conditioning if c > start), "conditioning"
        if high_stop is not None and high_stop < end:
            end, ends = high_stop, "stop"
        passes.append(Pass(False, start, end, yields_first=direction != "both", ends=ends))
    if direction in ("backward", "both"):
        end, ends = 0, "end"
        if refine and any(c < start for c in conditioning):
            end, ends = max(c + 1 for c in conditioning if c < start), "conditioning"
        if low_stop is not None and low_stop > end:
            end, ends = low_stop, "stop"
        passes.append(Pass(True, start, end, ends=ends))
    return passes


def keep_logits(results: MaskStore, frame: int, obj_ids, video_res_logits, records=None) -> dict:
    """Threshold (obj, 1, rows, cols) logits at 0, store each object's mask (with its decoder record
    from `records`, {obj_id: SliceRecord}, where the decoder ran for it), return {obj_id: mask}."""
    masks = (video_res_logits[:, 0] > 0.0).cpu().numpy()
    records = records or {}
    out = {}
    for i, obj_id in enumerate(obj_ids):
        out[obj_id] = masks[i]
        results.put(obj_id, frame, masks[i], records.get(obj_id))
    return out


class Propagator:
    """Runs planned passes on a session's tracking state; stores masks and memory-trace records."""

    def __init__(self, model, tracking: TrackingState, results: MaskStore, trace: MemoryTrace):
        self.model, self.tracking, self.results, self.trace = model, tracking, results, trace
        self._predictor = model.predictor
        self.last_report: PropagationReport | None = None

    def run(self, passes: list[Pass], cancel: threading.Event | None, probabilities: bool,
            report: PropagationReport, agreement: AgreementRule | None = None, source: str = "propagated"):
        """Yields as the module docstring says; fills `report` as it goes and returns it. `source`: what
        the tracked frames' records say ("propagated", or "refined" after a correction)."""
        self.last_report = report
        held = None  # the start frame of a "both" call, until the backward pass redoes it
        for p in passes:
            direction = DirectionReport("backward" if p.reverse else "forward", p.first)
            report.directions.append(direction)
            for frame, item in self._run_pass(p, cancel, probabilities, direction, agreement, source):
                if frame == p.first and not p.yields_first:
                    held = item
                    continue
                if held is not None and frame == held[0]:
                    held = None
                yield item
            if direction.reason == "cancelled":  # what finished is kept; the start frame's result stands
                if held is not None:
                    yield held
                return report
        return report

    def _run_pass(self, p: Pass, cancel, probabilities, report: DirectionReport, agreement: AgreementRule | None,
                  source: str):
        order = p.frames
        if not order:
            report.reason = p.ends
            return
        state = self.tracking.inference_state
        prefetcher = self.model.prefetcher(state, order)
        if agreement is not None:
            agreement.new_direction()
        try:
            with self.model.lock, torch.inference_mode():
                self._predictor.propagate_in_video_preflight(state)
                # the memories of the slices this pass redoes describe results being replaced: none
                # of its frames reads them (slices a later pass redoes are read as they stand, as
                # SAM2 reads them; a frame never reads its own entry: SelfSortingMemoryBank.read)
                taken = self.tracking.take_bank_frames(order)
            for position, frame in enumerate(order):
                if cancel is not None and cancel.is_set():
                    return
                if prefetcher is not None:
                    prefetcher.advance(position)
                if position % TRIM_EVERY == TRIM_EVERY - 1:
                    release_free_memory()
                before = None if agreement is None else {o: self.results.packed(o, frame) for o in self.tracking.obj_ids}
                with self.model.lock, torch.inference_mode(), self.model.autocast():
                    item = self._track_frame(frame, p.reverse, probabilities, source)
                report.frames.append(frame)
                agreed = agreement is not None and agreement.agreed(frame, before, item[1], self.results.shape_of(frame))
                yield frame, item
                if agreed:  # the slices ahead keep their results, and their memories
                    with self.model.lock:
                        self.tracking.put_back_bank_frames(taken, set(order[position + 1:]))
                    report.reason = "agreement"
                    return
            report.reason = p.ends
        finally:
            if prefetcher is not None:
                prefetcher.stop()
                state.pop("prefetcher", None)

    def _track_frame(self, frame, reverse, probabilities, source):
        """All objects on one frame (conditioning frames reuse their prompt result)."""
        state, predictor = self.tracking.inference_state, self._predictor
        self.tracking.use_frame(frame)
        obj_ids = list(state["obj_ids"])
        per_obj, records = [], {}
        for obj_idx, obj_id in enumerate(obj_ids):
            out_dict = self.tracking.outputs(obj_idx)
            cond_out = out_dict["cond_frame_outputs"].get(frame)
            if cond_out is not None:
                logits = cond_out["pred_masks"].to(state["device"], non_blocking=True)
            else:
                out, logits = predictor._run_single_frame_inference(
                    inference_state=state, output_dict=out_dict, frame_idx=frame, batch_size=1,
                    is_init_cond_frame=False, point_inputs=None, mask_inputs=None, reverse=reverse,
                    run_mem_encoder=True)
                out_dict["non_cond_frame_outputs"][frame] = out
                self._trace(obj_id, obj_idx, frame, reverse)
                verdict = predictor.last_verdict
                records[obj_id] = SliceRecord(verdict.confidence, verdict.object_score, source)
            state["frames_tracked_per_obj"][obj_idx][frame] = {"reverse": reverse}
            per_obj.append(logits)
        self.tracking.memory_changed()  # new memories: clicks prepared before them are stale
        _, video_res = predictor._get_orig_video_res_output(state, torch.cat(per_obj, dim=0))
        masks = keep_logits(self.results, frame, obj_ids, video_res, records)
        if not probabilities:
            return frame, masks
        probs = torch.sigmoid(video_res[:, 0].float()).cpu().numpy()
        return frame, masks, {o: probs[i].astype(np.float32) for i, o in enumerate(obj_ids)}

    def _trace(self, obj_id, obj_idx, frame, reverse):
        tracking = self._predictor.last_tracking
        bank = self.tracking.bank(obj_idx)
        if bank is not None:
            memory, held = "self-sorting", bank.frames()
        else:  # SAM2 holds every tracked frame; the next frame along this direction reads these
            stored = self.tracking.outputs(obj_idx)["non_cond_frame_outputs"]
            following = frame - 1 if reverse else frame + 1
            memory, held = "sam2", [f for f in self._predictor.recency_window(following, reverse) if f in stored]
        self.trace.add(trace_record(obj_id, tracking, memory, self.tracking.conditioning_frames(obj_id), held))
