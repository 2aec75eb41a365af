"""Prompt files for `medsam2 segment`: our prompts JSON and Slicer markups (.mrk.json).

Our JSON::

    {"coordinates": "ijk" | "lps" | "ras",
     "objects": [{"id": 1, "name": "liver", "color": [r, g, b],          # id, name, color optional
                  "points": [{"position": [x, y, z], "label": 1}],       # label 1 include, 0 exclude
                  "boxes": [{"min": [x, y, z], "max": [x, y, z]}]}]}

"ijk" positions are continuous voxel indices (i = column, j = row, k = slice; an integer is a
voxel's centre); "lps"/"ras" are physical millimetres (RAS = LPS with x and y negated). A box is
two opposite corners on one slice along the propagation axis: both corners must fall on the same
frame; the prompt is their bounding rectangle in that frame.

Slicer markups (each entry of "markups" in the file, in its "coordinateSystem", LPS by default):

- a point list ("Fiducial") gives points. A control point is an *exclude* (negative) point when its
  label starts with "-" or its description is "exclude", "negative" or "background"; otherwise it
  is an include point. Points whose positionStatus is not "defined" are skipped.
- an ROI gives a box on the frame of the ROI's centre: the rectangle that bounds the ROI's corners
  in that frame (clipped to the image). A 3D ROI around a lesion thus becomes a box on its middle
  slice, as MedSAM2 is prompted.
- the object is the markups node's "name" (Slicer's file stem when absent); entries with the same
  name, in one file or several, are one object (e.g. an ROI and a point list saved separately).

Objects are numbered by their JSON "id", then the others 1, 2, ... in file order; the id is the
value in a written label map.
"""

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .volume_io import INDEX_LETTERS, index_to_frame_pixel

COORDINATE_SYSTEMS = ("ijk", "lps", "ras")
NEGATIVE_DESCRIPTIONS = ("exclude", "negative", "background")
MAX_OBJECT_ID = 65535  # label maps are written as uint16 at most

_OBJECT_KEYS = {"id", "name", "color", "points", "boxes"}
_POINT_KEYS = {"position", "label"}
_BOX_KEYS = {"min", "max"}


@dataclass
class Point:
    system: str              # "ijk" or "lps" (RAS is stored as LPS)
    position: np.ndarray     # (3,)
    label: int               # 1 include, 0 exclude
    where: str               # "file: object 'liver' points[2] at RAS (1, 2, 3)" for messages


@dataclass
class Box:
    system: str
    corners: np.ndarray      # (M, 3): 2 corners (our JSON) or 8 (a markups ROI)
    where: str
    center: np.ndarray = None  # markups ROI: the box lies on the frame of this point


@dataclass
class ObjectPrompts:
    id: int
    name: str
    color: tuple = None
    points: list = field(default_factory=list)
    boxes: list = field(default_factory=list)


@dataclass
class FramePrompt:
    """Everything one object gets on one frame: one engine add_prompt call."""

    obj_id: int
    frame: int
    points: np.ndarray = None  # (N, 2) pixel x (col), y (row)
    labels: np.ndarray = None  # (N,) 1 / 0
    box: np.ndarray = None     # (x0, y0, x1, y1)


# --- reading ------------------------------------------------------------------------------------

def read_prompts(paths):
    """Read one or more prompt files (our JSON or .mrk.json) -> list of ObjectPrompts, ids set."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    pending = []  # (id or None, ObjectPrompts)
    for path in paths:
        data = _load_json(path)
        if isinstance(data, dict) and "markups" in data:
            pending.extend((None, obj) for obj in parse_markups(data, path))
        else:
            pending.extend((obj.id, obj) for obj in parse_prompts_json(data, path))
    return _merge_and_number(pending)


def _load_json(path):
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: prompts file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: is not valid JSON ({exc}); give a prompts .json or a Slicer .mrk.json") from None


def _vector(value, where, n=3):
    try:
        v = np.asarray(value, float)
    except (TypeError, ValueError):
        v = None
    if v is None or v.shape != (n,) or not np.all(np.isfinite(v)):
        raise InputError(f"{where}: expected {n} finite numbers, got {value!r}")
    return v


def _fmt(v):
    return "(" + ", ".join(f"{x:g}" for x in v) + ")"


def _check_keys(entry, allowed, where):
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a JSON object, got {entry!r}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")


def _to_system(system, v):
    """Position in the file's system -> (stored system, stored position): RAS becomes LPS."""
    return ("lps", v * (-1.0, -1.0, 1.0)) if system == "ras" else (system, v)


