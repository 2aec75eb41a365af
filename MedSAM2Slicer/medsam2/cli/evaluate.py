"""`medsam2 evaluate`: simulate a user on labelled cases and report Dice, HD95 and interactions.

IMAGE and LABEL are one case (a volume file or DICOM folder, and a .seg.nrrd or label map), or two
folders of cases matched by name (see docs/modes.md). Every input is checked before the model
loads. The simulated user and the metrics are defined in medsam2/study/evaluate.py.
"""

import json
import os
import time

from .batch import add_ray_arguments
from .common import (add_axes_argument, add_memory_argument, add_model_arguments, add_window_argument,
                     check_model_inputs, load_model_for_cli, say)

VOLUME_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def add_arguments(p):
    p.add_argument("image", metavar="IMAGE", help="3D image file or DICOM series folder, or a folder of cases")
    p.add_argument("label", metavar="LABEL",
                   help="reference: a Slicer .seg.nrrd or a label map (one object per value), or a folder of them")
    p.add_argument("--prompts", default="auto", metavar="auto|P",
                   help="auto (default): a simulated box or click on each object's middle slice; or a prompts "
                        "file (.json / .mrk.json, as for `segment`; a folder of <case>.json for folders of cases)")
    p.add_argument("--prompt-kind", default="box", choices=("box", "click"),
                   help="the simulated first prompt with --prompts auto (default box)")
    p.add_argument("--corrections", type=int, default=0, metavar="N",
                   help="simulated correction clicks per object on its worst slices (default 0)")
    p.add_argument("--labels", nargs="+", metavar="L",
                   help="evaluate only these objects: label values or segment names (default: all)")
    add_model_arguments(p)
    add_memory_argument(p)
    add_axes_argument(p, "one: propagate along the slices (axis 0); all: along all three axes, fused (docs/modes.md)")
    add_window_argument(p, "intensity window (default: the 0.5-99.5 percentiles of each volume)")
    p.add_argument("--output", "-o", metavar="OUT",
                   help="write the prediction: a .seg.nrrd or label map for one case; a folder for folders of cases "
                        "(one <case>.seg.nrrd each)")
    p.add_argument("--json", metavar="FILE", help="write the scores as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_ray_arguments(p)


# -- cases -----------------------------------------------------------------------------------------
def case_name(path):
    base = os.path.basename(os.path.normpath(path))
    lower = base.lower()
    for ext in VOLUME_EXTENSIONS:
        if lower.endswith(ext):
            return base[:len(base) - len(ext)]
    return base


def find_cases(image, label, prompts):
    """[(name, image path, label path, prompts path or None)]; one case, or folders matched by name."""
    from ..errors import InputError

    for what, path in (("IMAGE", image), ("LABEL", label)):
        if not os.path.exists(path):
            raise InputError(f"{what} {path}: no such file or folder")
    if not os.path.isdir(label):
        if prompts != "auto" and not os.path.isfile(prompts):
            raise InputError(f"--prompts {prompts}: no such file (give a prompts .json / .mrk.json, or auto)")
        return [(case_name(image), image, label, None if prompts == "auto" else prompts)]
    if not os.path.isdir(image):
        raise InputError(f"LABEL {label} is a folder of cases, so IMAGE must be a folder too; got the file {image}")
    labels = {case_name(e.path): e.path for e in os.scandir(label)
              if e.is_file() and e.name.lower().endswith(VOLUME_EXTENSIONS) and not e.name.startswith(".")}
    cases, unmatched = [], []
    for entry in sorted(os.scandir(image), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if not (entry.is_dir() or entry.name.lower().endswith(VOLUME_EXTENSIONS)):
            continue
        name = case_name(entry.path)
        # nnU-Net names images <case>_0000; its labels are <case>
        ref = labels.get(name) or (labels.get(name[:-5]) if name.endswith("_0000") else None)
        if ref is None:
            unmatched.append(entry.name)
            continue
        cases.append((name, entry.path, ref, _case_prompts(prompts, name)))
    if unmatched:
        raise InputError(f"{image}: no label in {label} for {', '.join(unmatched)} (labels are matched by file name, "
                         "e.g. case1.nii.gz <-> case1.seg.nrrd)")
    if not cases:
        raise InputError(f"{image}: no image files or DICOM folders found to evaluate")
    return cases


def _case_prompts(prompts, name):
    from ..errors import InputError

    if prompts == "auto":
        return None
    if not os.path.isdir(prompts):
        raise InputError(f"--prompts {prompts}: with folders of cases, give auto or a folder of <case>.json files")
    for ext in (".json", ".mrk.json"):
        path = os.path.join(prompts, name + ext)
        if os.path.isfile(path):
            return path
    raise InputError(f"--prompts {prompts}: no {name}.json or {name}.mrk.json for case {name}")


# -- reference labels ------------------------------------------------------------------------------
def read_reference(path, volume, select=None):
    """[(label, name, bool mask (k, j, i))] of a .seg.nrrd or label map, on `volume`'s voxel grid.

    .seg.nrrd: segments numbered 1, 2, ... in file order, with their names. Label map: one object
    per non-zero value, named "label N". A reference on another grid (e.g. Slicer's cropped
    .seg.nrrd) is resampled onto the image's by nearest neighbour. `select`: values or names.
    """
    import numpy as np
    import SimpleITK as sitk

    from ..errors import InputError
    from ..io.files import read_sitk_image

    reference = volume.reference_image(np.zeros(volume.array.shape, np.uint8))
    if path.lower().endswith(".seg.nrrd"):
        import slicerio

        try:
            seg = slicerio.read_segmentation(path)
        except Exception as exc:  # slicerio raises plain errors for malformed files
            raise InputError(f"{path}: cannot read this segmentation ({exc})") from None
        voxels = seg["voxels"]
        layers = voxels if voxels.ndim == 4 else voxels[None]
        ijk_to_lps = np.asarray(seg["ijkToLPS"], float)
        _check_overlap(path, np.any(layers, axis=0).transpose(2, 1, 0), ijk_to_lps, volume)
        onto = [_onto_grid(layer.transpose(2, 1, 0), ijk_to_lps, reference) for layer in layers]
        objects = [(n + 1, s.get("name") or s.get("id") or f"segment {n + 1}",
                    onto[s.get("layer", 0)] == s.get("labelValue", 1)) for n, s in enumerate(seg["segments"])]
    else:
        image = read_sitk_image(path, "LABEL", "a label file is a .seg.nrrd or a 3D label map (NIfTI, NRRD, MHA)")
        if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() != 3:
            raise InputError(f"{path}: a label map must be a 3D scalar image")
        array = sitk.GetArrayFromImage(image)
        if not np.issubdtype(array.dtype, np.integer):
            if not np.array_equal(array, np.round(array)):
                raise InputError(f"{path}: has non-integer values; a label map holds integer labels")
            array = array.astype(np.int64)
        m = np.eye(4)
        m[:3, :3] = np.asarray(image.GetDirection(), float).reshape(3, 3) @ np.diag(image.GetSpacing())
        m[:3, 3] = image.GetOrigin()
        _check_overlap(path, array, m, volume)
        array = _onto_grid(array, m, reference)
        objects = [(int(v), f"label {int(v)}", array == v) for v in np.unique(array) if v != 0]
    if select:
        chosen = []
        for item in select:
            hit = [o for o in objects if o[1] == item or (item.lstrip("-").isdigit() and o[0] == int(item))]
            if not hit:
                known = ", ".join(f"{o[0]} ({o[1]})" for o in objects)
                raise InputError(f"{path}: no object {item!r}; it has {known}")
            chosen.extend(h for h in hit if h not in chosen)
        objects = chosen
    if not objects:
        raise InputError(f"{path}: holds no labelled object")
    return objects


def _check_overlap(path, array_kji, ijk_to_lps, volume):
    """A label file whose labelled voxels lie wholly outside the image is a mismatch (another scan, or
    coordinates lost on export), not an empty reference: say so, and where each lies."""
    import numpy as np

    from ..errors import InputError
    from ..io.volume_io import bounds_overlap, describe_bounds, grid_bounds

    labelled = np.nonzero(array_kji)
    if not labelled[0].size:
        return  # nothing labelled at all: reported as such by the caller
    first = np.array([a.min() for a in labelled])[::-1]  # (i, j, k)
    size = np.array([a.max() for a in labelled])[::-1] - first + 1
    labels_at = grid_bounds(ijk_to_lps, size, first)
    if not bounds_overlap(labels_at, volume.bounds):
        raise InputError(
            f"LABEL {path} does not overlap IMAGE {volume.source}: the image lies at "
            f"{describe_bounds(volume.bounds)}, the labelled voxels at {describe_bounds(labels_at)}. "
            "Give the labels of this image, on its scanner coordinates (origin, spacing and direction as read)")


def _onto_grid(array_kji, ijk_to_lps, reference):
    """Nearest-neighbour resample of a (k, j, i) array with this ijk->LPS matrix onto `reference`'s grid."""
    import numpy as np
    import SimpleITK as sitk

    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    same = (tuple(array_kji.shape[::-1]) == tuple(reference.GetSize())
            and np.allclose(spacing, reference.GetSpacing(), rtol=1e-5, atol=1e-6)
            and np.allclose(direction.reshape(-1), reference.GetDirection(), atol=1e-5)
            and np.allclose(ijk_to_lps[:3, 3], reference.GetOrigin(), atol=1e-4 * float(min(spacing))))
    if same:
        return np.asarray(array_kji)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in direction.reshape(-1)])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def _file_prompts(path, volume, objects):
    """Per reference object: add_prompt kwargs from a prompts file (matched by name, then by id)."""
    from ..io import prompts_io
    from ..errors import InputError

    given = prompts_io.read_prompts([path])
    frame_prompts = prompts_io.to_frame_prompts(given, volume, 0)
    by_label = {}
    for obj in given:
        match = [o for o in objects if o[1] == obj.name] or [o for o in objects if o[0] == obj.id]
        if not match:
            raise InputError(f"{path}: object {obj.name!r} (id {obj.id}) matches no reference object by name or label")
        by_label[match[0][0]] = [dict(frame=fp.frame, points=fp.points, labels=fp.labels, box=fp.box)
                                 for fp in frame_prompts if fp.obj_id == obj.id]
    return by_label


