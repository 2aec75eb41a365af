"""Reading a volume node: its voxels as a numpy view, and its display window."""

from __future__ import annotations

import numpy as np


def display_window(volume_node):
    """(low, high) of the volume's display window/level, or None when it has none."""
    display = volume_node.GetDisplayNode() if volume_node is not None else None
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width, level = float(display.GetWindow()), float(display.GetLevel())
    if not np.isfinite(width) or not np.isfinite(level) or width <= 0:
        return None
    return (level - width / 2.0, level + width / 2.0)


def volume_array(volume_node) -> np.ndarray:
    """The volume's voxels as a (K, J, I) numpy view of its VTK image (no copy)."""
    from vtk.util import numpy_support

    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0])
