"""The memory trace: for each tracked (frame, object), what it attended to and what its memory holds.

`Session.memory_trace()` returns these records in tracking order (docs/memory-bank.md, "Memory
trace"); `medsam2 segment --memory-trace FILE.json` writes them, and trace_picture.py draws them.
A record is plain JSON data:

  frame, obj_id        the tracked slice and object
  direction            "forward" or "backward" (the pass it was tracked in)
  memory               "self-sorting" or "sam2"
  attended             frames whose memories were attended: the prompted (conditioning) frames
                       first, then the other memories nearest slot first (self-sorting: most
                       similar first; sam2: most recent first). Observed, not recomputed: in sam2
                       mode these are the outputs SAM2's own selection read.
  prompted             the object's conditioning frames at that moment
  pointers             frames whose object pointers were attended
  recalled             self-sorting: the bank entries read, [{frame, similarity, confidence}], most
                       similar first; [] in sam2 mode
  bank_empty           True when nothing but prompted frames was attended (an empty bank, or
                       SAM2's window holding no tracked frame yet)
  confidence           this frame's confidence: its mask's predicted IoU, 0 when object absent
  object_present       the object-score head's verdict (logit > 0)
  admission            self-sorting: the bank's decision on this frame ("admitted",
                       "replaced N", "rejected: low confidence" / "redundant" / "object absent");
                       None in sam2 mode
  bank                 after this frame: self-sorting, the bank's frames in bank order; sam2, the
                       tracked frames whose memories the next frame in this direction would read
                       (SAM2's first-in-first-out memory of the recent frames)
"""

from __future__ import annotations

from collections import deque

from .predictor import FrameTracking

# records kept per session (the most recent): a long interactive session re-tracks slices many times
TRACE_LIMIT = 20_000


def trace_record(obj_id: int, tracking: FrameTracking, memory: str, prompted: list[int], bank: list[int]) -> dict:
    read = tracking.read
    return {
        "frame": int(tracking.frame),
        "obj_id": int(obj_id),
        "direction": "backward" if tracking.reverse else "forward",
        "memory": memory,
        "attended": [int(f) for f in read.attended],
        "prompted": [int(f) for f in prompted],
        "pointers": [int(f) for f in read.pointers],
        "recalled": [{"frame": int(r.frame), "similarity": round(float(r.similarity), 6),
                      "confidence": round(float(r.entry.confidence), 6)} for r in read.recalled],
        "bank_empty": set(read.attended) <= set(prompted),
        "confidence": round(float(tracking.confidence), 6),
        "object_present": bool(tracking.object_present),
        "admission": tracking.admission,
        "bank": [int(f) for f in bank],
    }


def _copy(record: dict) -> dict:
    out = {k: list(v) if isinstance(v, list) else v for k, v in record.items()}
    out["recalled"] = [dict(r) for r in record["recalled"]]
    return out


class MemoryTrace:
    """A session's trace records, oldest first (at most TRACE_LIMIT, the most recent)."""

    def __init__(self, limit: int = TRACE_LIMIT):
        self._records: deque[dict] = deque(maxlen=limit)

    def add(self, record: dict) -> None:
        self._records.append(record)

    def records(self) -> list[dict]:
        # list() snapshots the deque in one step: a propagation may be appending on another thread
        return [_copy(r) for r in list(self._records)]

    def drop_object(self, obj_id: int) -> None:
        kept = [r for r in self._records if r["obj_id"] != obj_id]
        self._records.clear()
        self._records.extend(kept)

    def clear(self) -> None:
        self._records.clear()