# -- one case (on a worker: this process, or a Ray actor) ---------------------------------------------
def load_case(case, select):
    """(volume, reference objects, file prompts or None) of one (name, image, label, prompts) case."""
    from ..io import volume_io

    name, image, label, prompts = case
    volume = volume_io.read_volume(image)
    objects = read_reference(label, volume, select)
    file_prompts = _file_prompts(prompts, volume, objects) if prompts else None
    if file_prompts is not None:
        objects = [o for o in objects if o[0] in file_prompts]
    empty = [f"{o[0]} ({o[1]})" for o in objects if not o[2].any()]
    if empty and file_prompts is None:
        say(f"{name}: skipping empty reference object(s) {', '.join(empty)}: nothing to prompt")
        objects = [o for o in objects if o[2].any()]
    return volume, objects, file_prompts


def evaluate_case(model, case, settings: dict, loaded=None, output=None, overwrite=False) -> dict:
    """Simulate the user on every object of one case, one session per object (objects are independent,
    as in the Slicer module). loaded: load_case's answer, or None to read the files here. output: write
    the prediction there; without it the predictions come back packed (the caller writes them)."""
    import numpy as np

    from ..study.evaluate import evaluate_object

    name, image, label, _prompts = case
    volume, objects, file_prompts = loaded if loaded is not None else load_case(case, settings["labels"])
    started = time.perf_counter()
    scores, predictions = [], []
    for value, obj_name, ref in objects:
        say(f"{name}: object {value} ({obj_name}) ...")
        score, pred = evaluate_object(
            model, volume.array, ref, label=value, name=obj_name, spacing=tuple(volume.spacing[::-1]),
            memory=settings["memory"], axes=settings["axes"], corrections=settings["corrections"],
            prompt_kind=settings["prompt_kind"], prompts=file_prompts.get(value) if file_prompts else None,
            window=settings["window"])
        scores.append(score)
        predictions.append((value, obj_name, pred))
    if output:
        _write_prediction(output, predictions, volume, overwrite)
    return {"case": {"case": name, "image": os.fspath(image), "label": os.fspath(label),
                     "seconds": round(time.perf_counter() - started, 2), "objects": [s.as_dict() for s in scores]},
            "scores": scores, "image_size": model.image_size, "random_weights": bool(model.weights_are_random),
            "predictions": None if output else [(v, n, np.packbits(m, axis=None)) for v, n, m in predictions]}


