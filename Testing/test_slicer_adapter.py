"""MedSAM2Lib on real slicer-core MRML scenes with the real engine (random weights, 256 px).

How "reaches the engine at the right pixel" is checked without trusting the adapter's geometry:
the volumes hold a different value in every voxel (its flat KJI index), and a recorder around
the real model keeps the array the adapter handed to the engine. A pixel (frame, y, x) of that
array therefore names its voxel; the test compares it with the voxel Slicer's own RASToIJK
matrix (and parent transform) gives for the clicked RAS point. Segments are read back through
Slicer's ExportSegmentsToLabelmapNode, not through the adapter.
"""

import os
import threading
import warnings

import numpy as np
import pytest

import slicer_fixtures as sf

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

NORMALS = {"axial": (0.0, 0.0, 1.0), "coronal": (0.0, 1.0, 0.0), "sagittal": (1.0, 0.0, 0.0)}
SHAPE = (7, 12, 14)  # K, J, I: non-square frames in every direction
BLOB = 100000  # added inside an ellipsoid: something for the model to segment, values stay unique
WINDOW = (0.0, float(BLOB))


def _quiet_vtk():
    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()  # label map display nodes warn about colour tables


_quiet_vtk()


@pytest.fixture()
def recorder(model):
    return sf.RecordingModel(model)


def _session(volume, segmentation, segment_id, model, **kw):
    from MedSAM2Lib import SegmentationSession

    return SegmentationSession(volume, segmentation, segment_id, model, **kw)


def _volume_values():
    """Every voxel a different value whose remainder mod BLOB is its flat KJI index."""
    blob = sf.blob_volume(SHAPE, (3, 6, 7), (3, 4, 5)) > 0
    return sf.unique_volume(SHAPE) + BLOB * blob


def _index(values):
    return np.asarray(values) % BLOB


def _voxel_of(value):
    """A voxel's value -> its (i, j, k)."""
    k, j, i = np.unravel_index(int(value) % BLOB, SHAPE)
    return np.array([i, j, k])


# Volumes whose IJK axes are not RAS axes: LPS-like (DICOM), a signed axis permutation, and
# two scenes with parent transforms (segmentation outside / inside the same transform).
PERMUTED = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # I->A, J->-S, K->-R
CASES = {
    "lps": dict(rotation=np.diag([-1.0, -1.0, 1.0])),
    "permuted": dict(rotation=PERMUTED),
    "parent_transform": dict(rotation=np.diag([-1.0, -1.0, 1.0]),
                             transform=sf.matrix4(sf.rotation(0, 90) @ sf.rotation(2, -90), origin=(5, -7, 11)),
                             segmentation_under_transform=False),
    "parent_transform_both": dict(rotation=PERMUTED, transform=sf.matrix4(sf.rotation(1, -90), origin=(1, 2, 3)),
                                  segmentation_under_transform=True),
}


def _scene_for(case, values=None, window=WINDOW):
    spec = CASES[case]
    scene = sf.new_scene()
    values = _volume_values() if values is None else values
    volume = sf.add_volume(scene, values, sf.matrix4(spec["rotation"], (0.7, 0.9, 2.5), (-12.0, 30.0, 7.0)),
                           window=window)
    segmentation, ids = sf.add_segmentation(scene, volume)
    if "transform" in spec:
        t = sf.add_transform(scene, spec["transform"])
        volume.SetAndObserveTransformNodeID(t.GetID())
        if spec["segmentation_under_transform"]:
            segmentation.SetAndObserveTransformNodeID(t.GetID())
    return scene, volume, segmentation, ids


def _world_axis_for(volume, normal):
    """Which IJK axis Slicer's matrices align with a view normal (independent of the adapter)."""
    origin = sf.ijk_to_ras(volume, (0, 0, 0))
    dirs = [sf.ijk_to_ras(volume, np.eye(3)[a]) - origin for a in range(3)]
    cos = [abs(np.dot(d / np.linalg.norm(d), normal)) for d in dirs]
    return int(np.argmax(cos)), max(cos)


