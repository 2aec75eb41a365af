"""Where a click in a slice view lands in the volume, and how the volume is cut into frames.

Everything that converts between RAS (world), the volume's IJK voxel indices and the engine's
frames lives here, so there is one place to read (and one test file to check) the flips and
transposes.

Frame layout (the one place that defines it)
--------------------------------------------
The engine takes an array (frames, rows, cols). The adapter hands it a *view* of the volume's
KJI array (no copy) cut along the IJK axis the slice view looks along, with each frame oriented
the way Slicer's default slice views show it (patient right on screen left, from
vtkMRMLSliceNode's Axial/Coronal/Sagittal presets):

    view (axis nearest to)   screen right   screen down
    axial    (S)             L  (-1, 0, 0)  P (0, -1, 0)
    coronal  (A)             L  (-1, 0, 0)  I (0, 0, -1)
    sagittal (R)             P  (0, -1, 0)  I (0, 0, -1)

So frame row 0 is the top of the view and column 0 its left edge. For each frame axis the two
remaining IJK axes are assigned to columns and rows by which one points closest to screen right
(world directions, parent transforms included), and flipped where they point left or up. Frames
themselves are never reversed: frame f is voxel index f along the frame axis.
"""

from dataclasses import dataclass

import numpy as np

from medsam2.errors import InputError

AXIS_NAMES = ("I", "J", "K")
ANATOMICAL_VIEWS = ("sagittal", "coronal", "axial")  # indexed by the dominant RAS component
# screen right / screen down in RAS for each anatomical view (see the module docstring)
SCREEN_RIGHT = {"axial": (-1.0, 0.0, 0.0), "coronal": (-1.0, 0.0, 0.0), "sagittal": (0.0, -1.0, 0.0)}
SCREEN_DOWN = {"axial": (0.0, -1.0, 0.0), "coronal": (0.0, 0.0, -1.0), "sagittal": (0.0, 0.0, -1.0)}

# A view this close to a volume axis is "along" it; beyond, it cuts voxels obliquely.
MAX_OBLIQUE_DEGREES = 0.5
# Relative tolerance when deciding whether two voxel grids are the same (spacing-scaled).
GRID_TOLERANCE = 1e-4


def vtk_to_numpy_matrix(vtk_matrix):
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def numpy_to_vtk_matrix(array):
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _node_label(node):
    return f"'{node.GetName()}'" if node is not None and node.GetName() else "the node"


def node_to_world(node):
    """4x4 matrix from the node's local coordinates to world; refuses non-linear transforms."""
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"{_node_label(node)} is under a non-linear transform ({parent.GetName()}). MedSAM2 needs "
            "straight voxel rows: harden the transform (Transforms module, 'Harden transform') or "
            "remove it, then try again.")
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return vtk_to_numpy_matrix(m)


