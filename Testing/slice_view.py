"""A Slicer slice view rendered offscreen by Slicer's own pipeline: what a user sees, as pixels.

    volume = slicer_fixtures.load_volume_file(scene, path)   # read and displayed as Slicer does
    view = SliceView(scene)                    # the Red (axial) view, 256 x 256 pixels; in tests the
                                               # conftest fixture slice_view(scene, "Red", "Axial") closes it
    view.set_background(volume)                # the volume in the background layer, fitted
    view.jump_to(ras)                          # scroll to the slice through a RAS point
    image = view.capture()                     # (rows, cols, 3) uint8, row 0 at the top
    shown = overlay_mask(image, segment_rgb)   # pixels tinted by the segment's colour
    voxels = voxel_mask_on_view(view, volume, kji_bool)  # where those voxels project
    stray = disagreement_off_edges(shown, voxels)        # differences away from the outline
    view.ras_to_pixel(ras), view.pixel_ras(), view.save_png(path), view.close()

Other displayable managers (e.g. vtkMRMLMarkupsDisplayableManager) are named in
SliceView(displayable_managers=...); their registration with the factory is process-wide.

The pieces are those of Slicer's slice viewer, from the slicer-core wheel: the scene's
vtkSlicerApplicationLogic, a vtkMRMLSliceLogic for the view, the displayable managers of
vtkMRMLSliceViewDisplayableManagerFactory (the segmentation 2D one by default) and, as Slicer's
light box renderer manager does, the slice logic's blended layers as a 2D image actor behind them.
Only the Qt widget around the render window is missing. Rendering goes through VTK's EGL window
(Mesa on Linux, no X server); scripts/install_system_test_deps.sh installs what it needs.

Pixel coordinates: capture()[row, col] is the view's XY pixel (col, rows - 1 - row), the
coordinates of the slice node's XYToRAS matrix.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import slicer_fixtures as sf
from MedSAM2Lib.geometry import vtk_to_numpy_matrix

SEGMENTATIONS_2D = "vtkMRMLSegmentationsDisplayableManager2D"
INSTALL_HINT = ("On Debian/Ubuntu run scripts/install_system_test_deps.sh (Mesa's EGL: libegl1 libegl-mesa0 "
                "libgl1-mesa-dri); elsewhere install Mesa's EGL or a GPU driver's.")

_probe_result = None  # (ok, message), once per process


def _new_render_window():
    """VTK's EGL window where the wheel has one (Linux): offscreen without X. Chosen by class, not
    through VTK_DEFAULT_OPENGL_WINDOW, so it does not matter when vtk was first imported; VTK's
    own fallback without X is OSMesa, which the wheels cannot load."""
    try:
        from vtkmodules.vtkRenderingOpenGL2 import vtkEGLRenderWindow
    except ImportError:  # macOS, Windows: the platform window renders offscreen itself
        import vtk

        return vtk.vtkRenderWindow()
    return vtkEGLRenderWindow()


_PROBE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import vtk
    from slice_view import _new_render_window
    window = _new_render_window()
    window.SetOffScreenRendering(1)
    window.SetSize(8, 8)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.0, 1.0, 0.0)
    window.AddRenderer(renderer)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    print(window.GetClassName(), grab.GetOutput().GetPointData().GetScalars().GetTuple(0))
""")


def offscreen_rendering() -> tuple[bool, str]:
    """Whether VTK renders offscreen here, tried once in a child process (a missing EGL library
    can crash the process that tries: the tests then fail with a message, not a segfault)."""
    global _probe_result
    if _probe_result is None:
        try:
            run = subprocess.run([sys.executable, "-c", _PROBE, str(Path(__file__).parent)],
                                 capture_output=True, text=True, timeout=120)
            ok = run.returncode == 0 and "(0.0, 255.0, 0.0" in run.stdout
            detail = (run.stdout + run.stderr).strip()[-1500:]
        except subprocess.TimeoutExpired:
            ok, detail = False, "the probe did not finish in 120 s"
        _probe_result = (ok, "" if ok else f"VTK cannot render offscreen here ({detail}). {INSTALL_HINT}")
    return _probe_result


def require_offscreen_rendering() -> None:
    ok, message = offscreen_rendering()
    if not ok:
        raise RuntimeError(message)


