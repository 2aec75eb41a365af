"""Where a propagation stops, and why: the agreement rule of a refine and the stop report.

A correction changes the masks near it; farther away the re-tracked masks soon equal the ones
they replace. `propagate(start=f)` (until="agreement", the refine's default) therefore stops a
direction once the new masks agree with the previous result on AGREEMENT_SLICES consecutive
slices (IoU >= AGREEMENT_IOU for every object), instead of re-tracking to the next conditioning
slice or the volume's end (until="conditioning", the behaviour before). The values come from
the measurements in docs/performance.md ("Refine until agreement").

Each call leaves a PropagationReport (Session.last_propagation, and the generator's return
value): per direction the frames re-tracked and why it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..masks import unpack_mask

AGREEMENT_SLICES = 3  # K: consecutive agreeing slices before a direction stops
AGREEMENT_IOU = 0.98  # tau: the IoU with the previous result each of them reaches
UNTIL_MODES = ("agreement", "conditioning")
# why a direction stopped
STOP_REASONS = ("agreement", "conditioning", "end", "stop", "cancelled")


def check_until(until: str | None, refine: bool) -> str:
    """The stop rule of a call: agreement by default for a refine (start given), else conditioning."""
    if until is None:
        return "agreement" if refine else "conditioning"
    if until not in UNTIL_MODES:
        raise InputError(f"until must be one of {UNTIL_MODES}; got {until!r}")
    if until == "agreement" and not refine:
        raise InputError("until='agreement' stops a refine where it agrees with the previous result: "
                         "give start (the corrected slice), or use until='conditioning'")
    return until


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; two empty masks agree (1.0)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


@dataclass
class DirectionReport:
    direction: str  # "forward" or "backward"
    start: int
    frames: list[int] = field(default_factory=list)  # frames tracked, in order
    reason: str = "cancelled"  # until the pass ends on its own (a closed generator is a cancel)

    @property
    def last(self) -> int | None:
        return self.frames[-1] if self.frames else None

    def as_dict(self) -> dict:
        return {"direction": self.direction, "start": self.start, "frames": list(self.frames),
                "reason": self.reason}


@dataclass
class PropagationReport:
    start: int
    refine: bool
    until: str
    directions: list[DirectionReport] = field(default_factory=list)

    @property
    def refined(self) -> int:
        """Slices given a new result, the start slice (the one just prompted) not counted."""
        return len({f for d in self.directions for f in d.frames} - {self.start})

    def summary(self) -> str:
        """One status line: "Refined 7 slices; the rest agreed"."""
        n, reasons = self.refined, {d.reason for d in self.directions}
        noun = "slice" if n == 1 else "slices"
        verb = "Refined" if self.refine else "Propagated"
        if "cancelled" in reasons:
            return f"Stopped: {verb.lower()} {n} {noun}"
        if "agreement" in reasons:
            return f"{verb} {n} {noun}; the rest agreed"
        return f"{verb} {n} {noun}"

    def as_dict(self) -> dict:
        return {"start": self.start, "refine": self.refine, "until": self.until, "refined": self.refined,
                "summary": self.summary(), "directions": [d.as_dict() for d in self.directions]}

    @classmethod
    def from_dict(cls, data: dict) -> "PropagationReport":
        """The report as_dict() wrote (a remote session gets it on the stream's end line)."""
        directions = [DirectionReport(d["direction"], int(d["start"]), [int(f) for f in d["frames"]], d["reason"])
                      for d in data["directions"]]
        return cls(int(data["start"]), bool(data["refine"]), data["until"], directions)


class AgreementRule:
    """Counts consecutive re-tracked slices whose new masks agree with the ones they replace."""

    def __init__(self, start: int, slices: int = AGREEMENT_SLICES, iou: float = AGREEMENT_IOU):
        self.start, self.slices, self.iou = start, slices, iou
        self._run = 0

    def new_direction(self) -> None:
        self._run = 0

    def agreed(self, frame: int, before: dict, after: dict, shape) -> bool:
        """After one frame: `before` {obj_id: packed mask or None}, `after` {obj_id: mask}. True once
        the last `slices` frames all agreed. The start slice (just corrected) never counts."""
        if frame == self.start:
            return False
        same = all(before.get(o) is not None and mask_iou(unpack_mask(before[o], shape), m) >= self.iou
                   for o, m in after.items())
        self._run = self._run + 1 if same else 0
        return self._run >= self.slices
