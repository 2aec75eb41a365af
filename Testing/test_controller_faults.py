"""The controller when the scene changes under it (scene close, node removal) and when writing a
result fails while polling, on real slicer-core scenes with the random-weight model in this process."""

import warnings

import numpy as np
import pytest

import slicer_fixtures as sf

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

AXIAL = (0.0, 0.0, 1.0)


@pytest.fixture()
def in_process(model):
    from MedSAM2Lib import InProcessEngine

    return InProcessEngine(model)


def _controller(scene, engine, errors):
    from MedSAM2Lib.controller import ModuleController

    controller = ModuleController(scene, on_error=errors.append)
    controller.use_engine(engine)
    return controller


def _add_ct(scene, values):
    volume = sf.add_volume(scene, values, sf.matrix4(spacing=(0.7, 0.7, 2.5)), window=sf.CT_WINDOW)
    segmentation, ids = sf.add_segmentation(scene, volume, ("Segment_1",))
    return volume, segmentation, ids[0]


def test_after_a_scene_close_a_segmentation_reusing_the_old_id_is_watched(in_process, ct_volume):
    """vtkMRMLScene::Clear restarts node IDs: the next segmentation is "vtkMRMLSegmentationNode1"
    again, and deleting its segment must still close its session."""
    scene = sf.new_scene()
    values = np.ascontiguousarray(ct_volume[12:16]).astype(np.int16)
    volume, segmentation, segment_id = _add_ct(scene, values)
    controller = _controller(scene, in_process, [])
    controller.select(volume, segmentation, segment_id)
    controller.session()
    old_id = segmentation.GetID()
    scene.Clear(0)
    volume, segmentation, segment_id = _add_ct(scene, values)
    assert segmentation.GetID() == old_id, "the scenario needs the ID reused, as Slicer's Clear does"
    controller.select(volume, segmentation, segment_id)
    session = controller.session()
    segmentation.GetSegmentation().RemoveSegment(segment_id)
    assert session.closed and not controller.sessions(), "the new segmentation's segment watch is missing"


def test_a_removed_segmentation_is_no_longer_observed(in_process, ct_volume):
    import slicer

    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    controller = _controller(scene, in_process, [])
    controller.select(volume, segmentation, segment_id)
    controller.session()
    assert segmentation.HasObserver(slicer.vtkSegmentation.SegmentRemoved)
    scene.RemoveNode(segmentation)
    assert not segmentation.HasObserver(slicer.vtkSegmentation.SegmentRemoved)


def test_an_error_while_writing_a_propagation_ends_the_job_and_is_reported_once(in_process, ct_volume):
    """The segmentation converted to closed surface mid-propagation: poll() must not raise on every
    tick; the job ends with the error, the shell hears it once, and the next tick is quiet."""
    errors = []
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=8)
    controller = _controller(scene, in_process, errors)
    controller.select(volume, segmentation, segment_id)
    ras, _ = sf.prompt_ras(volume, values)
    controller.place_point(ras, AXIAL)
    while controller.busy:
        controller.poll()
    job = controller.propagate("both", slice_normal=AXIAL)
    while job.status != "running":
        controller.poll()
    segmentation.CreateClosedSurfaceRepresentation()
    segmentation.GetSegmentation().SetSourceRepresentationName("Closed surface")
    for _ in range(100):
        controller.poll()  # raised here, on every tick, before the guard
        if not controller.busy:
            break
    assert job.done and "not as a binary labelmap" in str(job.error)
    assert len(errors) == 1 and errors[0] is job.error
    controller.poll()
    assert len(errors) == 1 and not controller.busy and controller.progress is None
    controller.shutdown()
