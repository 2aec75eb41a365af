"""Scoring: Dice, HD95 and a simulated user who prompts and corrects from a reference label.

Metrics (on bool arrays of any dimension; `spacing` is the voxel size along each array axis, in
mm, e.g. (k, j, i) spacing for a (k, j, i) array):

* Dice = 2 |P & R| / (|P| + |R|). Both empty: 1.0 (nothing to find, nothing found). One empty: 0.0.
* HD95 (mm): the surface of a mask is its voxels with a face neighbour outside it (voxels on the
  array border count as surface). For every surface voxel of P, the distance to the nearest
  surface voxel of R (Euclidean, in mm, scipy's exact distance transform), and the same from R to
  P; HD95 is the larger of the two 95th percentiles (numpy's linear interpolation) — the
  symmetric definition of MONAI's compute_hausdorff_distance(percentile=95). Both empty: 0.0.
  One empty: inf (no surface to measure to; the CLI's JSON writes null).

The simulated user (what `medsam2 evaluate` does for each object of a reference label):

1. Prompt: on the object's middle slice (the median of the slices, along the propagation axis,
   where the label is present; `medsam2 batch --prompt-from-label`: the slice where it has the most
   voxels, ties to the lowest) either a box — the label's bounding rectangle on that slice,
   pixel centres, no margin — or a click at the label pixel farthest from its border. 1 interaction.
2. Propagate through the volume (one axis, or axes="all" fused).
3. Each correction (optional, N of them): find the slice with the most wrong pixels (ties: the
   lowest index); click at the wrong pixel farthest from the right ones — an include click inside
   the missed part if at least as many pixels were missed as were wrongly added there, else an
   exclude click inside the wrongly added part; then re-propagate from that slice (one axis:
   outward from it to the next prompted slices; axes="all": the whole fused run again).
   1 interaction each; corrections stop early when the prediction equals the reference.

How well the review finds the slices that failed (per object, after the last correction): the
review (Session.review) ranks the slices flagged first, then by confidence ascending. Of the k
slices with the lowest per-slice Dice (k = 5 and 10; ties: the lower slice), recall@k is the
share the review flagged or ranked in its first k. With random test weights the figure says
nothing about the rule's quality (docs/review.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..tracking.fusion import interior_point
from ..options import AXES

PROMPT_KINDS = ("box", "click")


# -- metrics --------------------------------------------------------------------------------------
def _pair(pred, ref):
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    if p.shape != r.shape:
        raise InputError(f"prediction shape {p.shape} does not match the reference {r.shape}")
    return p, r


def dice(pred, ref) -> float:
    """Dice coefficient of two masks (1.0 when both are empty)."""
    p, r = _pair(pred, ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def surface(mask) -> np.ndarray:
    """Voxels of `mask` with at least one face neighbour outside it (or outside the array)."""
    from scipy.ndimage import binary_erosion, generate_binary_structure

    m = np.asarray(mask, bool)
    return m & ~binary_erosion(m, structure=generate_binary_structure(m.ndim, 1), border_value=0)


def _spacing(spacing, ndim):
    if spacing is None:
        return (1.0,) * ndim
    s = tuple(float(v) for v in np.atleast_1d(spacing))
    if len(s) != ndim or not all(np.isfinite(v) and v > 0 for v in s):
        raise InputError(f"spacing must be {ndim} positive numbers (one per array axis); got {spacing!r}")
    return s


def surface_distances(a, b, spacing=None) -> np.ndarray:
    """Distance (mm) from every surface voxel of `a` to the nearest surface voxel of `b`."""
    from scipy.ndimage import distance_transform_edt

    a, b = _pair(a, b)
    sa, sb = surface(a), surface(b)
    if not sa.any() or not sb.any():
        raise InputError("surface distances need two non-empty masks")
    to_b = distance_transform_edt(~sb, sampling=_spacing(spacing, a.ndim))
    return to_b[sa]


def hd95(pred, ref, spacing=None) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm (0.0 both empty, inf one empty)."""
    p, r = _pair(pred, ref)
    spacing = _spacing(spacing, p.ndim)
    has_p, has_r = bool(p.any()), bool(r.any())
    if not has_p and not has_r:
        return 0.0
    if has_p != has_r:
        return float("inf")
    return float(max(np.percentile(surface_distances(p, r, spacing), 95),
                     np.percentile(surface_distances(r, p, spacing), 95)))


