"""Multi-axis fusion: propagate along all three axes of a volume and fuse per voxel.

`session.propagate(axes="all")`. The MedSAM-2 paper processes a volume along its orientations; it
does not say how they are combined: the mean-of-probabilities rule below is this project's own.
For a session on a (slices, rows, cols) volume V:

1. The session itself propagates along its own axis (V's axis 0), exactly as `propagate()` does,
   so its tracking state afterwards is the single-axis one (corrections refine from it).
2. Two more sessions are opened on transposed views of the same V (frames along V's axis 1, then
   axis 2; layout from volume_io.FRAME_LAYOUTS), with the same window and memory mode. The
   session's prompts are replayed on them, mapped as follows:
   * a point at frame f, pixel (x, y) is the voxel (f, y, x) of V, which lies on one frame of each
     other axis (the nearest slice to a continuous position); it keeps its label there;
   * a box becomes one include point at its centre: on another axis the box is a line one slice
     thick, and its extent across the session's slices is unknown, so no box is made;
   * a mask becomes one include point at its most interior pixel (farthest from the background;
     first in row-major order on ties); an empty mask carries nothing;
   * every point that lands on the same (object, frame) of an axis is one prompt there; a frame
     that gets only exclude points for an object is dropped (alone, they would make SAM2 condition
     on an empty mask at that frame, which stops the object there).
   An object must keep at least one prompt on each axis, else nothing runs (InputError).
3. Each of the three runs goes forward from its first prompted frame and back ("both").
4. Per voxel and object: p = mean of the three probabilities (sigmoid of the logits, float32,
   summed in axis order 0, 1, 2, then divided by 3); the voxel is inside when p > 0.5. Where all
   three runs agree (each says inside: logit > 0, or each says outside) the fused voxel takes that
   answer. The mean already gives it except when a probability rounds to exactly 0.5 in float32,
   so this rule only makes the guarantee exact: *where the three single-axis masks agree, the
   fused mask is the same; where they disagree, the mean probability decides.*
5. The fused masks replace the session's results, so mask() / masks() / frame_masks() return them.

What the generator yields: while the three runs go on, (FusionProgress, {}) items (plus a third
{} when probabilities=True), one per frame finished on any axis (each frame of an axis once: n0 +
n1 + n2 items, `total_steps` counts them with the fused frames); then, once everything is fused,
(frame, {obj_id: fused mask}) for every frame 0..N-1 of the session's own axis (with
probabilities=True: (frame, masks, {obj_id: fused mean probability})). Consumers that skip items
with no masks work unchanged. `cancel` is checked before every frame of every run: a cancel during
the session's own run keeps its finished frames (as a single-axis propagate does); a cancel
during the other runs leaves the complete single-axis result; fused masks are written only when
all three runs finished. Only the default whole-volume run is fused: direction="both" without
start / stop (to refine a correction, propagate along the one axis, or re-run axes="all").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io.volume_io import from_frames, index_to_frame_pixel, to_frames
from ..options import AXES

# session -> {axis: session on that axis}; the other-axis sessions (and their cached image
# features) live as long as the session, so a second fused run does not re-encode every frame
_OTHER_AXIS_SESSIONS = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FusionProgress:
    """One frame finished on one axis: `axis` is the numpy axis of the session's volume (0 = its
    own frames), `frame` the frame index along it; done / total count all frames of all runs."""

    axis: int
    frame: int
    done: int
    total: int


def total_steps(shape) -> int:
    """How many FusionProgress items, then fused frames, a fused run of a volume of `shape` yields."""
    # a "both" run yields each of its axis's n frames once, then the n0 fused frames follow
    return sum(int(n) for n in shape) + int(shape[0])


def prompt_points(prompt) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) points and labels one prompt (from Session.prompts()) carries to the other axes."""
    pts, lbl = [], []
    if prompt.get("box") is not None:
        x0, y0, x1, y1 = (float(v) for v in prompt["box"])
        pts.append(((x0 + x1) / 2.0, (y0 + y1) / 2.0))
        lbl.append(1)
    if prompt.get("points") is not None:
        pts.extend((float(x), float(y)) for x, y in np.asarray(prompt["points"]).reshape(-1, 2))
        lbl.extend(int(v) for v in np.asarray(prompt["labels"]).reshape(-1))
    if prompt.get("mask") is not None:
        inner = interior_point(np.asarray(prompt["mask"], bool))
        if inner is not None:
            pts.append(inner)
            lbl.append(1)
    return np.asarray(pts, np.float64).reshape(-1, 2), np.asarray(lbl, np.int32)


def interior_point(mask: np.ndarray):
    """(x, y) of the mask pixel farthest from the background (None for an empty mask)."""
    from scipy.ndimage import distance_transform_edt

    if not mask.any():
        return None
    # pad so pixels on the image border are near "outside" too
    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(col), float(row)


