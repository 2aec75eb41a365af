"""What the decoder said about each kept mask, and the rule that flags the slices worth a look.

Per (frame, object) with a result the session keeps a `SliceRecord` beside the mask (MaskStore):
the chosen mask's predicted IoU, the object-score logit, and where the mask came from. Review
rows add what the kept mask shows (its area, its change from the previous slice) and `flagged`.

The flag rule (defaults measured: docs/review.md, `python -m medsam2.study.review_study`):

* low-confidence: the mask is not empty and its confidence is below `min_confidence`;
* area-jump: the slice's area is above both neighbours' or below both, by at least `max_jump`
  (relative change, |a - b| / max(a, b, 1)) against each; both neighbours must have results;
* vanished: the mask is empty while the object has a non-empty mask on an earlier and on a later
  slice (a gap in the object).

An image set's images are unrelated, so only the low-confidence rule applies there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..options import MIN_CONFIDENCE

SOURCES = ("prompt", "propagated", "refined")
REVIEW_KEYS = ("frame", "obj_id", "confidence", "object_score", "area", "change", "source", "flagged", "reason")


@dataclass(frozen=True)
class SliceRecord:
    """What the mask decoder said about one kept mask, and how the mask came to be."""

    confidence: float  # the chosen mask's predicted IoU; 0.0 where the object score says absent
    object_score: float  # the object-score logit (> 0: present)
    source: str  # "prompt" (a prompt on this slice), "propagated" or "refined" (a correction's re-run)


@dataclass(frozen=True)
class FlagRule:
    """When a slice is flagged for review (see the module docstring; defaults: docs/review.md)."""

    # the bank's admission threshold: a slice the self-sorting bank would not remember is worth a look
    min_confidence: float = MIN_CONFIDENCE
    # above every jump CTChest4's reference segments make (at most 0.25, along any axis)
    max_jump: float = 0.4

    def __post_init__(self):
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1]; got {self.min_confidence}")
        if not 0.0 < self.max_jump <= 1.0:
            raise ValueError(f"max_jump must be in (0, 1]; got {self.max_jump}")


def change(area: int, other: int) -> float:
    """Relative area change between two slices: |a - b| / max(a, b, 1)."""
    return abs(area - other) / max(area, other, 1)


def jump(area: int, before: int, after: int) -> float:
    """How far a slice stands out from both neighbours: the smaller relative change to either,
    where the slice is larger than both or smaller than both; 0.0 otherwise (a slope, not a jump)."""
    if (area > before and area > after) or (area < before and area < after):
        return min(change(area, before), change(area, after))
    return 0.0


def review_rows(obj_ids: list[int], records_of: Callable[[int], dict], area_of: Callable[[int, int], int],
                ordered: bool = True, rule: FlagRule | None = None) -> list[dict]:
    """One row per (frame, object) that has a record, frames ascending (objects in `obj_ids` order).

    records_of(obj_id) -> {frame: SliceRecord}; area_of(obj_id, frame) -> pixels of the kept mask (0
    where none). ordered=False (an image set): neighbours mean nothing, only low confidence flags.
    """
    rows = []
    for obj_id in obj_ids:
        records = records_of(obj_id)
        areas = {f: int(area_of(obj_id, f)) for f in records}
        for f in sorted(records):
            rec, area = records[f], areas[f]
            before = areas[f - 1] if f - 1 in areas else int(area_of(obj_id, f - 1)) if f > 0 else area
            rows.append(dict(frame=f, obj_id=obj_id, confidence=rec.confidence, object_score=rec.object_score,
                             area=area, change=change(area, before), source=rec.source))
    rows.sort(key=lambda r: r["frame"])  # stable: objects keep their order within a frame
    return flag_rows(rows, rule, ordered)


def flag_rows(rows: list[dict], rule: FlagRule | None = None, ordered: bool = True) -> list[dict]:
    """Set `flagged` and `reason` of review rows by the rule (in place; returns them). A slice's
    neighbours are the rows of the same object on the frames either side. Re-flagging rows with
    another rule needs nothing else (a shell offers a stricter review without asking the engine)."""
    rule = rule or FlagRule()
    by_obj: dict[int, dict[int, dict]] = {}
    for r in rows:
        by_obj.setdefault(r["obj_id"], {})[r["frame"]] = r
    for of_obj in by_obj.values():
        present = sorted(f for f, r in of_obj.items() if r["area"] > 0)
        first, last = (present[0], present[-1]) if present else (None, None)
        for f, r in of_obj.items():
            area, prev, nxt = r["area"], of_obj.get(f - 1), of_obj.get(f + 1)
            reasons = []
            if area > 0 and r["confidence"] < rule.min_confidence:
                reasons.append("low-confidence")
            if ordered and prev is not None and nxt is not None and area > 0 \
                    and jump(area, prev["area"], nxt["area"]) >= rule.max_jump:
                reasons.append("area-jump")
            if ordered and area == 0 and first is not None and first < f < last:
                reasons.append("vanished")
            r["flagged"], r["reason"] = bool(reasons), ",".join(reasons)
    return rows


def flagged_frames(rows: list[dict], obj_id: int | None = None) -> list[int]:
    """The frames with a flagged row (of one object, or of any), ascending, each once."""
    return sorted({r["frame"] for r in rows if r["flagged"] and (obj_id is None or r["obj_id"] == obj_id)})