def _view_normals_aligned(volume):
    return {name: n for name, n in NORMALS.items() if _world_axis_for(volume, n)[1] > 0.9999}


@pytest.mark.parametrize("case", sorted(CASES))
def test_point_reaches_engine_at_ras_to_ijk_voxel_and_slice_is_written(case, recorder):
    scene, volume, segmentation, (seg_a, _) = _scene_for(case)
    views = _view_normals_aligned(volume)
    assert len(views) == 3, "every case is built so that all three views follow volume axes"
    for n_view, (view, normal) in enumerate(sorted(views.items())):
        session = _session(volume, segmentation, seg_a, recorder)
        voxel = np.array([9, 4, 3]) if view != "sagittal" else np.array([5, 7, 2])
        ras = sf.ijk_to_ras(volume, voxel + 0.0)
        session.add_point(ras, include=True, slice_normal=normal)

        engine_volume, open_kw, log = recorder.opened[-1]
        assert open_kw["window"] == WINDOW, "default window = the volume's display window/level"
        (_, frame, obj_id, kw, mask), = [e for e in log if e[0] == "add_prompt"]
        (x, y), = kw["points"]
        assert kw["labels"].tolist() == [1]
        expected_ijk = sf.ras_to_ijk(volume, ras)
        np.testing.assert_allclose(expected_ijk, voxel, atol=1e-6)
        # the pixel the engine got is the voxel RASToIJK gives, at a voxel centre
        assert abs(x - round(x)) < 1e-6 and abs(y - round(y)) < 1e-6
        np.testing.assert_array_equal(_voxel_of(engine_volume[frame, round(y), round(x)]), voxel)
        # the whole frame is the slice through that voxel along the view's axis
        axis, _ = _world_axis_for(volume, normal)
        frame_voxels = np.array(np.unravel_index(_index(engine_volume[frame]).ravel(), SHAPE))[::-1]  # -> i, j, k rows
        assert (frame_voxels[axis] == voxel[axis]).all() and frame == voxel[axis]

        # the slice in the segment equals the engine's mask; nothing else was written
        written = sf.segment_array(scene, segmentation, seg_a, volume)
        assert written.ravel()[_index(engine_volume[frame]).ravel()].tolist() == mask.ravel().tolist()
        assert mask.any() and not mask.all(), "a non-trivial mask, so the comparison means something"
        others = np.ones(SHAPE, bool)
        others.ravel()[_index(engine_volume[frame]).ravel()] = False
        assert not written[others].any()
        session.undo()
        assert not sf.segment_array(scene, segmentation, seg_a, volume).any()

        # a point between voxel centres arrives between pixel centres, in the frame's own axes
        x_next = engine_volume[frame, round(y), round(x) + 1]
        step = sf.ijk_to_ras(volume, _voxel_of(x_next)) - ras
        session2 = _session(volume, segmentation, seg_a, recorder)
        session2.add_point(ras + 0.3 * step, include=False, slice_normal=normal)
        (_, frame2, _, kw2, _), = [e for e in recorder.opened[-1][2] if e[0] == "add_prompt"]
        assert frame2 == frame and kw2["labels"].tolist() == [0]
        np.testing.assert_allclose(kw2["points"][0], [x + 0.3, y], atol=1e-6)
        session2.undo()
    assert len(recorder.opened) == 6  # one engine session per (segment session, axis)