# -- the simulated user ---------------------------------------------------------------------------
def _frames(mask, axis):
    from ..io.volume_io import to_frames

    return to_frames(np.asarray(mask, bool), axis)


def middle_slice(ref, axis=0) -> int:
    """The median of the slices (along `axis`) where the reference is present."""
    frames = _frames(ref, axis)
    present = np.flatnonzero(frames.reshape(frames.shape[0], -1).any(axis=1))
    if not len(present):
        raise InputError("the reference mask is empty: no prompt can be simulated")
    return int(present[len(present) // 2])


def largest_slice(ref, axis=0) -> int:
    """The slice (along `axis`) where the reference has the most voxels (ties: the lowest index), the
    key slice MedSAM2's own inference scripts prompt with a box from the label."""
    frames = _frames(ref, axis)
    area = frames.reshape(frames.shape[0], -1).sum(axis=1)
    if not area.any():
        raise InputError("the reference mask is empty: no prompt can be simulated")
    return int(np.argmax(area))


SLICE_RULES = {"middle": middle_slice, "largest": largest_slice}


def reference_prompt(ref, kind="box", axis=0, slice_rule="middle") -> dict:
    """The first prompt of the simulated user: add_prompt keyword arguments (frame, box or click) on the
    object's middle slice (`medsam2 evaluate`) or its largest (slice_rule="largest", `medsam2 batch`)."""
    if kind not in PROMPT_KINDS:
        raise InputError(f"prompt kind must be one of {PROMPT_KINDS}; got {kind!r}")
    frame = SLICE_RULES[slice_rule](ref, axis)
    section = _frames(ref, axis)[frame]
    if kind == "box":
        rows, cols = np.nonzero(section)
        return dict(frame=frame, box=[float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())])
    x, y = interior_point(section)
    return dict(frame=frame, points=[[x, y]], labels=[1])


def correction_click(pred, ref, axis=0):
    """The next correction click (add_prompt kwargs: frame, points, labels), or None if perfect."""
    p, r = _pair(pred, ref)
    pf, rf = _frames(p, axis), _frames(r, axis)
    wrong = (pf ^ rf).reshape(pf.shape[0], -1).sum(axis=1)
    if not wrong.any():
        return None
    frame = int(np.argmax(wrong))  # first of the worst
    missed = rf[frame] & ~pf[frame]
    added = pf[frame] & ~rf[frame]
    include = int(missed.sum()) >= int(added.sum())
    x, y = interior_point(missed if include else added)
    return dict(frame=frame, points=[[x, y]], labels=[1 if include else 0])


# -- how well the review finds the failed slices ---------------------------------------------------
REVIEW_KS = (5, 10)


def slice_dice(pred, ref, axis=0) -> np.ndarray:
    """Dice of each slice (along `axis`): 1.0 where both are empty."""
    p, r = _pair(pred, ref)
    pf, rf = _frames(p, axis), _frames(r, axis)
    return np.array([dice(p, r) for p, r in zip(pf, rf)])


def review_ranking(rows: list[dict]) -> list[int]:
    """The review's order of one object's slices for a user to look at: flagged first, then by
    confidence ascending, then by slice."""
    return [r["frame"] for r in sorted(rows, key=lambda r: (not r["flagged"], r["confidence"], r["frame"]))]


def review_recall(rows: list[dict], slice_dices, k: int) -> float:
    """Of the k reviewed slices with the lowest Dice (ties: the lower slice), the share the review
    flagged or ranked in its first k. k is capped at the number of reviewed slices (1.0 if none)."""
    frames = [r["frame"] for r in rows]
    k = min(int(k), len(frames))
    if not k:
        return 1.0
    worst = sorted(frames, key=lambda f: (float(slice_dices[f]), f))[:k]
    found = {r["frame"] for r in rows if r["flagged"]} | set(review_ranking(rows)[:k])
    return sum(f in found for f in worst) / k


@dataclass
class ObjectScore:
    label: int
    name: str
    dice: float
    hd95_mm: float
    interactions: int
    reference_voxels: int
    predicted_voxels: int
    prompts: list = field(default_factory=list)  # the add_prompt calls made, in order
    flagged_slices: int = 0  # slices the review flagged (Session.review)
    review_recall: dict = field(default_factory=dict)  # k -> recall@k of the review (review_recall)

    def as_dict(self) -> dict:
        return {"label": self.label, "name": self.name, "dice": self.dice,
                "hd95_mm": self.hd95_mm if np.isfinite(self.hd95_mm) else None,
                "interactions": self.interactions, "reference_voxels": self.reference_voxels,
                "predicted_voxels": self.predicted_voxels, "flagged_slices": self.flagged_slices,
                **{f"review_recall_at_{k}": v for k, v in self.review_recall.items()}}


def prompt_interactions(prompt: dict) -> int:
    """What a prompt costs a user: one per click, one per box."""
    n = 0 if prompt.get("points") is None else len(np.asarray(prompt["points"]).reshape(-1, 2))
    return n + (prompt.get("box") is not None)


def evaluate_object(model, volume, ref, label=1, name="", spacing=None, memory="self-sorting", axes="one",
                    corrections=0, prompt_kind="box", prompts=None, window=None) -> tuple:
    """Simulate a user on one object; returns (ObjectScore, predicted bool mask).

    volume, ref: (slices, rows, cols) arrays, frames along axis 0. prompts: add_prompt kwargs to use
    instead of the simulated first prompt (e.g. from a prompts file); corrections are simulated.
    """
    if axes not in AXES:
        raise InputError(f"axes must be one of {AXES}; got {axes!r}")
    if int(corrections) < 0:
        raise InputError(f"corrections must be 0 or more; got {corrections}")
    ref = np.asarray(ref, bool)
    if ref.shape != np.asarray(volume).shape:
        raise InputError(f"reference shape {ref.shape} does not match the image {np.asarray(volume).shape}")
    spacing = _spacing(spacing, 3)
    session = model.open(volume, memory=memory, window=window)
    given = list(prompts) if prompts else [reference_prompt(ref, prompt_kind)]
    made = []
    for p in given:
        session.add_prompt(obj_id=1, **p)
        made.append(p)
    _run(session.propagate(axes=axes))
    pred = session.mask(1)
    for _ in range(int(corrections)):
        click = correction_click(pred, ref)
        if click is None:
            break
        session.add_prompt(obj_id=1, **click)
        made.append(click)
        if axes == "all":
            _run(session.propagate(axes="all"))
        else:
            _run(session.propagate("both", start=click["frame"]))
        pred = session.mask(1)
    rows = session.review(1)
    session.close()
    dices = slice_dice(pred, ref)
    score = ObjectScore(label=int(label), name=str(name), dice=dice(pred, ref), hd95_mm=hd95(pred, ref, spacing),
                        interactions=sum(prompt_interactions(p) for p in made),
                        reference_voxels=int(ref.sum()), predicted_voxels=int(pred.sum()), prompts=made,
                        flagged_slices=sum(r["flagged"] for r in rows),
                        review_recall={k: review_recall(rows, dices, k) for k in REVIEW_KS})
    return score, pred


def _run(generator):
    for _ in generator:
        pass
