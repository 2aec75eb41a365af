"""How often the self-sorting bank reads what SAM2's recency window would have read: a table.

    python -m medsam2.study.bank_study [--checkpoint FILE --model NAME] [--image-size N] [--json FILE]

For each scenario it propagates slicerio's CTChest4 with memory="self-sorting" and compares, for
every tracked (slice, object), the bank entries read with the frames SAM2 would attend at that
moment (its window of the num_maskmem - 1 nearest frames already tracked on the side the pass
comes from: `MedSAM2Predictor.recency_window`, restricted to frames tracked before and not
prompted). Default weights: a random-weight checkpoint (the table says so): the read depends on
image similarity and on which slices were admitted, so the figures describe the mechanism, not
segmentation quality.

Columns: frames = tracked (slice, object) steps; read = mean bank entries read; same = share of
steps whose read equals SAM2's window as a set; overlap = mean |read & window| / |read | window|;
outside = mean entries read that SAM2 would not have read; distance = mean |slice - entry slice|
of the entries read (SAM2's window: 1..6); empty = steps with an empty bank (only prompted slices
read); admitted = steps whose frame the bank admitted (or swapped in for another entry);
redundant / low = steps it rejected by the replacement rule / for low confidence or absence.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings

import numpy as np

from .bench import CLICK, CORRECTION, chest_volume
from ..io.volume_io import to_frames

# (name, axis of the (34, 128, 128) CT to propagate along, bank settings, correction?)
SCENARIOS = [
    ("contiguous, 34 slices", 0, {}, False),
    ("contiguous, capacity 4", 0, {"capacity": 4}, False),
    ("contiguous, softmax read", 0, {"read": "softmax"}, False),
    ("correction + refine", 0, {}, True),
    ("long, 128 slices", 1, {}, False),
    ("long, 128 slices, capacity 4", 1, {"capacity": 4}, False),
]


def window_comparison(records: list[dict], recency_window) -> list[dict]:
    """Per record: the bank entries read, SAM2's window at that moment, and how they compare."""
    tracked: dict[int, set] = {}
    rows = []
    for r in records:
        done = tracked.setdefault(r["obj_id"], set())
        held = done - set(r["prompted"]) - {r["frame"]}
        window = {f for f in recency_window(r["frame"], r["direction"] == "backward") if f in held}
        read = {e["frame"] for e in r["recalled"]}
        union = read | window
        rows.append({"frame": r["frame"], "read": sorted(read), "window": sorted(window),
                     "same": read == window, "overlap": len(read & window) / len(union) if union else 1.0,
                     "outside": len(read - window), "distance": [abs(r["frame"] - f) for f in read],
                     "empty": r["bank_empty"], "admission": r["admission"] or ""})
        done.add(r["frame"])
    return rows


def summarise(name: str, rows: list[dict]) -> dict:
    n = len(rows)
    distances = [d for r in rows for d in r["distance"]]
    return {"scenario": name, "frames": n,
            "read": float(np.mean([len(r["read"]) for r in rows])) if n else 0.0,
            "same": sum(r["same"] for r in rows) / n if n else 0.0,
            "overlap": float(np.mean([r["overlap"] for r in rows])) if n else 0.0,
            "outside": float(np.mean([r["outside"] for r in rows])) if n else 0.0,
            "distance": float(np.mean(distances)) if distances else 0.0,
            "empty": sum(r["empty"] for r in rows),
            "admitted": sum(r["admission"].startswith(("admitted", "replaced")) for r in rows),
            "redundant": sum(r["admission"] == "rejected: redundant" for r in rows),
            "low": sum(r["admission"] in ("rejected: low confidence", "rejected: object absent") for r in rows)}


def run_scenario(model, volume, axis, bank, correction) -> list[dict]:
    frames = to_frames(volume, axis)
    n, rows, cols = frames.shape
    session = model.open(frames, memory="self-sorting", memory_bank=bank)
    # the bench's lung click (column, row of the middle slice), carried to this axis's frames
    # (along rows, axis 1: a frame's rows are the CT's slices, its columns the CT's columns)
    middle, (x, y) = (n // 2, CLICK) if axis == 0 else (int(CLICK[1]), (CLICK[0], rows // 2))
    session.add_prompt(middle, points=[[x, y]], labels=[1])
    for _ in session.propagate("both"):
        pass
    start = len(session.memory_trace())
    if correction:  # a click three quarters up, then its span is redone (as bench.py does)
        fix = (3 * n) // 4
        session.add_prompt(fix, points=[[CORRECTION[0], CORRECTION[1]]], labels=[1])
        for _ in session.propagate("both", start=fix, until="conditioning"):  # the figures in docs compare this
            pass
    records = session.memory_trace()
    rows = window_comparison(records, model.predictor.recency_window)
    return rows[start:] if correction else rows


def format_table(results: list[dict], random_weights: bool) -> str:
    head = f"{'scenario':<30} {'frames':>6} {'read':>5} {'same':>6} {'overlap':>7} {'outside':>7} " \
           f"{'distance':>8} {'empty':>5} {'admitted':>8} {'redundant':>9} {'low':>4}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['scenario']:<30} {r['frames']:>6} {r['read']:>5.2f} {r['same']:>6.0%} {r['overlap']:>7.2f} "
                     f"{r['outside']:>7.2f} {r['distance']:>8.2f} {r['empty']:>5} {r['admitted']:>8} "
                     f"{r['redundant']:>9} {r['low']:>4}")
    if random_weights:
        lines.append("RANDOM WEIGHTS: the figures describe the bank's mechanism, not segmentation quality")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medsam2.study.bank_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sam2.1_hiera_tiny", help="registry model (with --checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint file; default: random weights for --model")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="also write the per-scenario figures as JSON")
    args = p.parse_args(argv)

    import medsam2
    from ..testing import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checkpoint = args.checkpoint or write_random_checkpoint(f"{tmp}/random.pt", args.model, seed=0,
                                                                image_size=args.image_size)
        model = medsam2.load_model(args.model, checkpoint=checkpoint, device=args.device, image_size=args.image_size)
        volume = chest_volume(34)
        results = []
        for name, axis, bank, correction in SCENARIOS:
            print(f"running: {name}", file=sys.stderr, flush=True)
            results.append(summarise(name, run_scenario(model, volume, axis, bank, correction)))
    print(format_table(results, model.weights_are_random))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
