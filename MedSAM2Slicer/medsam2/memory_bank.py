"""MedSAM-2's self-sorting memory bank, as plain data and rules (no model code here).

SAM2 attends to the most recent frames. Along a volume that means the memories are the slices
just propagated, including the bad ones. MedSAM-2 instead keeps a fixed-size bank of confident,
mutually dissimilar memories and reads those most similar to the current frame. The rules below
are the ones documented in docs/memory-bank.md; each is unit-tested with hand-made entries.

Admission (after a non-conditioning frame is segmented):
  * confidence = sigmoid IoU prediction of the chosen mask if the object-score logit > 0, else 0;
    entries below `min_confidence` are not admitted;
  * until the bank holds `capacity` entries, admit;
  * when full: A = the entry least similar to the new one, B = A's most similar other entry
    (cosine similarity of flattened memory features). If sim(new, A) < sim(A, B) and
    conf(new) > conf(B) - `replace_margin`, B is replaced by the new entry; else it is rejected.
Reading (for each frame to segment):
  * "topk" (default): the k entries whose stored image embedding is most cosine-similar to the
    current frame's, most similar first, ties broken by frame index (deterministic);
  * "softmax": the reference's sampling: k entries drawn without replacement with probabilities
    softmax(similarity / temperature), from a seeded generator; returned most similar first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

READ_MODES = ("topk", "softmax")


@dataclass
class MemoryEntry:
    frame: int
    confidence: float
    memory_descriptor: torch.Tensor  # flattened memory features, unit-normalised (admission)
    image_descriptor: torch.Tensor  # pooled image embedding, unit-normalised (reading)
    payload: dict = field(default_factory=dict)  # what the model attends to: features, pos enc, obj ptr


def unit(vector: torch.Tensor) -> torch.Tensor:
    """Flatten to float32 and scale to unit length (a zero vector stays zero)."""
    v = vector.detach().reshape(-1).to(torch.float32)
    return v / v.norm().clamp_min(1e-12)


@dataclass
class BankParams:
    capacity: int = 16
    min_confidence: float = 0.5
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
        if entry.confidence < p.min_confidence:
            return "rejected: low confidence"
        self.discard([entry.frame])  # a re-segmented frame replaces its own older memory
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

    def read(self, image_descriptor: torch.Tensor, k: int) -> list[MemoryEntry]:
        """The k entries to attend to for a frame with this image descriptor, most similar first."""
        if k <= 0 or not self.entries:
            return []
        sims = torch.stack([e.image_descriptor for e in self.entries]) @ image_descriptor
        k = min(k, len(self.entries))
        if self.params.read == "softmax":
            probs = torch.softmax(sims / self.params.temperature, dim=0)
            chosen = torch.multinomial(probs, k, replacement=False, generator=self._generator).tolist()
        else:
            chosen = range(len(self.entries))
        ranked = sorted(chosen, key=lambda i: (-float(sims[i]), self.entries[i].frame))
        return [self.entries[i] for i in ranked[:k]]

    def discard(self, frames) -> None:
        drop = set(frames)
        self.entries = [e for e in self.entries if e.frame not in drop]

    def clear(self) -> None:
        self.entries.clear()