def test_frames_are_oriented_as_slicer_shows_each_view():
    """Frame columns run to screen right and rows to screen bottom, per vtkMRMLSliceNode presets."""
    import slicer
    import vtk

    from MedSAM2Lib import VolumeGeometry

    presets = {"axial": slicer.vtkMRMLSliceNode.GetAxialSliceToRASMatrix,
               "coronal": slicer.vtkMRMLSliceNode.GetCoronalSliceToRASMatrix,
               "sagittal": slicer.vtkMRMLSliceNode.GetSagittalSliceToRASMatrix}
    for case in ("lps", "permuted", "parent_transform"):
        scene, volume, _, _ = _scene_for(case)
        geometry = VolumeGeometry(volume)
        values = _volume_values()
        for view, normal in NORMALS.items():
            m = vtk.vtkMatrix3x3()
            presets[view](m, True)
            right = np.array([m.GetElement(r, 0) for r in range(3)])
            down = -np.array([m.GetElement(r, 1) for r in range(3)])
            frames = geometry.layout(geometry.axis_for_normal(normal)).frames(values)
            f = frames.shape[0] // 2
            here = sf.ijk_to_ras(volume, _voxel_of(frames[f, 1, 1]))
            col_step = sf.ijk_to_ras(volume, _voxel_of(frames[f, 1, 2])) - here
            row_step = sf.ijk_to_ras(volume, _voxel_of(frames[f, 2, 1])) - here
            assert np.dot(col_step / np.linalg.norm(col_step), right) > 0.8, (case, view)
            assert np.dot(row_step / np.linalg.norm(row_step), down) > 0.8, (case, view)
            assert not np.shares_memory(frames, values) or frames.base is not None  # a view, no copy


def test_oblique_views_are_refused_before_anything_happens(recorder):
    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    ras = sf.ijk_to_ras(volume, (5, 5, 3))
    with pytest.raises(ValueError, match="oblique.*Rotate to volume plane"):
        session.add_point(ras, slice_normal=(0.0, 0.3, 1.0))
    # a volume tilted 20 degrees about S: the axial view still follows it, the coronal does not
    scene2 = sf.new_scene()
    tilted = sf.add_volume(scene2, sf.unique_volume(SHAPE), sf.matrix4(sf.rotation(2, 20), (1, 1, 2)))
    seg2, (seg2_a, _) = sf.add_segmentation(scene2, tilted)
    s2 = _session(tilted, seg2, seg2_a, recorder)
    with pytest.raises(ValueError, match="20.0 degrees"):
        s2.add_point(sf.ijk_to_ras(tilted, (5, 5, 3)), slice_normal=NORMALS["coronal"])
    assert recorder.opened == [] and not sf.segment_array(scene, segmentation, seg_a, volume).any()
    s2.add_point(sf.ijk_to_ras(tilted, (5, 5, 3)), slice_normal=NORMALS["axial"])
    assert len(recorder.opened) == 1 and sf.segment_array(scene2, seg2, seg2_a, tilted)[3].any()


def test_bad_prompts_say_what_is_wrong(recorder):
    from medsam2.errors import InputError

    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    with pytest.raises(InputError, match="outside"):
        session.add_point(sf.ijk_to_ras(volume, (5, 40, 3)))
    with pytest.raises(InputError, match="different slices"):
        session.add_box(sf.ijk_to_ras(volume, (2, 2, 2)), sf.ijk_to_ras(volume, (8, 8, 3)))
    with pytest.raises(InputError, match="Nothing to propagate"):
        session.propagate()
    with pytest.raises(InputError, match="empty on this slice"):
        session.use_edited_slice(sf.ijk_to_ras(volume, (5, 5, 3)))
    with pytest.raises(InputError, match="not in segmentation"):
        _session(volume, segmentation, "no-such-segment", recorder)
    assert recorder.opened == [] and not session.can_undo


def test_box_corners_reach_the_engine_as_one_frame_box(recorder):
    scene, volume, segmentation, (seg_a, _) = _scene_for("permuted")
    session = _session(volume, segmentation, seg_a, recorder)
    a, b = np.array([2, 3, 1]), np.array([10, 8, 6])
    b[_world_axis_for(volume, NORMALS["axial"])[0]] = a[_world_axis_for(volume, NORMALS["axial"])[0]]
    session.add_box(sf.ijk_to_ras(volume, a), sf.ijk_to_ras(volume, b), slice_normal=NORMALS["axial"])
    engine_volume, _, log = recorder.opened[-1]
    (_, frame, _, kw, mask), = [e for e in log if e[0] == "add_prompt"]
    x0, y0, x1, y1 = kw["box"]
    assert x0 < x1 and y0 < y1
    corners = {tuple(_voxel_of(engine_volume[frame, int(y), int(x)])) for x in (x0, x1) for y in (y0, y1)}
    assert tuple(a) in corners and tuple(b) in corners
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    assert written.ravel()[_index(engine_volume[frame]).ravel()].tolist() == mask.ravel().tolist()