def parse_prompts_json(data, source="prompts"):
    """Our prompts JSON (already loaded) -> list of ObjectPrompts (id None where not given)."""
    if not isinstance(data, dict) or "objects" not in data:
        raise InputError(f"{source}: expected {{\"coordinates\": ..., \"objects\": [...]}} (or a Slicer .mrk.json)")
    system = data.get("coordinates")
    if system is None:
        raise InputError(f'{source}: add "coordinates": "ijk", "lps" or "ras" (the system of every position in the file)')
    if str(system).lower() not in COORDINATE_SYSTEMS:
        raise InputError(f'{source}: "coordinates" is {system!r}; use "ijk", "lps" or "ras"')
    system = str(system).lower()
    objects = data["objects"]
    if not isinstance(objects, list) or not objects:
        raise InputError(f'{source}: "objects" must be a non-empty list')
    result, seen_ids, seen_names = [], set(), set()
    for n, entry in enumerate(objects):
        where = f"{source}: objects[{n}]"
        _check_keys(entry, _OBJECT_KEYS, where)
        obj_id = entry.get("id")
        if obj_id is not None:
            if isinstance(obj_id, bool) or not isinstance(obj_id, int) or not 1 <= obj_id <= MAX_OBJECT_ID:
                raise InputError(f'{where}: "id" must be an integer 1..{MAX_OBJECT_ID}, got {obj_id!r}')
            if obj_id in seen_ids:
                raise InputError(f'{where}: "id" {obj_id} is used by another object; ids must be unique')
            seen_ids.add(obj_id)
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InputError(f'{where}: "name" must be a non-empty string, got {name!r}')
        if name is not None:
            if name in seen_names:
                raise InputError(f'{where}: "name" {name!r} is used by another object; names must be unique')
            seen_names.add(name)
        color = entry.get("color")
        if color is not None:
            color = tuple(_vector(color, f'{where} "color"'))
            if min(color) < 0 or max(color) > 1:
                raise InputError(f'{where}: "color" components must be in 0..1, got {entry["color"]!r}')
        label = f"object {name!r}" if name else f"objects[{n}]"
        obj = ObjectPrompts(id=obj_id, name=name, color=color)
        points = entry.get("points", [])
        boxes = entry.get("boxes", [])
        if not isinstance(points, list) or not isinstance(boxes, list):
            raise InputError(f'{where}: "points" and "boxes" must be lists')
        for m, p in enumerate(points):
            pw = f"{source}: {label} points[{m}]"
            _check_keys(p, _POINT_KEYS, pw)
            if "position" not in p:
                raise InputError(f'{pw}: missing "position": [x, y, z]')
            pos = _vector(p["position"], f"{pw} position")
            lab = p.get("label", 1)
            if lab not in (0, 1):
                raise InputError(f'{pw}: "label" must be 1 (include) or 0 (exclude), got {lab!r}')
            stored_system, stored = _to_system(system, pos)
            obj.points.append(Point(stored_system, stored, int(lab), f"{pw} at {system.upper()} {_fmt(pos)}"))
        for m, b in enumerate(boxes):
            bw = f"{source}: {label} boxes[{m}]"
            _check_keys(b, _BOX_KEYS, bw)
            if "min" not in b or "max" not in b:
                raise InputError(f'{bw}: a box needs "min" and "max" corners')
            lo, hi = _vector(b["min"], f"{bw} min"), _vector(b["max"], f"{bw} max")
            if np.count_nonzero(lo != hi) < 2:  # a line or a point spans no rectangle on any slice
                raise InputError(
                    f"{bw}: its corners {_fmt(lo)} and {_fmt(hi)} differ in {np.count_nonzero(lo != hi)} coordinate(s); "
                    "a box has a width and a height on its slice: give two opposite corners that differ in both "
                    "in-slice coordinates (and share the slice's)")
            stored_system, corners = _to_system(system, np.stack([lo, hi]))
            obj.boxes.append(Box(stored_system, corners, f"{bw} from {system.upper()} {_fmt(lo)} to {_fmt(hi)}"))
        if not obj.points and not obj.boxes:
            raise InputError(f"{where}: has no points and no boxes; give each object at least one prompt")
        result.append(obj)
    return result