# -- run -------------------------------------------------------------------------------------------
def _check_outputs(args, cases):
    """{case name: output path} for --output, and --json's folder, checked before anything slow."""
    from ..errors import InputError
    from ..io import volume_io

    many = os.path.isdir(args.label)
    outputs = {}
    if args.output:
        for name, *_ in cases:
            out = os.path.join(args.output, name + ".seg.nrrd") if many else args.output
            if many and not os.path.isdir(args.output):
                raise InputError(f"--output {args.output}: with folders of cases, give an existing folder")
            volume_io.check_output_path(out, args.overwrite)
            outputs[name] = out
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder):
            raise InputError(f"--json {args.json}: the folder {folder} does not exist")
        if os.path.exists(args.json) and not args.overwrite:
            raise InputError(f"--json {args.json}: already exists; pass --overwrite to replace it")
    return outputs


def run(args):
    from ..batch.runner import model_options, run_tasks
    from ..errors import InputError
    from .batch import cluster_from_args

    # 1. inputs, before anything slow (on Ray without --ship-volumes the workers read the cases)
    if args.corrections < 0:
        raise InputError(f"--corrections {args.corrections}: give 0 or more")
    check_model_inputs(args)
    cluster = cluster_from_args(args)
    cases = find_cases(args.image, args.label, args.prompts)
    outputs = _check_outputs(args, cases)
    read_here = cluster.ray is None or cluster.ship_volumes
    loaded = {case[0]: load_case(case, args.labels) for case in cases} if read_here else {}
    settings = {"memory": args.memory, "axes": args.axes, "corrections": args.corrections, "labels": args.labels,
                "prompt_kind": args.prompt_kind, "window": tuple(args.window) if args.window else None}
    # shipped predictions come back here to be written; otherwise the worker writes its own
    write_there = not cluster.ship_volumes

    # 2. the cases, the model loaded once per worker (medsam2/batch/runner.py)
    results = {}

    def done(name, result):
        if isinstance(result, BaseException):
            raise result
        results[name] = result

    take = loaded.pop if write_there else loaded.get  # a shipped volume is kept to write its prediction
    tasks = ((case[0], (case, settings, take(case[0], None), outputs.get(case[0]) if write_there else None,
                        args.overwrite)) for case in cases)
    run_tasks(tasks, evaluate_case, model_options(args), cluster, done, meaning="scores")

    # 3. report
    ordered = [results[case[0]] for case in cases]
    for (name, *_), result in zip(cases, ordered):
        if result["predictions"] is not None and name in outputs:
            _write_shipped(outputs[name], result["predictions"], loaded[name][0], args.overwrite)
    _print_table([(r["case"]["case"], s) for r in ordered for s in r["scores"]])
    if args.json:
        from ..io.files import atomic_output

        report = {"settings": {"model": args.model, "image_size": ordered[0]["image_size"], "memory": args.memory,
                               "axes": args.axes, "prompts": args.prompts, "prompt_kind": args.prompt_kind,
                               "corrections": args.corrections, "random_weights": ordered[0]["random_weights"]},
                  "cases": [r["case"] for r in ordered]}
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    for out in outputs.values():
        print(f"wrote {out}")
    return 0