def _all_segments(scene, segmentation, volume, ids):
    return {i: sf.segment_array(scene, segmentation, i, volume) for i in ids}


def test_propagation_fills_other_slices_with_the_engines_masks(recorder):
    scene, volume, segmentation, (seg_a, seg_b) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    session.add_point(sf.ijk_to_ras(volume, (7, 6, 3)))
    before = session._segment.write_log[:]
    progress = []
    action = session.propagate("both", on_frame=lambda f, done, total: progress.append((f, done, total)))

    engine_volume, _, log = recorder.opened[-1]
    engine_masks = recorder.opened[-1][2]
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    frames = {e[1]: e[2][1] for e in engine_masks if e[0] == "frame"}
    assert sorted(frames) == list(range(SHAPE[0])), "both directions reach every slice"
    for f, mask in frames.items():
        assert written.ravel()[_index(engine_volume[f]).ravel()].tolist() == mask.ravel().tolist(), f
    assert written.sum(axis=(1, 2)).min() > 0, "every slice got a mask"
    assert [p[0] for p in progress] == [e[1] for e in log if e[0] == "frame"]
    assert progress[-1][1] == progress[-1][2] == len(progress)
    # one undo step; writes covered only slices that changed, each once per run of slices
    new_extents = session._segment.write_log[len(before):]
    written_frames = sorted(k for e in new_extents for k in range(e[4], e[5] + 1))
    assert written_frames == action.frames and 3 not in action.frames
    assert not sf.segment_array(scene, segmentation, seg_b, volume).any(), "other segment untouched"


def test_cancel_keeps_finished_slices_as_one_undo_step(recorder):
    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    session.add_point(sf.ijk_to_ras(volume, (7, 6, 1)))
    after_point = sf.segment_array(scene, segmentation, seg_a, volume)
    cancel = threading.Event()
    session.propagate("forward", cancel=cancel, on_frame=lambda f, d, t: cancel.set() if f == 3 else None)
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    assert written[2].any() and written[3].any() and not written[4:].any()
    session.undo()
    np.testing.assert_array_equal(sf.segment_array(scene, segmentation, seg_a, volume), after_point)


def test_up_and_down_follow_the_view_normal(recorder):
    for rotation, up in ((np.diag([-1.0, -1.0, 1.0]), "forward"), (np.diag([-1.0, -1.0, -1.0]), "backward")):
        scene = sf.new_scene()
        volume = sf.add_volume(scene, sf.unique_volume(SHAPE), sf.matrix4(rotation))
        segmentation, (seg_a, _) = sf.add_segmentation(scene, volume)
        session = _session(volume, segmentation, seg_a, recorder)
        session.add_point(sf.ijk_to_ras(volume, (4, 4, 3)), slice_normal=NORMALS["axial"])
        for asked, expected in (("up", up), ("down", ({"forward", "backward"} - {up}).pop())):
            job = session.submit_propagate(asked)
            assert job.direction == expected
            job.cancel()  # never started: queued jobs leave nothing behind
            assert job.done and not session.busy
        job = session.submit_propagate("both", slice_range=(1, 5))
        assert (job.stop, job.total) == ((1, 5), 5), "slices 1..5, each counted once"
        job.cancel()
        with pytest.raises(ValueError, match="must include"):
            session.submit_propagate("both", slice_range=(4, 6))