def _markups_name(path):
    base = os.path.basename(os.fspath(path))
    for ext in (".mrk.json", ".json"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base


def _is_negative(control_point):
    label = str(control_point.get("label") or "").strip()
    description = str(control_point.get("description") or "").strip().lower()
    return label.startswith("-") or description in NEGATIVE_DESCRIPTIONS


def parse_markups(data, source="markups.mrk.json"):
    """Slicer markups JSON (already loaded) -> list of ObjectPrompts (id None), merged by name."""
    entries = data.get("markups")
    if not isinstance(entries, list) or not entries:
        raise InputError(f'{source}: "markups" must be a non-empty list')
    by_name = {}
    for n, entry in enumerate(entries):
        where = f"{source}: markups[{n}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a JSON object")
        kind = entry.get("type")
        system = str(entry.get("coordinateSystem", "LPS")).lower()
        if system not in ("lps", "ras"):
            raise InputError(f'{where}: "coordinateSystem" is {entry.get("coordinateSystem")!r}; Slicer writes LPS or RAS')
        units = entry.get("coordinateUnits", "mm")
        if units != "mm":
            raise InputError(f'{where}: "coordinateUnits" is {units!r}; only mm is supported')
        name = entry.get("name") or _markups_name(source)
        obj = by_name.setdefault(name, ObjectPrompts(id=None, name=name))
        label = f"markup {name!r}"
        if kind == "Fiducial":
            for m, cp in enumerate(entry.get("controlPoints") or []):
                if cp.get("positionStatus", "defined") != "defined":
                    continue  # a point being placed or removed in Slicer, not a prompt
                pw = f"{source}: {label} control point {cp.get('label') or m}"
                pos = _vector(cp.get("position"), f"{pw} position")
                stored_system, stored = _to_system(system, pos)
                obj.points.append(Point(stored_system, stored, 0 if _is_negative(cp) else 1,
                                        f"{pw} at {system.upper()} {_fmt(pos)}"))
        elif kind == "ROI":
            obj.boxes.append(_roi_box(entry, system, f"{source}: {label} ROI"))
        else:
            raise InputError(f"{where}: markups of type {kind!r} are not prompts; use a point list (Fiducial) or an ROI")
    result = [obj for obj in by_name.values() if obj.points or obj.boxes]
    if not result:
        raise InputError(f"{source}: holds no placed control points and no ROI; nothing to segment")
    return result


def _roi_box(entry, system, where):
    roi_type = entry.get("roiType", "Box")
    points = [cp for cp in entry.get("controlPoints") or [] if cp.get("positionStatus", "defined") == "defined"]
    if roi_type == "BoundingBox":  # the ROI is the bounding box of its control points
        if len(points) < 2:
            raise InputError(f"{where}: a BoundingBox ROI needs at least 2 placed control points")
        pos = np.stack([_vector(cp.get("position"), f"{where} control point") for cp in points])
        lo, hi = pos.min(0), pos.max(0)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        center = (lo + hi) / 2
    elif roi_type == "Box":
        if "center" in entry:
            center = _vector(entry["center"], f"{where} center")
        elif points:
            center = _vector(points[0].get("position"), f"{where} control point")
        else:
            raise InputError(f"{where}: has no centre (neither \"center\" nor a placed control point)")
        size = _vector(entry.get("size"), f"{where} size")
        axes = _vector(entry.get("orientation", np.eye(3).ravel()), f"{where} orientation", 9).reshape(3, 3)
        # the ROI's axes are the columns of its orientation matrix (in the file's system)
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
        corners = center + (signs * (size / 2)) @ axes.T
    else:
        raise InputError(f"{where}: roiType {roi_type!r} is not supported (Box or BoundingBox)")
    stored_system, stored = _to_system(system, corners)
    _, stored_center = _to_system(system, center)
    return Box(stored_system, stored, f"{where} centred at {system.upper()} {_fmt(center)}", center=stored_center)


def _merge_and_number(pending):
    """Merge objects of the same name; give objects without an id the next free ids."""
    merged = []
    by_name = {}
    for obj_id, obj in pending:
        key = obj.name
        if key is not None and key in by_name:
            target = by_name[key]
            if obj_id is not None and target.id is not None and obj_id != target.id:
                raise InputError(f"object {key!r} has id {target.id} in one file and {obj_id} in another")
            target.id = target.id if target.id is not None else obj_id
            target.color = target.color or obj.color
            target.points += obj.points
            target.boxes += obj.boxes
            continue
        merged.append(obj)
        if key is not None:
            by_name[key] = obj
    used = [o.id for o in merged if o.id is not None]
    if len(used) != len(set(used)):
        dup = sorted({i for i in used if used.count(i) > 1})
        raise InputError(f"object id(s) {dup} are used by more than one object across the prompt files")
    next_id = 1
    for obj in merged:
        if obj.id is None:
            while next_id in used:
                next_id += 1
            obj.id = next_id
            used.append(next_id)
        if obj.name is None:
            obj.name = f"Segment_{obj.id}"
    return merged