def ijk_to_world(volume_node):
    """4x4 matrix from voxel IJK to world RAS, the volume's parent transforms included."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return node_to_world(volume_node) @ vtk_to_numpy_matrix(m)


def volume_dimensions(volume_node):
    """(I, J, K) voxel counts; a clear error when the node holds no image."""
    image = volume_node.GetImageData() if volume_node is not None else None
    if image is None:
        raise InputError(f"The volume {_node_label(volume_node)} has no image data: load an image first.")
    dims = tuple(int(d) for d in image.GetDimensions())
    if min(dims) < 1:
        raise InputError(f"The volume {_node_label(volume_node)} is empty (dimensions {dims}).")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"The volume {_node_label(volume_node)} has {image.GetNumberOfScalarComponents()} components "
            "per voxel; MedSAM2 needs a scalar (grey-level) volume. Convert it first, e.g. with the "
            "'Vector to scalar volume' module.")
    return dims


def _unit(v):
    v = np.asarray(v, dtype=float)[:3]
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise InputError(f"The slice normal {tuple(v)} is not a direction (zero length or not finite).")
    return v / n


def view_axis(ijk_to_ras, slice_normal, volume_name="the volume"):
    """The IJK axis (0, 1 or 2) a view with this world normal looks along, or a clear refusal."""
    normal = _unit(slice_normal)
    directions = [_unit(ijk_to_ras[:3, a]) for a in range(3)]
    cosines = [abs(float(np.dot(d, normal))) for d in directions]
    axis = int(np.argmax(cosines))
    angle = float(np.degrees(np.arccos(np.clip(cosines[axis], -1.0, 1.0))))
    if angle > MAX_OBLIQUE_DEGREES:
        raise InputError(
            f"This slice view is oblique to {volume_name}: its normal is {angle:.1f} degrees away from "
            f"the nearest volume axis ({AXIS_NAMES[axis]}). MedSAM2 segments along the volume's own "
            "slices. Use the slice view's menu 'Rotate to volume plane' (or reset the view to "
            "Axial/Coronal/Sagittal if the volume is not tilted), then place the prompt again.")
    return axis


@dataclass(frozen=True)
class FrameLayout:
    """How frames (frame, row, col) sit in the volume's voxel grid (IJK)."""

    axis: int          # IJK axis the frames run along
    row_axis: int      # IJK axis that runs down the frame
    row_flip: bool     # rows run against that axis
    col_axis: int      # IJK axis that runs across the frame
    col_flip: bool
    dims: tuple        # volume (I, J, K) sizes
    view: str          # "axial" | "coronal" | "sagittal": the view whose orientation frames follow

    @classmethod
    def for_axis(cls, ijk_to_ras, axis, dims):
        """Layout for frames along IJK `axis`, oriented the way the matching slice view shows them."""
        d = [_unit(ijk_to_ras[:3, a]) for a in range(3)]
        view = ANATOMICAL_VIEWS[int(np.argmax(np.abs(d[axis])))]
        right, down = np.array(SCREEN_RIGHT[view]), np.array(SCREEN_DOWN[view])
        p, q = [a for a in range(3) if a != axis]
        # the in-plane axis nearest to screen right becomes the columns
        col_axis, row_axis = (p, q) if abs(d[p] @ right) >= abs(d[q] @ right) else (q, p)
        return cls(axis=axis, row_axis=row_axis, row_flip=bool(d[row_axis] @ down < 0),
                   col_axis=col_axis, col_flip=bool(d[col_axis] @ right < 0),
                   dims=tuple(int(x) for x in dims), view=view)

    @property
    def num_frames(self):
        return self.dims[self.axis]

    @property
    def frame_shape(self):
        return (self.dims[self.row_axis], self.dims[self.col_axis])

    # --- arrays ---------------------------------------------------------------------------
    def _orient(self, kji):
        """(K, J, I)-ordered array (or slab) -> (frames, rows, cols) view, no copy."""
        # numpy axis of IJK axis a in a KJI array is 2 - a
        out = np.transpose(kji, (2 - self.axis, 2 - self.row_axis, 2 - self.col_axis))
        return out[:, ::-1 if self.row_flip else 1, ::-1 if self.col_flip else 1]

    def frames(self, kji_array):
        """The volume's KJI array seen as engine frames (frames, rows, cols); a view, not a copy."""
        if tuple(kji_array.shape) != (self.dims[2], self.dims[1], self.dims[0]):
            raise InputError(f"Volume array shape {kji_array.shape} does not match dimensions {self.dims}.")
        return self._orient(kji_array)

    def slab_from_kji(self, kji_slab):
        """A KJI-ordered slab covering whole frames -> (n, rows, cols)."""
        return self._orient(kji_slab)

    def slab_to_kji(self, frames):
        """(n, rows, cols) -> KJI-ordered slab for `extent(...)` of those frames (a view)."""
        f = frames[:, ::-1 if self.row_flip else 1, ::-1 if self.col_flip else 1]
        order = (2 - self.axis, 2 - self.row_axis, 2 - self.col_axis)  # KJI axis -> frame axis
        return np.transpose(f, np.argsort(order))

    def extent(self, first, last):
        """VTK extent (i0, i1, j0, j1, k0, k1) of frames first..last (inclusive)."""
        ext = [0, self.dims[0] - 1, 0, self.dims[1] - 1, 0, self.dims[2] - 1]
        ext[2 * self.axis], ext[2 * self.axis + 1] = int(first), int(last)
        return ext

    # --- points ---------------------------------------------------------------------------
    def ijk_to_frame(self, ijk):
        """Continuous IJK -> (frame index, x=col, y=row), unchecked and unrounded."""
        ijk = np.asarray(ijk, dtype=float)
        row, col = ijk[self.row_axis], ijk[self.col_axis]
        if self.row_flip:
            row = self.dims[self.row_axis] - 1 - row
        if self.col_flip:
            col = self.dims[self.col_axis] - 1 - col
        return float(ijk[self.axis]), float(col), float(row)

    def frame_to_ijk(self, frame, x, y):
        """The inverse of ijk_to_frame: a frame pixel (x=col, y=row) -> continuous IJK."""
        ijk = np.zeros(3)
        ijk[self.axis] = frame
        ijk[self.row_axis] = self.dims[self.row_axis] - 1 - y if self.row_flip else y
        ijk[self.col_axis] = self.dims[self.col_axis] - 1 - x if self.col_flip else x
        return ijk