def test_segments_are_independent_and_undo_redo_restore_exactly(recorder):
    scene, volume, segmentation, ids = _scene_for("parent_transform")
    seg_a, seg_b = ids
    a = _session(volume, segmentation, seg_a, recorder)
    b = _session(volume, segmentation, seg_b, recorder)
    axial, coronal = NORMALS["axial"], NORMALS["coronal"]
    states = [_all_segments(scene, segmentation, volume, ids)]

    def step(fn):
        fn()
        states.append(_all_segments(scene, segmentation, volume, ids))

    axis_a, axis_b = _world_axis_for(volume, axial)[0], _world_axis_for(volume, coronal)[0]
    vox = lambda *ijk: sf.ijk_to_ras(volume, ijk)  # noqa: E731
    p1, p2 = np.array([7, 6, 3]), np.array([3, 2, 3])
    p2[axis_a] = p1[axis_a]
    c1, c2 = np.array([2, 2, 4]), np.array([10, 9, 5])
    c2[axis_b] = c1[axis_b]
    step(lambda: a.add_point(vox(*p1), True, axial))
    step(lambda: a.add_point(vox(*p2), False, axial))
    step(lambda: b.add_box(vox(*c1), vox(*c2), coronal))
    # slice ranges keep the test quick; they also show that range limits hold
    step(lambda: a.propagate("both", slice_range=(p1[axis_a] - 1, p1[axis_a] + 1)))
    changed_a = np.flatnonzero((states[-1][seg_a] != states[-2][seg_a]).any(axis=tuple({0, 1, 2} - {2 - axis_a})))
    assert set(changed_a) <= {p1[axis_a] - 1, p1[axis_a] + 1} and len(changed_a)
    assert (states[-1][seg_b] == states[-2][seg_b]).all(), "propagating A leaves B alone"
    step(lambda: b.propagate("both", slice_range=(c1[axis_b] - 1, c1[axis_b] + 1)))
    assert (states[-1][seg_a] == states[-2][seg_a]).all(), "propagating B leaves A alone"
    for later, earlier in zip(states[1:], states[:-1]):
        assert any((later[i] != earlier[i]).any() for i in ids), "each step changed something"

    # undo walks back one action at a time, each segment exactly as it was
    undo_order = [b, a, b, a, a]
    for i, session in enumerate(undo_order):
        assert session.undo() is not None
        expected = states[len(states) - 2 - i]
        now = _all_segments(scene, segmentation, volume, ids)
        for sid in ids:
            np.testing.assert_array_equal(now[sid], expected[sid])
    assert a.undo() is None and b.undo() is None
    for i, session in enumerate(reversed(undo_order)):
        session.redo()
        now = _all_segments(scene, segmentation, volume, ids)
        for sid in ids:
            np.testing.assert_array_equal(now[sid], states[i + 1][sid])


def test_engine_forgets_an_undone_prompt_before_the_next_one(recorder, model):
    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    p1, p2, p3 = (sf.ijk_to_ras(volume, v) for v in ((7, 6, 3), (3, 9, 3), (10, 3, 3)))
    session.add_point(p1)
    session.add_point(p2, include=False)
    session.undo()
    log = recorder.opened[-1][2]
    n_before = len(log)
    session.add_point(p3)
    replay = log[n_before:]
    assert [e[0] for e in replay] == ["clear_prompts", "add_prompt", "add_prompt"]
    assert replay[0][1] == 3 and replay[1][3]["labels"].tolist() == [1]  # p1 replayed, p2 gone
    # the engine now holds p1 + p3 only: a fresh engine session with those two agrees
    engine_volume = recorder.opened[-1][0]
    fresh = model.open(engine_volume, memory="self-sorting", window=WINDOW)
    fresh.add_prompt(3, points=replay[1][3]["points"], labels=[1])
    expected = fresh.add_prompt(3, points=replay[2][3]["points"], labels=[1])
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    assert written.ravel()[_index(engine_volume[3]).ravel()].tolist() == expected.ravel().tolist()


