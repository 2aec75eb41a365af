"""The figures behind the review's flag rule (tracking/review.py), on slicerio's CTChest4 and its
reference Segmentation.seg.nrrd: tables printed, written into docs/review.md.

    python -m medsam2.study.review_study [--checkpoint FILE --model NAME] [--image-size N] [--no-model]

1. Reference geometry (no model): for each segment, along each of the volume's three axes, the
   slice-to-slice area changes of the reference itself, the largest "jump" (how far one slice
   stands out from both neighbours, review.jump) and the gaps (empty slices inside the object).
   A true organ should not be flagged, so `max_jump` sits above the largest jump a reference
   segment makes; the table then says which thresholds would flag reference slices, and which
   share of constructed faults (a slice emptied; a leak adding 50 / 100 / 200 % of a slice's area)
   each catches. Faults and false flags are counted with the rule's own code (review_rows).
2. The decoder's confidence (a model): a box on each segment's middle axial slice, propagated;
   per segment the mean confidence, Spearman's correlation of slice confidence with slice Dice,
   slices flagged by the default rule and the review's recall@5 / @10 (study/evaluate.py). With
   the default random weights these figures only show that the pipeline runs: the confidence of
   an untrained decoder says nothing about the masks. Run it with a trained checkpoint for
   figures that mean something.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np

from ..io.volume_io import to_frames
from ..tracking.review import FlagRule, SliceRecord, flagged_frames, jump, review_rows

JUMPS = (0.2, 0.3, 0.4, 0.5, 0.6)
LEAKS = (0.5, 1.0, 2.0)  # a leak adds this share of the slice's own area


def chest_case():
    """(Volume, [(label, name, bool mask (k, j, i))]) of slicerio's CTChest4 and its reference
    segmentation (stored on the CT's own voxel grid: checked)."""
    import slicerio

    from ..io.volume_io import read_volume

    data = os.path.join(os.path.dirname(slicerio.__file__), "data")
    volume = read_volume(os.path.join(data, "CTChest4.nrrd"))
    seg = slicerio.read_segmentation(os.path.join(data, "Segmentation.seg.nrrd"))
    voxels = seg["voxels"] if seg["voxels"].ndim == 4 else seg["voxels"][..., None]  # (i, j, k, layer)
    if voxels.shape[:3] != volume.array.shape[::-1]:
        raise ValueError(f"the reference's grid {voxels.shape[:3]} is not the CT's {volume.array.shape[::-1]}")
    objects = [(s["labelValue"], s["name"], np.ascontiguousarray((voxels[..., s.get("layer", 0)] == s["labelValue"])
                                                                  .transpose(2, 1, 0))) for s in seg["segments"]]
    return volume, objects


def flags(areas, rule) -> list[int]:
    """The slices the rule flags on these areas, confidence aside (every record fully confident)."""
    records = {f: SliceRecord(1.0, 10.0, "propagated") for f in range(len(areas))}
    return flagged_frames(review_rows([1], lambda _o: records, lambda _o, f: int(areas[f]) if 0 <= f < len(areas)
                                      else 0, rule=rule))


def geometry_rows(objects) -> list[dict]:
    """Per (segment, axis): the reference's own area profile and what each threshold makes of it."""
    rows = []
    for _label, name, mask in objects:
        for axis in range(3):
            frames = to_frames(mask, axis)
            areas = frames.reshape(frames.shape[0], -1).sum(axis=1).astype(int)
            present = np.flatnonzero(areas)
            changes = [abs(int(a) - int(b)) / max(a, b) for a, b in zip(areas[:-1], areas[1:]) if a and b]
            inner = [f for f in present if 0 < f < len(areas) - 1 and areas[f - 1] and areas[f + 1]]
            row = {"segment": name, "axis": axis, "slices": len(present), "inner": len(inner),
                   "max_change": max(changes, default=0.0), "p95_change": float(np.percentile(changes, 95))
                   if changes else 0.0,
                   "max_jump": max((jump(areas[f], areas[f - 1], areas[f + 1]) for f in inner), default=0.0),
                   "gaps": int(sum(areas[f] == 0 for f in range(present[0], present[-1]))) if len(present) else 0,
                   "false": {}, "emptied": 0, "leak": {}}
            for t in JUMPS:
                rule = FlagRule(min_confidence=0.0, max_jump=t)
                row["false"][t] = len(flags(areas, rule))
                row["leak"][t] = {}
                for leak in LEAKS:
                    row["leak"][t][leak] = sum(f in flags(_with(areas, f, int(areas[f] * (1 + leak))), rule)
                                               for f in inner)
            row["emptied"] = sum(f in flags(_with(areas, f, 0), FlagRule()) for f in inner)
            rows.append(row)
    return rows


def _with(areas, frame, area):
    out = areas.copy()
    out[frame] = area
    return out


def format_geometry(rows) -> str:
    head = f"{'segment':<28} {'axis':>4} {'slices':>6} {'max change':>10} {'p95 change':>10} {'max jump':>8} {'gaps':>4}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['segment']:<28} {r['axis']:>4} {r['slices']:>6} {r['max_change']:>10.3f} "
                     f"{r['p95_change']:>10.3f} {r['max_jump']:>8.3f} {r['gaps']:>4}")
    slices = sum(r["slices"] for r in rows)
    inner = sum(r["inner"] for r in rows)
    lines += ["", f"all segments and axes: {slices} slices with the object, {inner} with both neighbours present",
              f"{'max_jump':>8} {'reference slices flagged':>24} "
              + " ".join(f"{f'leak +{int(leak * 100)}% caught':>17}" for leak in LEAKS)]
    for t in JUMPS:
        caught = [sum(r["leak"][t][leak] for r in rows) for leak in LEAKS]
        lines.append(f"{t:>8.1f} {sum(r['false'][t] for r in rows):>24} "
                     + " ".join(f"{c / inner:>17.0%}" for c in caught))
    lines.append(f"a slice emptied (default rule): {sum(r['emptied'] for r in rows) / inner:.0%} of {inner} caught")
    return "\n".join(lines)