class SliceView:
    """One slice view (Red, Yellow, Green...) of `scene`, rendered offscreen on demand."""

    def __init__(self, scene, name: str = "Red", orientation: str = "Axial", size: tuple[int, int] = (256, 256),
                 displayable_managers: tuple[str, ...] = (SEGMENTATIONS_2D,)):
        import slicer
        import vtk

        require_offscreen_rendering()
        self.scene, self.size = scene, (int(size[0]), int(size[1]))
        app = sf.application_logic(scene)
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app)  # a process-wide singleton: the managers made below take this one
        for manager in displayable_managers:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)

        self.window = _new_render_window()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*self.size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        # the slice logic's blended layers (background volume...), added before the managers' actors
        # as Slicer's light box renderer manager does: added after them, it is drawn over the
        # segment fill's half-transparent pixels and the fill looks opaque
        self._image_mapper = vtk.vtkImageMapper()
        self._image_mapper.SetColorWindow(255)  # the layers are already mapped to 0..255 RGBA
        self._image_mapper.SetColorLevel(127.5)
        self._image_actor = vtk.vtkActor2D()
        self._image_actor.SetMapper(self._image_mapper)
        self._image_actor.GetProperty().SetDisplayLocationToBackground()
        self._image_actor.SetVisibility(False)
        self.renderer.AddViewProp(self._image_actor)
        # the displayable managers need an interactor before they get their view node (else they crash)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.managers = factory.InstantiateDisplayableManagers(self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app)
        self.logic.SetMRMLScene(scene)
        app.GetSliceLogics().AddItem(self.logic)
        # a view named like an existing one shows that slice node (AddSliceNode would reset it)
        self.node = scene.GetSingletonNode(name, "vtkMRMLSliceNode")
        if self.node is not None:
            self.logic.SetSliceNode(self.node)
        else:
            self.node = self.logic.AddSliceNode(name)
        self.node.SetOrientation(orientation)
        self.managers.SetMRMLDisplayableNode(self.node)
        self.logic.ResizeSliceNode(*self.size)

    # --- what is shown ----------------------------------------------------------------------
    def set_background(self, volume_node, fit: bool = True) -> None:
        """Show `volume_node` in the background layer; fit the view to it (as loading does)."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID() if volume_node else None)
        if fit and volume_node is not None:
            self.logic.FitSliceToVolume(volume_node, *self.size)
            self.logic.SnapSliceOffsetToIJK()

    def set_slice_offset(self, offset: float) -> None:
        self.logic.SetSliceOffset(float(offset))

    def slice_offset(self) -> float:
        return float(self.logic.GetSliceOffset())

    def jump_to(self, ras) -> None:
        """Scroll (no pan) to the slice through RAS point `ras`, as clicking in another view does."""
        self.node.JumpSliceByOffsetting(*map(float, ras))

    # --- pixels -----------------------------------------------------------------------------
    def render(self) -> None:
        connection = self.logic.GetImageDataConnection()
        if self._image_mapper.GetInputConnection(0, 0) is not connection:
            self._image_mapper.SetInputConnection(connection)
        self._image_actor.SetVisibility(connection is not None)
        self.window.Render()

    def _grab(self):
        import vtk

        self.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()  # offscreen: the back buffer holds the frame
        grab.Update()
        return grab.GetOutput()

    def capture(self) -> np.ndarray:
        """Render now; the view's pixels as (rows, cols, 3) uint8, row 0 at the top of the screen."""
        from vtk.util import numpy_support

        image = self._grab()
        cols, rows, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(rows, cols, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])  # VTK's rows start at the bottom

    def save_png(self, path) -> Path:
        """Render now and write the view as a PNG."""
        import vtk

        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputData(self._grab())
        writer.Write()
        return Path(path)

    def pixel_ras(self) -> np.ndarray:
        """(rows, cols, 3): the RAS point each pixel of capture() shows (the slice node's XYToRAS)."""
        cols, rows = self.size
        xy_to_ras = vtk_to_numpy_matrix(self.node.GetXYToRAS())
        c, r = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
        xy = np.stack([c, rows - 1 - r, np.zeros_like(c), np.ones_like(c)], axis=-1)
        return (xy @ xy_to_ras.T)[..., :3]

    def ras_to_pixel(self, ras) -> tuple[int, int]:
        """(row, col) of capture() nearest to where RAS point `ras` projects on this view."""
        x, y = (np.linalg.inv(vtk_to_numpy_matrix(self.node.GetXYToRAS())) @ np.append(np.asarray(ras, float), 1.0))[:2]
        return int(round(self.size[1] - 1 - y)), int(round(x))

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.logic.GetMRMLApplicationLogic().GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.window.Finalize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- reading the picture --------------------------------------------------------------------

def overlay_mask(image: np.ndarray, rgb, min_chroma: int = 40) -> np.ndarray:
    """bool (rows, cols): pixels tinted by a segment of colour `rgb` (0..1, a saturated colour)
    over a greyscale background: grey pixels have R = G = B, the segment's fill and outline push
    the segment's strongest channel above the others."""
    pixels = np.asarray(image, dtype=np.int16)
    chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
    return (chroma >= min_chroma) & (pixels.argmax(axis=-1) == int(np.argmax(rgb)))


def world_to_ijk(volume_node) -> np.ndarray:
    """4x4 world (RAS) -> the volume's continuous IJK, through its parent transforms."""
    import vtk

    to_local = vtk.vtkMatrix4x4()  # identity without a parent transform
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        parent.GetMatrixTransformFromWorld(to_local)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    return vtk_to_numpy_matrix(ras_to_ijk) @ vtk_to_numpy_matrix(to_local)


def voxel_mask_on_view(view: SliceView, volume_node, kji_mask: np.ndarray) -> np.ndarray:
    """bool (rows, cols): the pixels of `view` whose RAS point lies in a True voxel of `kji_mask`
    (on the volume's grid, K J I), nearest voxel; pixels outside the volume are False."""
    ras = view.pixel_ras()
    ijk = np.floor(np.concatenate([ras, np.ones(ras.shape[:2] + (1,))], axis=-1) @ world_to_ijk(volume_node).T
                   + 0.5)[..., :3].astype(int)
    k, j, i = kji_mask.shape
    inside = (ijk[..., 0] >= 0) & (ijk[..., 0] < i) & (ijk[..., 1] >= 0) & (ijk[..., 1] < j) & \
             (ijk[..., 2] >= 0) & (ijk[..., 2] < k)
    out = np.zeros(ras.shape[:2], dtype=bool)
    out[inside] = kji_mask[ijk[..., 2][inside], ijk[..., 1][inside], ijk[..., 0][inside]]
    return out


def disagreement_off_edges(shown: np.ndarray, expected: np.ndarray, edge_px: int = 2) -> np.ndarray:
    """bool (rows, cols): pixels where `shown` and `expected` differ further than `edge_px` from
    the edge of `expected` (the outline is drawn across voxel borders and resampled)."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(expected, iterations=edge_px)
    shrunk = ndimage.binary_erosion(expected, iterations=edge_px)
    return (shown != expected) & ~(grown & ~shrunk)