def test_edited_slice_becomes_the_mask_prompt_and_stays_as_painted(recorder):
    scene, volume, segmentation, (seg_a, seg_b) = _scene_for("permuted")
    # paint slice k=2 of segment A the way a Segment Editor effect does (Slicer's own logic)
    painted = np.zeros(SHAPE, np.uint8)
    painted[2, 3:9, 4:11] = 1
    sf.paint_segment(segmentation, seg_a, volume, painted, mode="merge_max")
    session = _session(volume, segmentation, seg_a, recorder)
    normal = NORMALS["sagittal"]  # K runs along -R in the permuted volume
    action = session.use_edited_slice(sf.ijk_to_ras(volume, (6, 6, 2)), slice_normal=normal)
    assert action.frames == [], "using the slice does not change it"
    engine_volume, _, log = recorder.opened[-1]
    (_, frame, _, kw, _), = [e for e in log if e[0] == "add_prompt"]
    assert frame == 2
    np.testing.assert_array_equal(kw["mask"], painted.ravel()[_index(engine_volume[2])].astype(bool))
    session.propagate("both", slice_normal=normal, slice_range=(1, 3))
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    np.testing.assert_array_equal(written[2], painted[2].astype(bool))
    assert written[1].any() and written[3].any() and not written[[0, 4, 5, 6]].any()
    session.undo()
    np.testing.assert_array_equal(sf.segment_array(scene, segmentation, seg_a, volume), painted.astype(bool))


def test_shared_labelmap_layer_other_segment_and_other_slices_untouched(recorder):
    scene, volume, segmentation, (seg_a, seg_b) = _scene_for("lps")
    session_b = _session(volume, segmentation, seg_b, recorder)
    session_b.add_point(sf.ijk_to_ras(volume, (7, 6, 5)))
    session_a = _session(volume, segmentation, seg_a, recorder)
    session_a.add_point(sf.ijk_to_ras(volume, (7, 6, 1)))
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(True)  # as after saving and reloading
    before = _all_segments(scene, segmentation, volume, (seg_a, seg_b))
    session_a.add_point(sf.ijk_to_ras(volume, (7, 6, 5)))  # overlaps B on B's slice
    after = _all_segments(scene, segmentation, volume, (seg_a, seg_b))
    np.testing.assert_array_equal(after[seg_b], before[seg_b])
    changed = np.flatnonzero((after[seg_a] != before[seg_a]).any(axis=(1, 2)))
    assert changed.tolist() == [5]
    session_a.undo()
    now = _all_segments(scene, segmentation, volume, (seg_a, seg_b))
    for sid in (seg_a, seg_b):
        np.testing.assert_array_equal(now[sid], before[sid])
    # a slice where B is absent is written straight into the shared layer; B stays as it was
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(True)
    layers = segmentation.GetSegmentation().GetNumberOfLayers()
    session_a.add_point(sf.ijk_to_ras(volume, (7, 6, 2)))
    after = _all_segments(scene, segmentation, volume, (seg_a, seg_b))
    np.testing.assert_array_equal(after[seg_b], before[seg_b])
    assert np.flatnonzero((after[seg_a] != before[seg_a]).any(axis=(1, 2))).tolist() == [2]
    assert segmentation.GetSegmentation().GetNumberOfLayers() == layers


def test_segmentation_on_another_grid_is_refused_with_advice(recorder):
    import slicer
    import vtk
    from vtk.util import numpy_support

    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    image = slicer.vtkOrientedImageData()
    image.SetExtent(0, 3, 0, 3, 0, 3)
    image.SetSpacing(0.5, 0.5, 0.5)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ones(64, np.uint8), deep=True,
                                                               array_type=vtk.VTK_UNSIGNED_CHAR))
    slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation, seg_a, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    with pytest.raises(ValueError, match="different voxel grid.*Specify geometry"):
        _session(volume, segmentation, seg_a, recorder)


