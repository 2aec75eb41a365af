"""Volumes in and segmentations out, on the input image's exact geometry.

Reading goes through SimpleITK (NIfTI, NRRD, MHA/MHD, ... or a DICOM series folder). The voxel
array is SimpleITK's (k, j, i) = (slices, rows, cols) order; the geometry (origin, spacing,
direction: LPS, as ITK and DICOM use) is kept as read and written back unchanged, so a
segmentation lands on exactly the voxels it was computed on.

Writing: a Slicer `.seg.nrrd` (slicerio; one segment per object with its name and colour,
overlapping objects go to separate layers as Slicer stores them) or a label map (`.nii.gz`,
`.nii`, `.nrrd`, `.mha`) through SimpleITK. Files are written to a temporary name next to
the target and renamed into place, so an interrupted run never leaves half a file, and an
existing file is replaced only when the caller says so.
"""

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .files import atomic_output, read_sitk_image

# Slicer's GenericAnatomyColors, first entries: the colours Slicer gives new segments, so our
# output looks like a segmentation made in Slicer. Objects beyond the list cycle through it.
PALETTE = [
    (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
    (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0),
    (255, 250, 220), (230, 220, 70), (200, 200, 235), (250, 250, 210), (244, 214, 49),
    (0, 151, 206),
]

LABELMAP_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats: written atomically
SEGMENTATION_EXTENSION = ".seg.nrrd"


def palette_color(index):
    """Colour (r, g, b in 0..1) of the index-th object (0-based) from the fixed palette."""
    r, g, b = PALETTE[index % len(PALETTE)]
    return (r / 255.0, g / 255.0, b / 255.0)


@dataclass
class Volume:
    """A scalar 3D image: voxels in (k, j, i) order and its LPS geometry as SimpleITK reads it."""

    array: np.ndarray        # (slices k, rows j, cols i)
    origin: tuple            # LPS mm of voxel (0, 0, 0)'s centre
    spacing: tuple           # (i, j, k) mm
    direction: tuple         # 9 numbers, row-major 3x3, columns = i, j, k axes in LPS
    source: str = ""         # what was read, for messages

    @property
    def size(self):
        """(i, j, k) voxel counts, SimpleITK's order."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def ijk_to_lps(self):
        """4x4 matrix from continuous index (i, j, k) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction, float).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    @property
    def bounds(self):
        """(low, high) LPS mm corners of the box the voxels fill (see grid_bounds)."""
        return grid_bounds(self.ijk_to_lps, self.size)

    def physical_to_index(self, points_lps):
        """LPS points (N, 3) -> continuous (i, j, k) indices (N, 3); integer = voxel centre."""
        p = np.atleast_2d(np.asarray(points_lps, float))
        m = self.ijk_to_lps
        return np.linalg.solve(m[:3, :3], (p - m[:3, 3]).T).T

    def index_to_physical(self, ijk):
        """Continuous (i, j, k) indices (N, 3) -> LPS points (N, 3)."""
        q = np.atleast_2d(np.asarray(ijk, float))
        m = self.ijk_to_lps
        return q @ m[:3, :3].T + m[:3, 3]

    def reference_image(self, array):
        """SimpleITK image of `array` ((k, j, i), this volume's shape) on this volume's geometry."""
        import SimpleITK as sitk

        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume {self.array.shape}")
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


def grid_bounds(ijk_to_lps, size_ijk, first_ijk=(0, 0, 0)):
    """(low, high): the LPS mm axis-aligned box around a block of voxels' outer faces (half a voxel
    beyond the first and last voxel centres), for a 4x4 ijk->LPS matrix, the block's (i, j, k)
    voxel counts and its first voxel's index (default: the whole grid from voxel 0)."""
    size = np.asarray(size_ijk, float)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], float) * size
    corners += np.asarray(first_ijk, float) - 0.5
    m = np.asarray(ijk_to_lps, float)
    lps = corners @ m[:3, :3].T + m[:3, 3]
    return lps.min(axis=0), lps.max(axis=0)


def bounds_overlap(a, b) -> bool:
    """Whether two (low, high) boxes share a volume (touching faces do not count)."""
    return bool(np.all(a[0] < b[1]) and np.all(b[0] < a[1]))