def confidence_rows(model, volume, objects) -> list[dict]:
    from scipy.stats import spearmanr

    from .evaluate import REVIEW_KS, reference_prompt, review_recall, slice_dice

    rows = []
    for _label, name, ref in objects:
        session = model.open(volume.array)
        session.add_prompt(obj_id=1, **reference_prompt(ref))
        for _ in session.propagate():
            pass
        review = session.review(1)
        dices = slice_dice(session.mask(1), ref)
        session.close()
        conf = [r["confidence"] for r in review]
        rho = spearmanr(conf, [dices[r["frame"]] for r in review]).statistic if len(set(conf)) > 1 else float("nan")
        rows.append({"segment": name, "slices": len(review), "mean_confidence": float(np.mean(conf)),
                     "spearman": float(rho), "flagged": sum(r["flagged"] for r in review),
                     **{f"recall@{k}": review_recall(review, dices, k) for k in REVIEW_KS}})
    return rows


def format_confidence(rows, random_weights: bool) -> str:
    head = f"{'segment':<28} {'slices':>6} {'mean conf':>9} {'spearman':>8} {'flagged':>7} {'recall@5':>8} {'recall@10':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['segment']:<28} {r['slices']:>6} {r['mean_confidence']:>9.3f} {r['spearman']:>8.2f} "
                     f"{r['flagged']:>7} {r['recall@5']:>8.2f} {r['recall@10']:>9.2f}")
    if random_weights:
        lines.append("RANDOM WEIGHTS: the confidence of an untrained decoder says nothing about the masks; "
                     "these figures only show that the pipeline runs")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medsam2.study.review_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam2.1_hiera_tiny", help="registry model (with --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file; default: random weights for --model")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-model", action="store_true", help="only the reference geometry (part 1)")
    args = p.parse_args(argv)

    volume, objects = chest_case()
    print("1. the reference's own slice-to-slice areas (CTChest4, Segmentation.seg.nrrd)")
    print(format_geometry(geometry_rows(objects)))
    if args.no_model:
        return 0
    import medsam2
    from ..testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = args.checkpoint or write_random_checkpoint(f"{tmp}/random.pt", args.model, seed=0,
                                                                image_size=args.image_size)
        model = medsam2.load_model(args.model, checkpoint=checkpoint, device=args.device, image_size=args.image_size)
        print(f"\n2. the decoder's confidence ({args.model}, {args.image_size} px, a box on each middle axial slice)")
        print(format_confidence(confidence_rows(model, volume, objects), model.weights_are_random))
    return 0


if __name__ == "__main__":
    sys.exit(main())
