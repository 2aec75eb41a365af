"""`medsam2 one-prompt`: segment a folder of unrelated 2D images from a few prompted ones.

FOLDER holds PNG / JPEG (also BMP, TIFF) and DICOM files (single-frame; .dcm, .dicom, or no
extension with the DICOM preamble), read in file-name order. The prompts JSON names the prompted
images; every image gets a mask PNG in DIR with the image's file stem and size, and DIR/summary.csv
lists the pixels of each object in each image. Mask values: with one object, 255 inside and 0
outside (visible in any viewer); with several, the object id (a later id wins an overlap; 16-bit
PNG when an id exceeds 255). See docs/modes.md.
"""

import csv
import json
import os
import sys

from ..io.files import atomic_output, read_sitk_image
from .common import (add_memory_argument, add_model_arguments, add_window_argument, check_model_inputs,
                     load_model_for_cli, say)

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
SUMMARY = "summary.csv"
_ENTRY_KEYS = {"image", "obj_id", "points", "labels", "box"}


def add_arguments(p):
    p.add_argument("folder", metavar="FOLDER", help="folder of PNG/JPEG/DICOM images (any sizes, no order)")
    p.add_argument("--prompts", "-p", required=True, metavar="P",
                   help='prompts JSON: {"prompts": [{"image": "a.png", "obj_id": 1, "points": [[x, y]], '
                        '"labels": [1], "box": [x0, y0, x1, y1]}]} in each image\'s own pixels')
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="folder for the mask PNGs and summary.csv (created if missing)")
    add_model_arguments(p)
    add_memory_argument(p, "memory: the self-sorting bank (default; memories chosen by image similarity) or stock "
                           "SAM2 (the images in file-name order)")
    add_window_argument(p, "one intensity window for all images (default, per image: 0..255 for 8-bit images, "
                           "else the image's own 0.5-99.5 percentiles)")
    p.add_argument("--overwrite", action="store_true", help="replace existing mask PNGs and summary.csv in DIR")


# -- inputs ----------------------------------------------------------------------------------------
def _is_dicom(path):
    lower = path.lower()
    if lower.endswith(DICOM_EXTENSIONS):
        return True
    if os.path.splitext(lower)[1]:
        return False
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def list_images(folder):
    """Image file names of `folder`, sorted (what one-prompt reads)."""
    from ..errors import InputError

    if not os.path.isdir(folder):
        raise InputError(f"FOLDER {folder}: no such folder (give a folder of PNG/JPEG/DICOM images)")
    names = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
                   and (e.name.lower().endswith(PIL_EXTENSIONS) or _is_dicom(e.path)))
    if not names:
        raise InputError(f"FOLDER {folder}: holds no PNG, JPEG or DICOM images")
    stems = {}
    for name in names:
        stems.setdefault(os.path.splitext(name)[0], []).append(name)
    clash = [v for v in stems.values() if len(v) > 1]
    if clash:
        raise InputError(f"{folder}: {', '.join(clash[0])} would write the same mask file; rename one of them")
    return names


def read_image(path):
    """A 2-D grey or (rows, cols, 3|4) colour array of one image file."""
    import numpy as np

    from ..errors import InputError

    if _is_dicom(path):
        import SimpleITK as sitk

        image = read_sitk_image(path, hint="one-prompt reads single-frame DICOM, PNG, JPEG, BMP and TIFF images")
        array = sitk.GetArrayFromImage(image)  # (1, rows, cols[, c]) for a single frame
        if image.GetDimension() == 3:
            if image.GetSize()[2] != 1:
                raise InputError(f"{path}: is a multi-frame DICOM ({image.GetSize()[2]} frames); "
                                 "one-prompt reads single-frame images")
            array = array[0]
        return array
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("1", "L", "I", "I;16", "I;16B", "F", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            array = np.array(im)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read this image ({exc})") from None
    return array


def read_prompt_file(path, names, shapes):
    """The prompts JSON -> [(image index, obj_id, points, labels, box)], checked against the images."""
    import numpy as np

    from ..errors import InputError

    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"--prompts {path}: not valid JSON ({exc})") from None
    entries = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise InputError(f'{path}: expected {{"prompts": [{{"image": ..., "points": ... or "box": ...}}, ...]}}')
    index = {n: i for i, n in enumerate(names)}
    out = []
    for n, e in enumerate(entries):
        where = f"{path}: prompts[{n}]"
        if not isinstance(e, dict):
            raise InputError(f"{where}: must be an object")
        unknown = set(e) - _ENTRY_KEYS
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
        image = e.get("image")
        if image not in index:
            hint = f" (images: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
            raise InputError(f"{where}: image {image!r} is not an image file in the folder{hint}")
        obj_id = e.get("obj_id", 1)
        if isinstance(obj_id, bool) or not isinstance(obj_id, int) or not 1 <= obj_id <= 65535:
            raise InputError(f"{where}: obj_id must be an integer 1..65535; got {obj_id!r}")
        points = labels = box = None
        try:
            if e.get("points") is not None:
                points = np.asarray(e["points"], float).reshape(-1, 2)
                labels = np.asarray(e.get("labels", [1] * len(points)), int).reshape(-1)
                if len(labels) != len(points):
                    raise InputError(f"{where}: {len(points)} points but {len(labels)} labels")
            elif e.get("labels") is not None:
                raise InputError(f"{where}: labels without points")
            if e.get("box") is not None:
                box = np.asarray(e["box"], float).reshape(4)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f'{where}: points are [[x, y], ...] and a box is [x0, y0, x1, y1] ({exc})') from None
        if points is None and box is None:
            raise InputError(f"{where}: give points (with labels) and/or a box")
        rows, cols = shapes[index[image]]
        xy = [] if points is None else list(points)
        if box is not None:
            xy += [box[:2], box[2:]]
        for x, y in xy:
            if not (-0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5):
                raise InputError(f"{where}: ({x:g}, {y:g}) is outside {image} ({cols} x {rows} pixels; "
                                 "x is the column, y the row, from 0)")
        out.append((index[image], obj_id, points, labels, box))
    return out