def describe_bounds(bounds):
    """'x -193.1..196.1, y ... mm (LPS)' for messages."""
    low, high = bounds
    return ", ".join(f"{axis} {lo:.1f}..{hi:.1f}" for axis, lo, hi in zip("xyz", low, high)) + " mm (LPS)"


def _from_image(image, source):
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or "
            "vector image); medsam2 segment needs a scalar (grey-level) volume")
    if image.GetDimension() != 3:
        hint = " (one DICOM slice? give the folder holding the whole series)" if image.GetDimension() == 2 else ""
        raise InputError(f"{source}: is a {image.GetDimension()}D image; medsam2 segment needs a 3D volume{hint}")
    if min(image.GetSize()) < 1:
        raise InputError(f"{source}: the image is empty (size {image.GetSize()})")
    return Volume(
        array=sitk.GetArrayFromImage(image),
        origin=tuple(float(v) for v in image.GetOrigin()),
        spacing=tuple(float(v) for v in image.GetSpacing()),
        direction=tuple(float(v) for v in image.GetDirection()),
        source=str(source),
    )


def read_volume(path, series=None) -> Volume:
    """Read a 3D scalar image file, or the DICOM series in folder `path`.

    series: the SeriesInstanceUID to read when the folder holds several series.
    Raises InputError with what is wrong and what to do.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such file or folder (IMAGE must be a NIfTI/NRRD/MHA file or a DICOM folder)")
    if os.path.isdir(path):
        return _read_dicom_folder(path, series)
    if series is not None:
        raise InputError(f"--series selects a series in a DICOM folder, but {path} is a file")
    image = read_sitk_image(path, hint="IMAGE must be a 3D NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage "
                                       "(.mha, .mhd) file or a folder holding one DICOM series")
    return _from_image(image, path)


def _read_dicom_folder(folder, series):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series_ids = list(reader.GetGDCMSeriesIDs(folder) or [])
    if not series_ids:
        raise InputError(f"{folder}: is a folder without any DICOM series; give a DICOM series folder or an image file")
    if series is None:
        if len(series_ids) > 1:
            listing = ", ".join(f"{uid} ({len(reader.GetGDCMSeriesFileNames(folder, uid))} files)" for uid in series_ids)
            raise InputError(f"{folder}: holds {len(series_ids)} DICOM series: {listing}. Choose one with --series UID")
        series = series_ids[0]
    elif series not in series_ids:
        raise InputError(f"{folder}: has no DICOM series {series}; it holds {', '.join(series_ids)}")
    files = reader.GetGDCMSeriesFileNames(folder, series)
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot read DICOM series {series} ({str(exc).strip().splitlines()[-1]})") from None
    if image.GetDimension() == 2:  # a single-file series
        image = sitk.JoinSeries(image)
    return _from_image(image, f"{folder} (DICOM series {series}, {len(files)} files)")


def output_kind(path):
    """'segmentation' for .seg.nrrd, 'labelmap' for the label map extensions; InputError otherwise."""
    name = os.fspath(path).lower()
    if name.endswith(SEGMENTATION_EXTENSION):
        return "segmentation"
    if name.endswith(LABELMAP_EXTENSIONS):
        return "labelmap"
    raise InputError(
        f"{path}: unknown output type; name the output .seg.nrrd (Slicer segmentation) or "
        f"{', '.join(LABELMAP_EXTENSIONS)} (label map)")


def check_output_path(path, overwrite=False):
    """Refuse a path we would not write: unknown extension, missing folder, or an existing file."""
    path = os.fspath(path)
    kind = output_kind(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"{path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give a file name for the output")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path}: already exists; pass --overwrite to replace it, or choose another name")
    return kind


def _atomic_write(path, overwrite, write):
    """Call write(tmp_path) on a temporary file with the output's extension, then rename into place."""
    path = os.fspath(path)
    check_output_path(path, overwrite)
    lower = os.path.basename(path).lower()
    suffix = next((e for e in (SEGMENTATION_EXTENSION, *LABELMAP_EXTENSIONS) if lower.endswith(e)), "")
    try:
        with atomic_output(path, suffix=os.path.basename(path)[len(lower) - len(suffix):], overwrite=overwrite) as tmp:
            write(tmp)
    except FileExistsError:  # created by someone else while we ran
        raise InputError(f"{path}: appeared while segmenting; pass --overwrite to replace it") from None
    return path


