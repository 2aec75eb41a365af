"""`medsam2 segment`: segment a volume from prompt files and write a .seg.nrrd or a label map.

Everything that can be wrong with the inputs (image, prompts, output path) is checked before the
model loads, so a typo costs seconds, not a propagation.
"""

import sys
import time

from .common import (add_axes_argument, add_compile_argument, add_memory_argument, add_model_arguments,
                     add_window_argument, check_model_inputs, load_model_for_cli, say)


def add_arguments(p):
    p.add_argument("image", metavar="IMAGE",
                   help="3D image: NIfTI (.nii/.nii.gz), NRRD, MHA/MHD file, or a folder holding a DICOM series")
    p.add_argument("--prompts", "-p", required=True, nargs="+", metavar="PROMPTS",
                   help="prompts .json (see docs/cli.md) and/or Slicer markups .mrk.json files (point lists, ROIs)")
    p.add_argument("--output", "-o", required=True, metavar="OUT",
                   help="output: .seg.nrrd (Slicer segmentation, named segments) or .nii.gz/.nii/.nrrd/.mha label map")
    add_model_arguments(p)
    add_memory_argument(p)
    p.add_argument("--axis", type=int, default=0, choices=(0, 1, 2),
                   help="numpy axis of the (k, j, i) voxel array to propagate along: 0 = slices k (default; "
                        "axial for an axial scan), 1 = rows j, 2 = columns i")
    add_axes_argument(p, "one: propagate along --axis (default); all: along all three axes, fused per voxel by "
                         "the mean of probabilities (docs/modes.md)")
    add_compile_argument(p)
    add_window_argument(p, "intensity window, e.g. -160 240 for abdomen CT (default: 0.5-99.5 percentiles)")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when the DICOM folder holds several")
    p.add_argument("--memory-trace", metavar="FILE.json",
                   help="also write what each tracked slice attended to and what the memory held (JSON records, "
                        "docs/memory-bank.md), and beside it FILE.png: tracked slice x attended slice")
    p.add_argument("--review", metavar="FILE.csv",
                   help="also write the per-slice review (one row per slice and object: confidence, object score, "
                        "area, change, source, flagged; docs/review.md) and list the flagged slices at the end")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT (and the memory trace and review files) if they exist")


def run(args):
    from ..io import prompts_io, volume_io

    # 1. inputs, before anything slow
    volume_io.check_output_path(args.output, args.overwrite)
    check_model_inputs(args)
    trace_paths = _trace_paths(args.memory_trace, args.overwrite) if args.memory_trace else None
    review_path = _review_path(args.review, args.overwrite) if args.review else None
    volume = volume_io.read_volume(args.image, series=args.series)
    objects = prompts_io.read_prompts(args.prompts)
    frame_prompts = prompts_io.to_frame_prompts(objects, volume, args.axis)
    frames = volume_io.to_frames(volume.array, args.axis)
    say(f"{volume.source}: {volume.size[0]}x{volume.size[1]}x{volume.size[2]} voxels; "
        f"{len(objects)} object(s), {len(frame_prompts)} prompted frame(s); {frames.shape[0]} frames along axis {args.axis}")

    # 2. model and session
    from ..tracking.volume_job import open_prompted, propagate_objects, write_result

    model = load_model_for_cli(args, "results")
    session = open_prompted(model, volume, frame_prompts, axis=args.axis, memory=args.memory, window=args.window)

    # 3. propagate (the order: tracking/volume_job.py)
    started = time.perf_counter()
    bar = _progress(frames.shape[0] if args.axes == "one" else _fusion_steps(frames.shape))
    try:
        results = propagate_objects(session, objects, axis=args.axis, axes=args.axes, on_step=lambda: bar.update(1))
    finally:
        bar.close()

    # 4. write
    write_result(args.output, results, volume, overwrite=args.overwrite)

    if trace_paths is not None:
        _write_trace(session, frames.shape[0], *trace_paths)
    if review_path is not None:
        _write_review(session, objects, review_path)

    voxel_ml = float(volume.spacing[0] * volume.spacing[1] * volume.spacing[2]) / 1000.0
    print(f"wrote {args.output} ({time.perf_counter() - started:.1f} s propagation)")
    for obj, _index, mask in results:
        count = int(mask.sum())
        note = "  (empty)" if count == 0 else ""
        print(f"  {obj.id:>3} {obj.name}: {count} voxels, {count * voxel_ml:.1f} mL{note}")
    return 0


def _trace_paths(path, overwrite):
    """(FILE.json, FILE.png) for --memory-trace, checked before anything slow."""
    from pathlib import Path

    from ..errors import InputError

    trace = Path(path)
    if trace.suffix.lower() != ".json":
        raise InputError(f"--memory-trace {path}: give a .json file name (the picture is written beside it as .png)")
    picture = trace.with_suffix(".png")
    for p in (trace, picture):
        if p.exists() and not overwrite:
            raise InputError(f"{p} exists; use --overwrite to replace it")
    if not trace.parent.is_dir():
        raise InputError(f"--memory-trace {path}: folder {trace.parent} does not exist")
    return trace, picture


def _write_trace(session, num_frames, trace, picture):
    import json

    from ..io.files import atomic_output
    from ..study.trace_picture import save_trace_picture

    records = session.memory_trace()  # along --axis (a fused run's other axes are not traced)
    with atomic_output(trace) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(records, indent=1) + "\n")
    with atomic_output(picture) as tmp:
        width, height = save_trace_picture(records, num_frames, tmp)
    print(f"wrote {trace} ({len(records)} tracked slice x object records) and {picture} ({width} x {height} px)")


def _review_path(path, overwrite):
    """--review FILE.csv, checked before anything slow."""
    from pathlib import Path

    from ..errors import InputError

    review = Path(path)
    if review.suffix.lower() != ".csv":
        raise InputError(f"--review {path}: give a .csv file name")
    if review.exists() and not overwrite:
        raise InputError(f"{review} exists; use --overwrite to replace it")
    if not review.parent.is_dir():
        raise InputError(f"--review {path}: folder {review.parent} does not exist")
    return review


def _write_review(session, objects, path):
    """One row per slice and object (slices along --axis), then the flagged slices on stdout."""
    import csv

    from ..io.files import atomic_output
    from ..tracking.review import REVIEW_KEYS, flagged_frames

    rows = session.review()
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=REVIEW_KEYS)
            writer.writeheader()
            writer.writerows(rows)
    print(f"wrote {path} ({len(rows)} slice x object rows)")
    for obj in objects:
        flagged = flagged_frames(rows, obj.id)
        listed = ", ".join(map(str, flagged)) if flagged else "none"
        print(f"  {obj.id:>3} {obj.name}: {len(flagged)} slice(s) flagged for review: {listed}")


def _fusion_steps(shape):
    from ..tracking.fusion import total_steps

    return total_steps(shape)


def _progress(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc="propagating", file=sys.stderr, dynamic_ncols=True)
