"""What a segment's session remembers: its prompts per axis (to replay them into an engine) and
its actions (to undo and redo them exactly). Plain data, no scene and no engine calls. A prompt is
the engine's own value (medsam2.prompt.Prompt), the one form that crosses to the engine child."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medsam2.masks import PackedMask
from medsam2.prompt import Prompt

OBJ_ID = 1  # each engine session holds one segment, as object 1


def pack(mask) -> PackedMask:
    """bool (rows, cols) -> a compact undo record."""
    return PackedMask.of(mask)


def unpack(record: PackedMask) -> np.ndarray:
    return record.unpack()


@dataclass(eq=False)
class Action:
    """What one user action changed: enough to undo and redo it exactly."""

    kind: str                  # "point" | "box" | "edited slice" | "propagation"
    axis: int
    prompt: Prompt | None = None
    changes: dict = field(default_factory=dict)  # frame -> (old, new) pack() records

    @property
    def frames(self) -> list:
        return sorted(self.changes)


class AxisState:
    """One segment along one volume axis: its engine session and the prompts it must hold."""

    def __init__(self, layout, normal):
        self.layout = layout
        self.normal = np.asarray(normal, dtype=float)  # the last view normal used on this axis
        self.engine = None     # the engine session (opened by the first job on this axis)
        self.prompts: dict = {}  # frame -> [Prompt] in the order given to the engine
        self.dirty: set = set()  # frames whose engine prompts must be replayed

    def prompted_frames(self) -> list:
        return sorted(f for f, p in self.prompts.items() if p)

    def replay(self) -> list:
        """(frame, [Prompt]) for the frames the engine must be brought up to date on (after an
        undo/redo, a refused prompt, or on a new engine session). Clears the dirty set."""
        frames, self.dirty = sorted(self.dirty), set()
        return [(f, list(self.prompts.get(f, []))) for f in frames]

    def attach(self, engine) -> None:
        """A new engine session: it must be given every prompt held on this axis."""
        self.engine = engine
        self.dirty |= set(self.prompts)

    def add(self, prompt: Prompt) -> None:
        self.prompts.setdefault(prompt.frame, []).append(prompt)

    def remove(self, prompt: Prompt) -> None:
        """Forget a prompt (undone, or refused by the engine); the engine learns it lazily."""
        prompts = self.prompts.get(prompt.frame, [])
        if any(p is prompt for p in prompts):
            self.prompts[prompt.frame] = [p for p in prompts if p is not prompt]
        self.dirty.add(prompt.frame)