def write_labelmap(path, labels, volume, overwrite=False):
    """Write a label volume ((k, j, i), 0 = background) on `volume`'s geometry with SimpleITK."""
    import SimpleITK as sitk

    labels = np.asarray(labels)
    top = int(labels.max()) if labels.size else 0
    if labels.min(initial=0) < 0 or top > 65535:
        raise ValueError("label values must be in 0..65535")
    labels = labels.astype(np.uint8 if top < 256 else np.uint16)
    image = volume.reference_image(labels)
    return _atomic_write(path, overwrite, lambda tmp: sitk.WriteImage(image, tmp, True))


def write_segmentation(path, segments, volume, overwrite=False):
    """Write a Slicer .seg.nrrd on `volume`'s geometry.

    segments: list of dicts {"name", "color": (r, g, b) 0..1, "mask": bool (k, j, i)}, in order.
    Segment IDs are the names made unique, as Slicer shows them.
    """
    import slicerio

    shape_ijk = volume.size
    seg = slicerio.create_segmentation(shape_ijk, volume.ijk_to_lps)
    used = set()
    for index, entry in enumerate(segments):
        mask = np.asarray(entry["mask"], bool)
        if mask.shape != volume.array.shape:
            raise ValueError(f"segment {entry['name']!r}: mask shape {mask.shape} is not the volume's {volume.array.shape}")
        segment_id, n = entry["name"], 1
        while segment_id in used:  # two objects of the same name stay two segments
            n += 1
            segment_id = f"{entry['name']}_{n}"
        used.add(segment_id)
        color = entry.get("color") or palette_color(index)
        # slicerio's voxels are (i, j, k): transpose from SimpleITK's (k, j, i)
        slicerio.add_segment(seg, mask.transpose(2, 1, 0), {
            "id": segment_id, "name": entry["name"], "color": [float(c) for c in color],
            "nameAutoGenerated": False, "colorAutoGenerated": entry.get("color") is None,
        })
    return _atomic_write(path, overwrite, lambda tmp: slicerio.write_segmentation(tmp, seg))


# --- frames --------------------------------------------------------------------------------------
# The engine takes frames along numpy axis 0. For `axis` (a numpy axis of the (k, j, i) array) the
# frame array is a transpose of the volume: FRAME_LAYOUTS[axis] = (frame axis, row axis, col axis).
# The two remaining axes keep their order, so a frame's rows run along the lower numpy axis and its
# columns (pixel x) along the higher one. This table is the one place the layout is defined.
FRAME_LAYOUTS = {0: (0, 1, 2), 1: (1, 0, 2), 2: (2, 0, 1)}
INDEX_LETTERS = ("k", "j", "i")  # numpy axis -> index name


def to_frames(array, axis):
    """(k, j, i) array -> (frames, rows, cols) view with frames along `axis`."""
    return np.transpose(array, FRAME_LAYOUTS[_check_axis(axis)])


def from_frames(frames, axis):
    """Inverse of to_frames: (frames, rows, cols) -> (k, j, i)."""
    return np.transpose(frames, np.argsort(FRAME_LAYOUTS[_check_axis(axis)]))


def index_to_frame_pixel(ijk, axis):
    """Continuous (i, j, k) indices (N, 3) -> (frame, x, y), each (N,) continuous, for `axis`."""
    kji = np.atleast_2d(np.asarray(ijk, float))[:, ::-1]
    frame_axis, row_axis, col_axis = FRAME_LAYOUTS[_check_axis(axis)]
    return kji[:, frame_axis], kji[:, col_axis], kji[:, row_axis]


def _check_axis(axis):
    if axis not in FRAME_LAYOUTS:
        raise InputError(f"axis must be 0 (frames along k), 1 (along j) or 2 (along i), not {axis!r}")
    return axis