def axis_prompts(session, axis) -> list[dict]:
    """The session's prompts mapped onto frames along `axis` (1 or 2) of its volume.

    Returns add_prompt keyword dicts {frame, obj_id, points, labels}, objects in the session's
    order, frames ascending. Raises InputError if an object would have no prompt on that axis.
    """
    if axis not in (1, 2):
        raise InputError(f"axis must be 1 or 2 (axis 0 is the session's own); got {axis!r}")
    n_frames = session.frames.volume.shape[axis]
    grouped: dict[tuple[int, int], list] = {}
    for prompt in session.prompts():
        pts, lbl = prompt_points(prompt)
        if not len(pts):
            continue
        # voxel (slice f, row y, col x) of the (slices, rows, cols) volume is index (i=x, j=y, k=f)
        ijk = np.column_stack([pts[:, 0], pts[:, 1], np.full(len(pts), float(prompt["frame"]))])
        frame, x, y = index_to_frame_pixel(ijk, axis)
        frame = np.clip(np.floor(frame + 0.5), 0, n_frames - 1).astype(int)
        for f, px, py, label in zip(frame, x, y, lbl):
            grouped.setdefault((prompt["obj_id"], int(f)), []).append((px, py, int(label)))
    out = []
    for obj_id in session.obj_ids:
        frames = sorted(f for (o, f) in grouped if o == obj_id and any(p[2] == 1 for p in grouped[(o, f)]))
        if not frames:
            raise InputError(
                f"object {obj_id}: none of its prompts can be carried to the other axes (axes='all' needs "
                "an include point, a box or a non-empty mask per object)")
        for f in frames:
            entries = grouped[(obj_id, f)]
            out.append(dict(frame=f, obj_id=obj_id,
                            points=np.array([(px, py) for px, py, _ in entries], np.float32),
                            labels=np.array([label for _, _, label in entries], np.int32)))
    return out


def propagate_all_axes(session, direction="both", start=None, stop=None, cancel=None, probabilities=False,
                       axes="all"):
    """Session.propagate(axes="all"); everything is checked before the first frame runs."""
    if axes not in AXES:
        raise InputError(f"axes must be one of {AXES}; got {axes!r}")
    if getattr(session, "is_image_set", False):
        raise InputError("axes='all' fuses the three axes of a volume; an image set has only its images")
    if direction != "both" or start is not None or stop is not None:
        raise InputError(
            "axes='all' propagates the whole volume along each axis: use direction='both' without start/stop "
            "(to refine after a correction, propagate along one axis or run axes='all' again)")
    own = session.propagate("both", cancel=cancel, probabilities=True)  # validates objects and prompts
    plans = {axis: axis_prompts(session, axis) for axis in (1, 2)}
    return _fuse(session, own, plans, cancel, probabilities)


def _other_axis_session(session, axis):
    subs = _OTHER_AXIS_SESSIONS.setdefault(session, {})
    sub = subs.get(axis)
    if sub is None:
        sub = session.model.open(to_frames(session.frames.volume, axis), memory=session.memory,
                                 window=session.frames.window,
                                 memory_bank=session.bank_params)
        subs[axis] = sub
    else:
        sub.reset()
    return sub


def _fuse(session, own, plans, cancel, probabilities):
    shape = session.frames.volume.shape
    obj_ids = session.obj_ids
    total = total_steps(shape)
    done = 0
    prob_sum = {o: np.zeros(shape, np.float32) for o in obj_ids}
    votes = {o: np.zeros(shape, np.uint8) for o in obj_ids}
    cancelled = lambda: cancel is not None and cancel.is_set()  # noqa: E731

    def run(axis, gen, axis_session):
        nonlocal done
        views = {o: to_frames(prob_sum[o], axis) for o in obj_ids}
        finished = 0
        for frame, _masks, probs in gen:  # each frame once, with the result its run keeps
            for o in obj_ids:
                views[o][frame] += probs[o]
            finished += 1
            done += 1
            progress = FusionProgress(axis, int(frame), done, total)
            yield (progress, {}, {}) if probabilities else (progress, {})
        if cancelled() or finished < axis_session.num_frames:
            return False
        for o in obj_ids:
            votes[o] += from_frames(axis_session.mask(o), axis)
        return True

    if not (yield from run(0, own, session)):
        return
    for axis in (1, 2):
        if cancelled():
            return
        sub = _other_axis_session(session, axis)
        for kwargs in plans[axis]:
            sub.add_prompt(**kwargs)
        if not (yield from run(axis, sub.propagate("both", cancel=cancel, probabilities=True), sub)):
            return
        sub.reset()  # keep the cached features, free the tracking state

    fused = {}
    for o in obj_ids:
        mean = prob_sum[o]
        mean /= np.float32(3.0)  # in place: the sum is no longer needed
        fused[o] = np.where(votes[o] == 3, True, np.where(votes[o] == 0, False, mean > 0.5))
        session.replace_masks(o, fused[o])
    for f in range(shape[0]):
        masks = {o: fused[o][f] for o in obj_ids}
        yield (f, masks, {o: prob_sum[o][f] for o in obj_ids}) if probabilities else (f, masks)