def _write_shipped(path, packed, volume, overwrite):
    import numpy as np

    shape = volume.array.shape
    _write_prediction(path, [(v, n, np.unpackbits(bits, count=int(np.prod(shape))).astype(bool).reshape(shape))
                             for v, n, bits in packed], volume, overwrite)


def _write_prediction(path, predictions, volume, overwrite):
    import numpy as np

    from ..io import volume_io

    if volume_io.output_kind(path) == "segmentation":
        volume_io.write_segmentation(path, [{"name": n, "mask": m} for _v, n, m in predictions], volume,
                                     overwrite=overwrite)
    else:
        labels = np.zeros(volume.array.shape, np.uint16)
        for value, _n, mask in predictions:  # a later object wins an overlap
            labels[mask] = value
        volume_io.write_labelmap(path, labels, volume, overwrite=overwrite)


def _print_table(rows):
    import numpy as np

    from ..study.evaluate import REVIEW_KS

    width = max([len("case")] + [len(c) for c, _ in rows])
    name_w = max([len("name")] + [len(s.name) for _, s in rows])
    recall_heads = "".join(f"  {f'recall@{k}':>9}" for k in REVIEW_KS)
    print(f"{'case':<{width}}  {'label':>5}  {'name':<{name_w}}  {'dice':>6}  {'hd95_mm':>8}  {'interactions':>12}"
          f"  {'flagged':>7}{recall_heads}")
    for case, s in rows:
        hd = f"{s.hd95_mm:8.2f}" if np.isfinite(s.hd95_mm) else f"{'inf':>8}"
        recalls = "".join(f"  {s.review_recall[k]:9.2f}" for k in REVIEW_KS)
        print(f"{case:<{width}}  {s.label:>5}  {s.name:<{name_w}}  {s.dice:6.4f}  {hd}  {s.interactions:>12}"
              f"  {s.flagged_slices:>7}{recalls}")
    if len(rows) > 1:
        dices = [s.dice for _, s in rows]
        finite = [s.hd95_mm for _, s in rows if np.isfinite(s.hd95_mm)]
        hd = f"{np.mean(finite):8.2f}" if finite else f"{'-':>8}"
        mean_inter = np.mean([s.interactions for _, s in rows])
        mean_flagged = np.mean([s.flagged_slices for _, s in rows])
        recalls = "".join(f"  {np.mean([s.review_recall[k] for _, s in rows]):9.2f}" for k in REVIEW_KS)
        print(f"{'mean':<{width}}  {'':>5}  {'':<{name_w}}  {np.mean(dices):6.4f}  {hd}  {mean_inter:12.1f}"
              f"  {mean_flagged:7.1f}{recalls}")