# --- to engine frames ---------------------------------------------------------------------------

def _index(volume, system, positions):
    positions = np.atleast_2d(positions)
    return positions if system == "ijk" else volume.physical_to_index(positions)


def _check_inside(volume, ijk, axes, where):
    """Raise InputError unless every index along `axes` (numpy axes) lies within the image."""
    for ax in axes:
        n = volume.array.shape[ax]
        values = ijk[:, 2 - ax]  # ijk column of numpy axis ax
        bad = values[(values < -0.5) | (values >= n - 0.5)]
        if bad.size:
            letter = INDEX_LETTERS[ax]
            raise InputError(
                f"{where} lies outside the image: its index {letter} = {bad[0]:.2f}, but the image has {n} voxels "
                f"along {letter} (0..{n - 1}). Check the file's coordinate system and that the prompts were "
                "placed on this image.")


def to_frame_prompts(objects, volume, axis):
    """ObjectPrompts -> FramePrompts for the engine, frames along numpy `axis` (see volume_io)."""
    from .volume_io import FRAME_LAYOUTS

    frame_axis, row_axis, col_axis = FRAME_LAYOUTS[axis]
    rows, cols = volume.array.shape[row_axis], volume.array.shape[col_axis]
    letter = INDEX_LETTERS[frame_axis]
    grouped = {}  # (obj_id, frame) -> {"points": [], "labels": [], "box": None, "box_where": str}

    def slot(obj_id, frame):
        return grouped.setdefault((obj_id, frame), {"points": [], "labels": [], "box": None, "box_where": None})

    for obj in objects:
        for p in obj.points:
            ijk = _index(volume, p.system, p.position)
            _check_inside(volume, ijk, (0, 1, 2), p.where)
            f, x, y = index_to_frame_pixel(ijk, axis)
            s = slot(obj.id, _frame_number(f[0]))
            s["points"].append((x[0], y[0]))
            s["labels"].append(p.label)
        for b in obj.boxes:
            corners = _index(volume, b.system, b.corners)
            if b.center is None:
                _check_inside(volume, corners, (0, 1, 2), b.where)
                f, x, y = index_to_frame_pixel(corners, axis)
                frames = sorted({_frame_number(v) for v in f})
                if len(frames) > 1:
                    raise InputError(
                        f"{b.where} is not flat along the propagation axis (--axis {axis}: frames along {letter}): its "
                        f"corners lie on {letter} = {f.min():.2f} and {f.max():.2f}. A box lies on one slice: give both "
                        f"corners the same {letter}, or choose the --axis the box was drawn across.")
                frame = frames[0]
            else:
                center = _index(volume, b.system, b.center)
                _check_inside(volume, center, (0, 1, 2), f"{b.where} (its centre)")
                frame = _frame_number(index_to_frame_pixel(center, axis)[0][0])
                _, x, y = index_to_frame_pixel(corners, axis)
            # a pixel covers [-0.5, n - 0.5) around its centre: clip an ROI overhanging the image to that
            box = np.array([max(x.min(), -0.5), max(y.min(), -0.5), min(x.max(), cols - 0.5), min(y.max(), rows - 0.5)])
            if not (box[2] > box[0] and box[3] > box[1]):  # e.g. a box drawn across another --axis, a flat ROI
                raise InputError(f"{b.where} has no {'width' if box[2] <= box[0] else 'height'} on {letter} = {frame} "
                                 f"(--axis {axis}); a box needs two opposite corners apart in both directions of "
                                 "its slice")
            s = slot(obj.id, frame)
            if s["box"] is not None:
                raise InputError(f"{b.where} is a second box for object {obj.name!r} on {letter} = {frame} "
                                 f"(the first: {s['box_where']}); give one box per object and slice")
            s["box"], s["box_where"] = box, b.where
    result = []
    for (obj_id, frame), s in sorted(grouped.items()):
        result.append(FramePrompt(
            obj_id=obj_id, frame=frame,
            points=np.array(s["points"], float).reshape(-1, 2) if s["points"] else None,
            labels=np.array(s["labels"], np.int64) if s["labels"] else None,
            box=s["box"]))
    return result


def _frame_number(f):
    """Nearest frame of a continuous index (halves round up, not to even as round() does)."""
    return int(np.floor(f + 0.5))
