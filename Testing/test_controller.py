"""The module's controller (MedSAM2Lib.controller) on real slicer-core scenes: what the Qt and web
shells rely on. Engine-process behaviour (closing, scene close) runs a real child process; the
rest runs the random-weight model in this process (InProcessEngine) for speed."""

import time
import warnings

import numpy as np
import pytest
import vtk

import slicer_fixtures as sf
from MedSAM2Lib.geometry import vtk_to_numpy_matrix
from MedSAM2Lib.slicer_loop import run_main_loop

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

AXIAL = (0.0, 0.0, 1.0)


class Shell:
    """What a shell receives: errors, messages, refreshes (no dialogs from the logic)."""

    def __init__(self):
        self.errors, self.messages, self.changes = [], [], 0

    def kwargs(self):
        return {"on_error": self.errors.append, "on_message": self.messages.append,
                "on_changed": lambda: setattr(self, "changes", self.changes + 1)}


def _settings(random_checkpoint, **kw):
    from MedSAM2Lib import ModelSettings

    fields = dict(name="sam2.1_hiera_tiny", checkpoint=str(random_checkpoint), device="cpu", image_size=256,
                  allow_random=True)
    return ModelSettings(**{**fields, **kw})


def _controller(scene, shell, engine=None):
    from MedSAM2Lib.controller import ModuleController

    controller = ModuleController(scene, **shell.kwargs())
    if engine is not None:
        controller.use_engine(engine)
    return controller


@pytest.fixture()
def in_process(model):
    from MedSAM2Lib import InProcessEngine

    return InProcessEngine(model)


def _labelmap_mtime(segmentation, segment_id):
    return segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap").GetMTime()


def test_closing_the_scene_mid_propagation_cancels_waits_and_writes_nothing_more(random_checkpoint, ct_volume):
    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume)
    controller = _controller(scene, shell)
    controller.set_settings(_settings(random_checkpoint))
    controller.select(volume, segmentation, segment_id)
    ras, _ = sf.prompt_ras(volume, values)
    volume_matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(volume_matrix)
    volume_matrix = vtk_to_numpy_matrix(volume_matrix)
    began = time.perf_counter()
    controller.engine.wait_ready(timeout=240)
    load_s = time.perf_counter() - began  # start the child, import torch, load the model
    controller.place_point(ras, AXIAL)
    job = controller.propagate("both", slice_normal=AXIAL)
    run_main_loop(controller.poll, lambda: job.done_frames >= 2 or job.done, timeout=240)
    assert not job.done, "the propagation is still running when the scene closes"
    pid, generation = controller.engine.pid, controller.engine.generation
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    labelmap = segment.GetRepresentation("Binary labelmap")
    scene.Clear(0)  # Slicer's File > Close scene
    assert job.done and job.cancelled and not controller.busy
    assert segmentation.GetScene() is None
    mtime = labelmap.GetMTime()
    for _ in range(20):
        controller.poll()
    assert labelmap.GetMTime() == mtime, "no write lands in the removed segmentation"
    assert not shell.errors, shell.errors
    assert sf.process_alive(pid) and controller.model_loaded, "closing the scene keeps the model loaded"
    # the next patient: the same child answers the first prompt, without loading the model again
    volume = sf.add_volume(scene, values, volume_matrix, window=sf.CT_WINDOW)
    segmentation, ids = sf.add_segmentation(scene, volume)
    controller.select(volume, segmentation, ids[0])
    began = time.perf_counter()
    job = controller.place_point(ras, AXIAL)
    run_main_loop(controller.poll, lambda: job.done, timeout=240)
    first_prompt_s = time.perf_counter() - began
    assert job.error is None and not shell.errors, (job.error, shell.errors)
    assert (controller.engine.pid, controller.engine.generation) == (pid, generation), "no new child, no reload"
    assert first_prompt_s < load_s, f"first prompt after the scene closed took {first_prompt_s:.2f} s; " \
                                    f"loading the model takes {load_s:.2f} s"
    # Unload model: the child stops (its memory, GPU included, is freed); the next prompt loads it again
    assert controller.unload_model() and not controller.model_loaded and not sf.process_alive(pid)
    job = controller.place_point(ras, AXIAL)
    run_main_loop(controller.poll, lambda: job.done, timeout=240)
    assert job.error is None and controller.engine.pid not in (None, pid)
    new_pid = controller.engine.pid
    controller.shutdown()  # module cleanup
    assert not sf.process_alive(new_pid), "no engine process is left behind"