class VolumeGeometry:
    """A volume node's voxel grid in world coordinates, read once (parent transforms included)."""

    def __init__(self, volume_node):
        self.node = volume_node
        self.name = _node_label(volume_node)
        self.dims = volume_dimensions(volume_node)
        self.ijk_to_ras = ijk_to_world(volume_node)
        self.ras_to_ijk = np.linalg.inv(self.ijk_to_ras)
        self._layouts = {}

    def axis_for_normal(self, slice_normal):
        return view_axis(self.ijk_to_ras, slice_normal, self.name)

    def layout(self, axis):
        if axis not in self._layouts:
            self._layouts[axis] = FrameLayout.for_axis(self.ijk_to_ras, axis, self.dims)
        return self._layouts[axis]

    def ras_to_ijk_point(self, ras):
        ras = np.asarray(ras, dtype=float)
        if ras.shape != (3,) or not np.all(np.isfinite(ras)):
            raise InputError(f"A prompt position must be three finite RAS coordinates, got {ras!r}.")
        return (self.ras_to_ijk @ np.append(ras, 1.0))[:3]

    def locate(self, ras, slice_normal):
        """RAS point in a view with this normal -> (layout, frame index, x, y), range-checked.

        The frame is the nearest voxel slice; x, y stay continuous (voxel centres are integers)
        and are clipped into the frame when the point lies in the outer half of a border voxel.
        """
        axis = self.axis_for_normal(slice_normal)
        layout = self.layout(axis)
        frame_f, x, y = layout.ijk_to_frame(self.ras_to_ijk_point(ras))
        frame = int(np.floor(frame_f + 0.5))
        rows, cols = layout.frame_shape
        problems = []
        if not 0 <= frame < layout.num_frames:
            problems.append(f"slice {frame} along {AXIS_NAMES[axis]} (volume has 0..{layout.num_frames - 1})")
        if not -0.5 <= x <= cols - 0.5:
            problems.append(f"column {x:.1f} (frame has 0..{cols - 1})")
        if not -0.5 <= y <= rows - 0.5:
            problems.append(f"row {y:.1f} (frame has 0..{rows - 1})")
        if problems:
            raise InputError(
                f"The prompt at RAS ({ras[0]:.1f}, {ras[1]:.1f}, {ras[2]:.1f}) is outside {self.name}: "
                + "; ".join(problems) + ". Place it on the volume's image.")
        return layout, frame, float(np.clip(x, 0, cols - 1)), float(np.clip(y, 0, rows - 1))

    def world_direction_of_axis(self, axis):
        return _unit(self.ijk_to_ras[:3, axis])


def labelmap_geometry(volume_geometry, segmentation_node):
    """4x4 matrix from the volume's IJK to the segmentation node's local coordinates.

    A segment's labelmap lives in its segmentation node's coordinates; writing the volume's own
    voxel grid there (through both nodes' parent transforms) keeps every written voxel exactly on
    a volume voxel. Refuses grids that a vtkOrientedImageData cannot hold (shear, mirror-scaling).
    """
    m = np.linalg.inv(node_to_world(segmentation_node)) @ volume_geometry.ijk_to_ras
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    directions = m[:3, :3] / spacing
    if not np.allclose(directions.T @ directions, np.eye(3), atol=1e-5):
        raise InputError(
            "The volume and the segmentation are related by a transform with shear or uneven "
            "scaling, so the volume's voxels cannot be stored in the segmentation. Harden the "
            "transforms (Transforms module) or put both nodes under the same transform.")
    return m


def grids_match(matrix_a, matrix_b, spacing):
    """True when two IJK-to-RAS matrices describe the same voxel grid (within a tiny tolerance)."""
    tol = GRID_TOLERANCE * float(np.min(spacing))
    return bool(np.all(np.abs(matrix_a[:3, :4] - matrix_b[:3, :4]) <= max(tol, 1e-9)))


def slice_view_normal(slice_node) -> tuple:
    """The slice view's normal in RAS (column 2 of its SliceToRAS): which volume axis it looks along."""
    m = slice_node.GetSliceToRAS()
    return (m.GetElement(0, 2), m.GetElement(1, 2), m.GetElement(2, 2))


def slice_view_center(slice_node) -> tuple:
    """The RAS point at the slice view's centre (on the slice it shows)."""
    m = slice_node.GetSliceToRAS()
    return (m.GetElement(0, 3), m.GetElement(1, 3), m.GetElement(2, 3))
