"""The web shell's scene: the volume, its segmentation and their display, read and written the way
`medsam2 segment` does (medsam2.io.volume_io), so a file saved from the page is the same file the
command line writes for the same masks.

Plain MRML calls on a slicer-core scene; nothing here knows about trame or the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medsam2.errors import InputError
from medsam2.io import volume_io

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (name, window, level), as Slicer's Volumes module offers them for CT; "Auto" is computed
WINDOW_PRESETS = (
    ("CT abdomen", 350.0, 40.0),
    ("CT lung", 1400.0, -500.0),
    ("CT bone", 1000.0, 400.0),
    ("CT brain", 100.0, 50.0),
)
AUTO_PERCENTILES = (0.5, 99.5)  # the engine's own default window (medsam2.models.model.Model.open)
SEGMENT_FILL_OPACITY_2D = 0.5


@dataclass
class LoadedVolume:
    node: object                # vtkMRMLScalarVolumeNode
    volume: volume_io.Volume    # the voxels and LPS geometry as read; saving writes on exactly this grid

    @property
    def name(self) -> str:
        return self.node.GetName()


def volume_name(path) -> str:
    base = os.path.basename(os.path.normpath(os.fspath(path)))
    for ext in (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base or "volume"


def load_volume(scene, path, series=None) -> LoadedVolume:
    """Read a volume file or DICOM series folder into a scalar volume node (raises InputError)."""
    return add_volume(scene, volume_io.read_volume(path, series=series), volume_name(path))


def add_volume(scene, volume: volume_io.Volume, name: str) -> LoadedVolume:
    from MedSAM2Lib.volume import add_volume_node

    values = volume.array
    node = add_volume_node(scene, values, LPS_TO_RAS @ volume.ijk_to_lps, name)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    set_window_level(node, *auto_window_level(values))
    return LoadedVolume(node, volume)


def auto_window_level(values) -> tuple[float, float]:
    """Window and level spanning the 0.5-99.5 percentiles (what the engine uses by default)."""
    low, high = (float(v) for v in np.percentile(values, AUTO_PERCENTILES))
    if high <= low:
        high = low + 1.0
    return high - low, (high + low) / 2.0


def set_window_level(volume_node, window: float, level: float) -> None:
    display = volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(window), float(level))


def window_level(volume_node) -> tuple[float, float]:
    display = volume_node.GetDisplayNode()
    return float(display.GetWindow()), float(display.GetLevel())


def window_preset(name: str, loaded: LoadedVolume) -> tuple[float, float]:
    if name == "Auto":
        return auto_window_level(loaded.volume.array)
    for preset, window, level in WINDOW_PRESETS:
        if preset == name:
            return window, level
    raise InputError(f"Unknown window preset {name!r}; choose Auto or one of "
                     f"{', '.join(p for p, _, _ in WINDOW_PRESETS)}.")


# --- segmentation ------------------------------------------------------------------------------
def new_segmentation(scene, volume_node, name: str = "Segmentation"):
    """An empty segmentation on the volume's grid, shown filled and outlined in the slice views."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetOpacity2DFill(SEGMENT_FILL_OPACITY_2D)
    display.SetVisibility2DOutline(True)
    return node


def add_segment(segmentation_node, name: str | None = None, color=None) -> str:
    """A new empty segment, named and coloured as Slicer numbers them; returns its ID."""
    segmentation = segmentation_node.GetSegmentation()
    index = segmentation.GetNumberOfSegments()
    name = (name or "").strip() or _free_name(segmentation, index + 1)
    color = color if color is not None else volume_io.palette_color(index)
    return segmentation.AddEmptySegment("", name, [float(c) for c in color])


def _free_name(segmentation, n: int) -> str:
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    while f"Segment_{n}" in names:
        n += 1
    return f"Segment_{n}"


def segment(segmentation_node, segment_id: str):
    found = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if found is None:
        raise InputError(f"There is no segment {segment_id!r} any more; select or add a segment.")
    return found


def segment_ids(segmentation_node) -> list[str]:
    return list(segmentation_node.GetSegmentation().GetSegmentIDs())


def rename_segment(segmentation_node, segment_id: str, name: str) -> None:
    name = (name or "").strip()
    if not name:
        raise InputError("A segment name cannot be empty.")
    segment(segmentation_node, segment_id).SetName(name)


def recolor_segment(segmentation_node, segment_id: str, color) -> None:
    segment(segmentation_node, segment_id).SetColor(*[float(c) for c in color])


def remove_segment(segmentation_node, segment_id: str) -> None:
    segment(segmentation_node, segment_id)
    segmentation_node.GetSegmentation().RemoveSegment(segment_id)


def hex_color(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb[:3])


def parse_hex_color(text: str) -> tuple[float, float, float]:
    value = str(text).strip().lstrip("#")
    if len(value) == 8:  # #rrggbbaa from a colour picker: the alpha is not a segment property
        value = value[:6]
    if len(value) != 6 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise InputError(f"Colour {text!r} is not #rrggbb.")
    return tuple(int(value[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def segment_mask(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment on the volume's voxel grid, (k, j, i) bool, resampled by Slicer's segmentation
    logic (no scene nodes: cheap enough for every status request)."""
    import slicer
    from vtk.util import numpy_support

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    reference = logic.CreateOrientedImageDataFromVolumeNode(volume_node)
    i, j, k = reference.GetDimensions()
    labelmap = slicer.vtkOrientedImageData()
    label = segment(segmentation_node, segment_id).GetLabelValue()
    # the segment's whole layer: segments sharing it differ by label value
    if not logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, labelmap, False):
        return np.zeros((k, j, i), dtype=bool)  # nothing painted yet
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    scalars = resampled.GetPointData().GetScalars()
    if scalars is None:
        return np.zeros((k, j, i), dtype=bool)
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i) == label


def save_segmentation(segmentation_node, loaded: LoadedVolume, path) -> str:
    """Write every segment (name, colour, voxels) to a .seg.nrrd on the volume's own geometry."""
    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for segment_id in segment_ids(segmentation_node):
        seg = segmentation.GetSegment(segment_id)
        segments.append({"name": seg.GetName(), "color": tuple(seg.GetColor()),
                         "mask": segment_mask(segmentation_node, segment_id, loaded.node)})
    if not segments:
        raise InputError("There is no segment to save; add a segment and place a prompt first.")
    return volume_io.write_segmentation(path, segments, loaded.volume, overwrite=True)