# -- run -------------------------------------------------------------------------------------------
def run(args):
    import numpy as np

    from ..errors import InputError

    # 1. inputs, before anything slow
    check_model_inputs(args)
    names = list_images(args.folder)
    if os.path.abspath(args.output) == os.path.abspath(args.folder):
        raise InputError("--output must not be FOLDER itself: the masks would replace the images")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"--output {args.output}: is a file; give a folder")
    mask_names = [os.path.splitext(n)[0] + ".png" for n in names]
    if not args.overwrite and os.path.isdir(args.output):
        existing = [n for n in mask_names + [SUMMARY] if os.path.exists(os.path.join(args.output, n))]
        if existing:
            raise InputError(f"--output {args.output}: already holds {', '.join(existing[:3])}"
                             f"{' ...' if len(existing) > 3 else ''}; pass --overwrite to replace them")
    images = [read_image(os.path.join(args.folder, n)) for n in names]
    shapes = [tuple(im.shape[:2]) for im in images]
    prompts = read_prompt_file(args.prompts, names, shapes)
    obj_ids = sorted({p[1] for p in prompts})
    say(f"{args.folder}: {len(names)} image(s); {len(obj_ids)} object(s) prompted on "
         f"{len({p[0] for p in prompts})} image(s)")

    # 2. model and session

    model = load_model_for_cli(args, "results")
    session = model.open_images(images, memory=args.memory, window=tuple(args.window) if args.window else None)
    for image, obj_id, points, labels, box in prompts:
        session.add_prompt(image, obj_id=obj_id, points=points, labels=labels, box=box)

    # 3. every image: forward from the first prompted image, then back (order: docs/modes.md)
    from tqdm import tqdm

    with tqdm(total=len(names) + 1, unit="image", desc="segmenting", file=sys.stderr, dynamic_ncols=True) as bar:
        for _ in session.propagate(direction="both"):
            bar.update(1)

    # 4. write
    os.makedirs(args.output, exist_ok=True)
    labels_per_image = session.masks()
    single = len(obj_ids) == 1
    prompted = {(p[0], p[1]) for p in prompts}
    rows = []
    for i, (name, mask_name) in enumerate(zip(names, mask_names)):
        label = labels_per_image[i]
        if single:
            out = np.where(label > 0, 255, 0).astype(np.uint8)
        else:
            out = label.astype(np.uint8 if max(obj_ids) <= 255 else np.uint16)
        _write_png(os.path.join(args.output, mask_name), out)
        for obj_id in obj_ids:
            pixels = int((label == obj_id).sum())
            rows.append({"image": name, "mask": mask_name, "width": label.shape[1], "height": label.shape[0],
                         "obj_id": obj_id, "prompted": int((i, obj_id) in prompted), "pixels": pixels,
                         "fraction": round(pixels / label.size, 6)})
    _write_csv(os.path.join(args.output, SUMMARY), rows)
    value = "255" if single else "the object id"
    print(f"wrote {len(names)} mask PNG(s) (value {value}) and {SUMMARY} to {args.output}")
    return 0


def _write_png(path, array):
    from PIL import Image

    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # uint8 -> "L", uint16 -> 16-bit grey


def _write_csv(path, rows):
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "width", "height", "obj_id", "prompted",
                                               "pixels", "fraction"])
        writer.writeheader()
        writer.writerows(rows)
