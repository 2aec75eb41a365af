"""MedSAM-2's self-sorting memory bank, as plain data and rules (no model code here).

SAM2 attends to the most recent frames. Along a volume that means the memories are the slices
just propagated, including the bad ones. MedSAM-2 instead keeps a fixed-size bank of confident,
mutually dissimilar memories and reads those most similar to the current frame. The rules below
are the ones documented in docs/memory-bank.md (with every difference from the reference code);
each is unit-tested with hand-made entries.

Admission (after a non-conditioning frame is segmented):
  * a frame segmented again first loses its older entry, whatever happens to the new one;
  * a frame where the object score says "absent" is not admitted (the bank remembers the object);
  * confidence = the chosen mask's predicted IoU; below `min_confidence` it is not admitted;
  * until the bank holds `capacity` entries, admit;
  * when full: A = the entry least similar to the new one, B = A's most similar other entry
    (cosine similarity of flattened memory features). If sim(new, A) < sim(A, B) and
    conf(new) > conf(B) - `replace_margin`, B is replaced by the new entry; else it is rejected.
Reading (for each frame to segment; the frame's own entry is never among them):
  * "topk" (default): the k entries whose stored image embedding is most cosine-similar to the
    current frame's, most similar first, ties broken by frame index (deterministic);
  * "softmax": k distinct entries drawn without replacement with probabilities
    softmax(similarity / temperature), from a seeded generator; returned most similar first.
    (The reference draws batch-size entries *with* replacement, unseeded: docs/memory-bank.md.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import InputError
from ..options import MEMORY_MODES, MIN_CONFIDENCE

READ_MODES = ("topk", "softmax")


@dataclass
class MemoryEntry:
    frame: int
    confidence: float
    memory_descriptor: torch.Tensor  # flattened memory features, unit-normalised (admission)
    image_descriptor: torch.Tensor  # pooled image embedding, unit-normalised (reading)
    payload: dict = field(default_factory=dict)  # what the model attends to: features, pos enc, obj ptr
    object_present: bool = True  # the object-score head's verdict on this frame


class Recall(NamedTuple):
    """One entry read for a frame, with its image similarity to that frame."""

    entry: MemoryEntry
    similarity: float

    @property
    def frame(self) -> int:
        return self.entry.frame


def unit(vector: torch.Tensor) -> torch.Tensor:
    """Flatten to float32 and scale to unit length (a zero vector stays zero)."""
    v = vector.detach().reshape(-1).to(torch.float32)
    return v / v.norm().clamp_min(1e-12)


@dataclass
class BankParams:
    capacity: int = 16
    min_confidence: float = MIN_CONFIDENCE
    replace_margin: float = 0.1
    read: str = "topk"
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"memory bank capacity must be >= 1; got {self.capacity}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1]; got {self.min_confidence}")
        if self.read not in READ_MODES:
            raise ValueError(f"read must be one of {READ_MODES}; got {self.read!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {self.temperature}")


def bank_params_for(memory, memory_bank) -> BankParams | None:
    """Checked memory-bank settings for a memory mode (None for stock SAM2 memory)."""
    if memory not in MEMORY_MODES:
        raise InputError(f"memory must be one of {MEMORY_MODES}; got {memory!r}")
    if memory == "sam2":
        if memory_bank:
            raise InputError("memory_bank settings apply only to memory='self-sorting'")
        return None
    try:
        return memory_bank if isinstance(memory_bank, BankParams) else BankParams(**(memory_bank or {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"memory bank settings: {exc}") from None


class SelfSortingMemoryBank:
    """A fixed-capacity bank of one object's memories. Conditioning frames never enter it."""

    def __init__(self, params: BankParams | None = None, **kwargs):
        self.params = params if params is not None else BankParams(**kwargs)
        self.entries: list[MemoryEntry] = []
        self._generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.entries)

    def frames(self) -> list[int]:
        return [e.frame for e in self.entries]

    def admit(self, entry: MemoryEntry) -> str:
        """Apply the admission rule; returns what happened ("admitted", "replaced N", "rejected: ...")."""
        p = self.params
        self.discard([entry.frame])  # a re-segmented frame's older memory is stale, admitted again or not
        if not entry.object_present:
            return "rejected: object absent"
        if entry.confidence < p.min_confidence:
            return "rejected: low confidence"
        if len(self.entries) < p.capacity:
            self.entries.append(entry)
            return "admitted"
        if len(self.entries) == 1:  # capacity 1: no pair to compare; keep the more confident
            if entry.confidence > self.entries[0].confidence - p.replace_margin:
                old = self.entries[0].frame
                self.entries[0] = entry
                return f"replaced {old}"
            return "rejected: redundant"
        mem = torch.stack([e.memory_descriptor for e in self.entries])
        sim_new = mem @ entry.memory_descriptor
        a = int(torch.argmin(sim_new))
        sim_a = mem @ mem[a]
        sim_a[a] = -float("inf")
        b = int(torch.argmax(sim_a))
        if float(sim_new[a]) < float(sim_a[b]) and entry.confidence > self.entries[b].confidence - p.replace_margin:
            old = self.entries[b].frame
            self.entries[b] = entry
            return f"replaced {old}"
        return "rejected: redundant"

    def read(self, image_descriptor: torch.Tensor, k: int, frame: int | None = None) -> list[Recall]:
        """The k entries to attend to for `frame` with this image descriptor, most similar first.

        `frame`'s own entry is never read: a frame must not attend to its own earlier output.
        """
        candidates = [e for e in self.entries if e.frame != frame]
        if k <= 0 or not candidates:
            return []
        sims = torch.stack([e.image_descriptor for e in candidates]) @ image_descriptor
        k = min(k, len(candidates))
        if self.params.read == "softmax":
            probs = torch.softmax(sims / self.params.temperature, dim=0)
            chosen = torch.multinomial(probs, k, replacement=False, generator=self._generator).tolist()
        else:
            chosen = range(len(candidates))
        ranked = sorted(chosen, key=lambda i: (-float(sims[i]), candidates[i].frame))
        return [Recall(candidates[i], float(sims[i])) for i in ranked[:k]]

    def discard(self, frames) -> None:
        drop = set(frames)
        self.entries = [e for e in self.entries if e.frame not in drop]

    def take(self, frame: int) -> tuple[int, MemoryEntry] | None:
        """Remove the frame's entry and return (its position, it), so that undo can put it back."""
        for position, entry in enumerate(self.entries):
            if entry.frame == frame:
                del self.entries[position]
                return position, entry
        return None

    def put_back(self, position: int, entry: MemoryEntry) -> bool:
        """Undo a take(): the entry returns to its position, unless the frame has an entry again or
        the bank has filled since (capacity is never exceeded). Returns whether it went back."""
        if len(self.entries) >= self.params.capacity or entry.frame in self.frames():
            return False
        self.entries.insert(min(position, len(self.entries)), entry)
        return True

    def rng_state(self) -> torch.Tensor:
        """The state of the softmax read's generator (undo restores it, so redo draws the same)."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._generator.set_state(state)

    def clear(self) -> None:
        self.entries.clear()
