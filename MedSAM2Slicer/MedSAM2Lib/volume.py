"""Volume nodes and numpy: a node from an array, its voxels as a numpy view, its display window."""

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


def add_volume_node(scene, kji_values, ijk_to_ras, name: str = "volume"):
    """A scalar volume node holding (a copy of) these (K, J, I) voxels, with this 4x4 IJK-to-RAS."""
    import vtk
    from vtk.util import numpy_support

    from .geometry import numpy_to_vtk_matrix

    values = np.ascontiguousarray(kji_values)
    k, j, i = values.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.ravel(), deep=True))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(numpy_to_vtk_matrix(np.asarray(ijk_to_ras, dtype=float)))
    return node