def test_an_idle_model_is_unloaded_after_the_settings_idle_time(random_checkpoint, ct_volume):
    from dataclasses import replace

    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume[10:14])
    controller = _controller(scene, shell)
    controller.set_settings(_settings(random_checkpoint))
    try:
        controller.select(volume, segmentation, segment_id)
        job = controller.place_point(sf.prompt_ras(volume, values)[0], AXIAL)
        run_main_loop(controller.poll, lambda: job.done, timeout=240)
        pid = controller.engine.pid
        assert job.error is None and sf.process_alive(pid)
        for _ in range(5):  # idle within the default 30 minutes: the model stays
            controller.poll()
        assert sf.process_alive(pid) and controller.model_loaded
        # changing only the idle time keeps the engine (no restart), and applies at once
        assert controller.set_settings(replace(controller.settings, idle_unload_minutes=0.002))
        assert controller.engine.pid == pid
        run_main_loop(controller.poll, lambda: not controller.model_loaded, timeout=30)
        assert not sf.process_alive(pid)
        assert any("Unloaded the MedSAM2 model after" in m for m in shell.messages), shell.messages
        assert not shell.errors, shell.errors
    finally:
        controller.shutdown()


def test_removing_the_segmentation_mid_propagation_stops_its_session(random_checkpoint, ct_volume):
    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume)
    controller = _controller(scene, shell)
    controller.set_settings(_settings(random_checkpoint))
    try:
        controller.select(volume, segmentation, segment_id)
        controller.place_point(sf.prompt_ras(volume, values)[0], AXIAL)
        job = controller.propagate("both", slice_normal=AXIAL)
        run_main_loop(controller.poll, lambda: job.done_frames >= 1 or job.done, timeout=240)
        labelmap = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
        scene.RemoveNode(segmentation)
        assert job.done and not controller.sessions()
        mtime = labelmap.GetMTime()
        for _ in range(20):
            controller.poll()
        assert labelmap.GetMTime() == mtime and not shell.errors
    finally:
        controller.shutdown()


def test_settings_only_a_real_change_closes_sessions_and_stops_the_engine(random_checkpoint, ct_volume):
    """Tabbing through the settings fields (editingFinished on every focus-out) changes nothing."""
    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    controller = _controller(scene, shell)
    settings = _settings(random_checkpoint)
    assert controller.set_settings(settings)
    controller.select(volume, segmentation, segment_id)
    try:
        job = controller.place_point(sf.prompt_ras(volume, values)[0], AXIAL)
        run_main_loop(controller.poll, lambda: job.done, timeout=240)
        session, pid = controller.session(create=False), controller.engine.pid
        assert session.can_undo and sf.process_alive(pid)
        assert not controller.set_settings(_settings(random_checkpoint))  # the same values again
        assert controller.session(create=False) is session and session.can_undo and controller.engine.pid == pid
        assert controller.set_settings(_settings(random_checkpoint, device="auto"))
        assert controller.session(create=False) is None and session.closed and not sf.process_alive(pid)
    finally:
        controller.shutdown()


def test_prompts_markers_undo_redo_and_errors_through_the_controller(in_process, ct_volume):
    from MedSAM2Lib.markers import Marker

    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=6)
    controller = _controller(scene, shell, in_process)
    controller.select(volume, segmentation, segment_id)
    points = controller.prompt_nodes.node("points")
    ras, k = sf.prompt_ras(volume, values)
    points.AddControlPoint(*ras)
    job = controller.place_point(ras, AXIAL, marker=Marker.for_point(points, 0))
    while controller.busy:
        controller.poll()
    assert job.action is not None and controller.can_undo and not shell.errors
    controller.undo()
    assert not points.GetNthControlPointVisibility(0) and controller.can_redo
    controller.redo()
    assert points.GetNthControlPointVisibility(0)
    # an oblique view is refused with a message, not an exception, and its marker goes away
    points.AddControlPoint(*ras)
    assert controller.place_point(ras, (0.0, 0.6, 0.8), marker=Marker.for_point(points, 1)) is None
    assert points.GetNumberOfControlPoints() == 1
    assert len(shell.errors) == 1 and "Rotate to volume plane" in str(shell.errors[0])
    # a box shows an ROI while it stays in the engine
    controller.place_box(sf.ijk_to_ras(volume, (30, 40, k) + np.zeros(3)), sf.ijk_to_ras(volume, (60, 80, k) + np.zeros(3)),
                         AXIAL)
    while controller.busy:
        controller.poll()
    rois = [n for n in scene.GetNodesByClass("vtkMRMLMarkupsROINode")]
    assert len(rois) == 1 and rois[0].GetDisplayVisibility()
    controller.undo()
    assert not rois[0].GetDisplayVisibility()


def test_progress_and_cancel_of_a_queued_and_a_running_job(in_process, ct_volume):
    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=8)
    controller = _controller(scene, shell, in_process)
    controller.select(volume, segmentation, segment_id)
    ras, _ = sf.prompt_ras(volume, values)
    controller.place_point(ras, AXIAL)
    job = controller.propagate("both", slice_normal=AXIAL)  # queued behind the prompt
    assert controller.busy and controller.progress is None, "nothing started before the first tick"
    controller.poll()
    controller.poll()
    assert job.status == "running" and controller.progress.text.startswith("Propagating")
    assert controller.progress.maximum == job.total == 8
    controller.cancel()
    while controller.busy:
        controller.poll()
    assert job.done and job.cancelled and job.error is None and job.done_frames < job.total
    queued = controller.propagate("both", slice_normal=AXIAL)
    controller.cancel()
    assert queued.done and queued.cancelled and not controller.busy