def test_submitting_returns_at_once_and_poll_writes_the_slice(recorder):
    """The shell's path: submit (no engine work, no write), then poll() from its timer applies."""
    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, recorder)
    snapshot = sf.segment_array(scene, segmentation, seg_a, volume)
    job = session.submit_point(sf.ijk_to_ras(volume, (7, 6, 3)))
    assert not job.done and session.busy and not recorder.opened, "nothing reached the engine yet"
    np.testing.assert_array_equal(sf.segment_array(scene, segmentation, seg_a, volume), snapshot)
    while not job.done:
        session.poll()
    assert job.error is None and job.action is not None and session.can_undo
    assert sf.segment_array(scene, segmentation, seg_a, volume)[3].any()


# --- the non-Qt helpers the module shell stands on --------------------------------------------

def test_settings_choose_a_local_or_remote_engine_and_check_the_device():
    from MedSAM2Lib import LocalEngine, ModelSettings, RemoteEngine

    local = ModelSettings(name="sam2.1_hiera_tiny", checkpoint="/x/y.pt", device="cpu", image_size=256).create_engine()
    assert isinstance(local, LocalEngine) and not isinstance(local, RemoteEngine) and local.state == "stopped"
    assert local.config["checkpoint"] == "/x/y.pt" and local.config["image_size"] == 256
    remote = ModelSettings(server_url="http://127.0.0.1:9", token="t").create_engine()
    assert isinstance(remote, RemoteEngine) and remote.config["url"] == "http://127.0.0.1:9"
    assert local.pid is None and remote.pid is None, "no child starts before the first use"
    with pytest.raises(ValueError, match="Device must be one of"):
        ModelSettings(device="tpu").create_engine()


def test_fused_axes_write_the_engines_fused_volume(model):
    """axes='all': the segment receives the engine's three-axis fused masks on every slice."""
    from medsam2.errors import InputError

    scene, volume, segmentation, (seg_a, seg_b) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, model, axes="all")
    session.add_point(sf.ijk_to_ras(volume, (7, 6, 3)))
    with pytest.raises(InputError, match="Fusing all three axes"):
        session.propagate("forward")
    job = session.submit_propagate("both")
    steps_at_first_slice = None
    while not job.done:
        session.poll()
        if steps_at_first_slice is None and job.done_frames:
            steps_at_first_slice = job.steps - job.done_frames + 1
    assert job.error is None
    # the progress bar moved through the three single-axis runs before any fused slice came
    assert steps_at_first_slice > 3 * SHAPE[0] and job.steps == job.steps_total > job.total == SHAPE[0]
    state = session._axes[session._last_axis]
    fused = state.layout.slab_to_kji(session.engine_masks())  # the engine's fused result, KJI order
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    prompted = {f for f, p in state.prompts.items() if p}
    for k in range(SHAPE[0]):
        if k in prompted:  # a prompted slice keeps what its prompt gave
            continue
        assert np.array_equal(written[k], fused[k]), f"slice {k}"
    assert fused.any() and not sf.segment_array(scene, segmentation, seg_b, volume).any()
    with pytest.raises(InputError, match="Axes must be"):
        _session(volume, segmentation, seg_b, model, axes="three")


def test_image_set_mode_segments_every_slice_without_slice_order(model):
    """image_set=True: slices are independent images; one prompt gives every slice a mask."""
    scene, volume, segmentation, (seg_a, _) = _scene_for("lps")
    session = _session(volume, segmentation, seg_a, model, image_set=True)
    session.add_point(sf.ijk_to_ras(volume, (7, 6, 3)))
    state = session._axes[session._last_axis]
    assert type(state.engine.session).__name__ != "Session"  # the engine's image-set session, not a volume one
    session.propagate("both")
    written = sf.segment_array(scene, segmentation, seg_a, volume)
    engine = state.layout.slab_to_kji(session.engine_masks())
    prompted = {f for f, p in state.prompts.items() if p}
    for k in set(range(SHAPE[0])) - prompted:
        assert np.array_equal(written[k], engine[k]), f"slice {k}"
    assert written.sum(axis=(1, 2)).min() > 0, "every image got a mask"
