"""Real slicer-core scenes for the adapter tests, and a recorder around the real engine.

Nothing here imitates Slicer: scenes, volumes, segmentations and transforms are the real MRML
classes of the slicer-core wheel. `RecordingModel` wraps the real engine model only to note
what the adapter sends it (the engine still does all the work).
"""

import numpy as np

CT_WINDOW = (-1000.0, 400.0)  # slicerio's chest CT as a lung window shows it


def new_scene():
    """An MRML scene with the Segmentations and Markups logics attached, as Slicer's startup does.

    With Slicer's own Markups logic acting, adding a markups node makes it the active place node
    (vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded), as in Slicer. That logic finds the selection node
    by its singleton ID, so the selection and interaction singletons go in first (Slicer's
    application logic adds the same two)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    for node in (slicer.vtkMRMLSelectionNode(), slicer.vtkMRMLInteractionNode()):
        node.SetSingletonTag("Singleton")  # IDs vtkMRMLSelectionNodeSingleton, vtkMRMLInteractionNodeSingleton
        scene.AddNode(node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    scene._medsam2_keep = logic  # keep the logics alive as long as the scene
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLScene(scene)
    scene._medsam2_markups = markups
    return scene


def selection_node(scene):
    return scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")


def interaction_node(scene):
    return scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")


def matrix4(rotation=np.eye(3), spacing=(1, 1, 1), origin=(0, 0, 0)):
    m = np.eye(4)
    m[:3, :3] = np.asarray(rotation, float) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def rotation(axis, degrees):
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def to_vtk(m):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r][c]))
    return out


def add_volume(scene, kji_values, ijk_to_ras, name="volume", window=None):
    """Scalar volume with these (K, J, I) voxel values and IJK-to-RAS matrix."""
    from MedSAM2Lib.volume import add_volume_node

    node = add_volume_node(scene, kji_values, ijk_to_ras, name)
    if window is not None:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.AutoWindowLevelOff()
        display.SetWindowLevel(window[1] - window[0], (window[0] + window[1]) / 2)
        node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def unique_volume(shape_kji, dtype=np.int32):
    """Every voxel a different value (its flat KJI index), so a pixel names its voxel."""
    return np.arange(int(np.prod(shape_kji)), dtype=dtype).reshape(shape_kji)


def blob_volume(shape_kji, center_kji, radius):
    """A bright ellipsoid on a dark background (CT-like values)."""
    grid = np.indices(shape_kji).astype(float)
    d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center_kji, radius))
    return np.where(d <= 1.0, 300, -800).astype(np.int16)


def add_segmentation(scene, volume, segment_names=("A", "B"), name="segmentation"):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    ids = [node.GetSegmentation().AddEmptySegment(n, n) for n in segment_names]
    return node, ids


def add_transform(scene, matrix, name="transform"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(to_vtk(matrix))
    return node


def segment_array(scene, segmentation, segment_id, volume):
    """The segment on the volume's voxel grid (K, J, I) bool, read back through Slicer's own export
    (independent of the adapter's reader)."""
    import slicer
    from vtk.util import numpy_support

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, [segment_id], labelmap, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        assert ok, "Slicer could not export the segment"
        image = labelmap.GetImageData()
        dims = image.GetDimensions()
        out = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        assert dims == volume.GetImageData().GetDimensions()
        return out.astype(bool).copy()
    finally:
        scene.RemoveNode(labelmap)


def paint_segment(segmentation, segment_id, volume, kji_mask, mode="replace"):
    """Write `kji_mask` (on the volume's voxel grid) into the segment the way a Segment Editor effect
    does: through Slicer's own SetBinaryLabelmapToSegment; mode "replace" or "merge_max"."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    shape = np.asarray(kji_mask).shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    image.SetImageToWorldMatrix(m)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.asarray(kji_mask, np.uint8).ravel(), deep=True))
    modes = {"replace": logic.MODE_REPLACE, "merge_max": logic.MODE_MERGE_MAX}
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, modes[mode])


def ras_to_ijk(volume, ras):
    """RAS (world) -> continuous IJK through Slicer's own matrices and the parent transforms."""
    import vtk

    world_to_local = vtk.vtkMatrix4x4()  # identity when there is no parent transform
    parent = volume.GetParentTransformNode()
    if parent is not None:
        parent.GetMatrixTransformFromWorld(world_to_local)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    local = world_to_local.MultiplyPoint(list(ras) + [1.0])
    return np.array(ras_to_ijk.MultiplyPoint(local)[:3])


def ijk_to_ras(volume, ijk):
    import vtk

    local_m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(local_m)
    local = local_m.MultiplyPoint(list(map(float, ijk)) + [1.0])
    parent = volume.GetParentTransformNode()
    if parent is None:
        return np.array(local[:3])
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return np.array(to_world.MultiplyPoint(local)[:3])


class RecordingSession:
    """The real engine session; notes each call the adapter makes."""

    def __init__(self, real, log):
        self._real, self.log = real, log

    def __getattr__(self, name):
        return getattr(self._real, name)

    def add_prompt(self, frame, obj_id=1, **kw):
        mask = self._real.add_prompt(frame, obj_id=obj_id, **kw)
        self.log.append(("add_prompt", frame, obj_id, kw, np.array(mask)))
        return mask

    def clear_prompts(self, frame, obj_id):
        self.log.append(("clear_prompts", frame, obj_id))
        return self._real.clear_prompts(frame, obj_id)

    def propagate(self, **kw):
        self.log.append(("propagate", kw))
        for frame, masks in self._real.propagate(**kw):
            self.log.append(("frame", frame, {k: np.array(v) for k, v in masks.items()}))
            yield frame, masks


class RecordingModel:
    """The real model; `opened` keeps (volume handed to the engine, kwargs, session log)."""

    def __init__(self, real):
        self._real = real
        self.opened = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def open(self, volume, **kw):
        log = []
        self.opened.append((np.array(volume), kw, log))
        return RecordingSession(self._real.open(volume, **kw), log)

    def prompts(self, index=-1):
        return [e for e in self.opened[index][2] if e[0] == "add_prompt"]


def ct_scene(ct_volume, first=9, count=16, upsample=1, rows=None, cols=None):
    """slicerio's chest CT (a slab of it; rows/cols: (start, stop) crops) as a volume node, LPS-like
    like DICOM, plus a segment."""
    values = ct_volume[first:first + count]
    values = values[:, slice(*rows)] if rows else values
    values = np.ascontiguousarray(values[:, :, slice(*cols)] if cols else values).astype(np.int16)
    if upsample > 1:
        values = np.ascontiguousarray(values.repeat(upsample, axis=1).repeat(upsample, axis=2))
    spacing = (0.7 / upsample, 0.7 / upsample, 2.5)
    scene = new_scene()
    volume = add_volume(scene, values, matrix4(np.diag([-1.0, -1.0, 1.0]), spacing, (10.0, 20.0, -30.0)),
                        window=CT_WINDOW)
    segmentation, ids = add_segmentation(scene, volume)
    return scene, volume, segmentation, ids[0], values


def prompt_ras(volume, values):
    """A point on the middle slice, a third of the way along its rows (in the chest CT: lung)."""
    k, j, i = values.shape[0] // 2, values.shape[1] // 2, values.shape[2] // 3
    return ijk_to_ras(volume, (i, j, k) + np.zeros(3)), k


# --- an application around the scene, and files read by Slicer's own readers ----------------------

def application_logic(scene):
    """The scene's vtkSlicerApplicationLogic, made once the way Slicer's startup makes it: default
    colour tables and the Colors module logic (volumes get the Grey table), the Segmentations and
    Markups logics of new_scene (the markups displayable managers make their widgets through the
    latter), an empty slice logic collection (a bare application logic has none) and the slice
    orientation presets (needed before any slice node is added)."""
    import slicer
    import vtk

    app = getattr(scene, "_medsam2_app_logic", None)
    if app is not None:
        return app
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    segmentations = getattr(scene, "_medsam2_keep", None)
    if segmentations is not None:
        segmentations.SetMRMLApplicationLogic(app)
        app.SetModuleLogic("Segmentations", segmentations)
    markups = getattr(scene, "_medsam2_markups", None)
    if markups is not None:
        markups.SetMRMLApplicationLogic(app)
        app.SetModuleLogic("Markups", markups)
    app.SetSliceLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    scene._medsam2_app_logic = app
    return app


def load_volume_file(scene, path, name=None):
    """A scalar volume read by Slicer's volumes logic, with the display (Grey, auto window/level)
    Slicer gives a loaded volume."""
    from pathlib import Path

    import slicer

    app = application_logic(scene)
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    logic.SetMRMLApplicationLogic(app)
    node = logic.AddArchetypeVolume(str(path), name or Path(path).name.split(".")[0])
    assert node is not None, f"Slicer could not read {path}"
    return node


def load_segmentation_file(scene, path, name=None):
    """A segmentation (.seg.nrrd) read by Slicer's segmentation storage node, with display nodes."""
    from pathlib import Path

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or Path(path).name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def process_alive(pid) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