def test_sessions_follow_the_options_and_the_segment(in_process, ct_volume):
    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    controller = _controller(scene, shell, in_process)
    with pytest.raises(ValueError, match="Select a volume"):
        controller.session()
    controller.select(volume, segmentation, segment_id)
    first = controller.session()
    assert controller.session() is first
    controller.set_options(memory="sam2")
    second = controller.session()
    assert second is not first and first.closed and second.memory == "sam2"
    with pytest.raises(ValueError, match="window .* is empty"):
        controller.set_options(window=(5.0, 1.0))
    with pytest.raises(ValueError, match="Memory must be one of"):
        controller.set_options(memory="lru")


def test_a_segmentation_without_display_nodes_gets_them_when_a_session_starts(in_process, ct_volume):
    """qMRMLNodeComboBox's "Create new" makes a segmentation without a display node: results would
    be invisible."""
    scene, volume, _, _, values = sf.ct_scene(ct_volume, count=4)
    bare = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "created by a selector")
    segment_id = bare.GetSegmentation().AddEmptySegment("", "lesion")
    assert bare.GetDisplayNode() is None
    controller = _controller(scene, Shell(), in_process)
    controller.select(volume, bare, segment_id)
    controller.session()
    assert bare.GetDisplayNode() is not None


def test_prompt_nodes_are_never_saved_nor_their_display_nodes(ct_volume):
    from MedSAM2Lib.prompt_nodes import PromptNodes

    scene = sf.new_scene()
    nodes = PromptNodes(scene)
    points = nodes.node("points")
    roi = nodes.box((0, 0, 0), (10, 10, 0), AXIAL)
    for node in (points, roi):
        assert not node.GetSaveWithScene()
        assert node.GetDisplayNode() is not None and not node.GetDisplayNode().GetSaveWithScene()
    assert nodes.node("points") is points


def test_leaving_the_prompt_tools_restores_the_users_place_mode():
    import slicer

    from MedSAM2Lib.prompt_nodes import PlacementState, PromptNodes

    scene = sf.new_scene()
    interaction, selection = sf.interaction_node(scene), sf.selection_node(scene)  # Slicer's Markups logic acts
    users = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
    selection.SetActivePlaceNodeID(users.GetID())
    interaction.SetPlaceModePersistence(0)
    placement = PlacementState(interaction, selection)
    ours = PromptNodes(scene).node("points")
    placement.begin(ours)
    assert selection.GetActivePlaceNodeID() == ours.GetID() and interaction.GetPlaceModePersistence() == 1
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.Place and placement.ours([ours])
    placement.end()
    assert selection.GetActivePlaceNodeID() == users.GetID() and interaction.GetPlaceModePersistence() == 0
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.ViewTransform


def test_the_modules_self_test_scenario_passes_on_slicer_core(ct_volume):
    """MedSAM2Test runs MedSAM2Lib.selftest inside Slicer; here the same scenario on slicer-core."""
    from MedSAM2Lib.selftest import run_self_test

    scene, volume, _, _, _ = sf.ct_scene(ct_volume, count=8)
    said = []
    run_self_test(scene, volume, say=said.append, timeout=300)
    assert said[-1] == "Undo of every action: OK"


def test_deleting_a_segment_closes_its_session(in_process, ct_volume):
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    controller = _controller(scene, Shell(), in_process)
    controller.select(volume, segmentation, segment_id)
    session = controller.session()
    segmentation.GetSegmentation().RemoveSegment(segment_id)
    assert session.closed and not controller.sessions()


def test_an_engine_handed_in_is_closed_by_its_maker_not_by_scene_close_or_cleanup(random_checkpoint, ct_volume):
    """The web page keeps one engine across the scenes it opens; a console user's engine is theirs."""
    from MedSAM2Lib import LocalEngine

    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    engine = LocalEngine("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu", image_size=256,
                         allow_random_weights=True)
    try:
        engine.start()
        controller = _controller(scene, Shell(), engine)
        scene.Clear(0)
        assert sf.process_alive(engine.pid), "closing the scene left the handed-in engine running"
        controller.set_settings(_settings(random_checkpoint, device="auto"))  # another engine from now on
        assert sf.process_alive(engine.pid), "a settings change left the handed-in engine running"
        controller.use_engine(engine)
        controller.shutdown()
        assert sf.process_alive(engine.pid), "module cleanup left the handed-in engine running"
    finally:
        engine.close()
    assert not sf.process_alive(engine.pid)
