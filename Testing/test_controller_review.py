"""The review through the module's controller on a real slicer-core scene: records of the slices the
segment shows (undo takes an action's records away, redo brings them back), and "Next uncertain
slice" moving an attached slice view (the random-weight model in this process)."""

import warnings

import slicer_fixtures as sf
from MedSAM2Lib.geometry import slice_view_center

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
AXIAL = (0.0, 0.0, 1.0)


def _red_view(scene, volume, k):
    import slicer

    view = slicer.vtkMRMLSliceNode()  # axial as made: SliceToRAS is the identity
    view.SetLayoutName("Red")
    view.SetName("Red")
    scene.AddNode(view)
    view.JumpSliceByOffsetting(*sf.ijk_to_ras(volume, (10.0, 10.0, float(k))))
    return view


def _shown_slice(volume, view):
    return round(float(sf.ras_to_ijk(volume, slice_view_center(view))[2]))


def _paint(volume, segmentation, segment_id, k, rows, cols):
    """A small blob on slice k, written the way a Segment Editor effect writes (Slicer's own logic)."""
    painted = sf.segment_array(volume.GetScene(), segmentation, segment_id, volume)
    painted[k] = False
    painted[k, rows[0]:rows[1], cols[0]:cols[1]] = True
    sf.paint_segment(segmentation, segment_id, volume, painted)


def test_the_review_follows_the_segment_and_next_uncertain_slice_moves_the_view(model, ct_volume):
    from MedSAM2Lib import InProcessEngine
    from MedSAM2Lib.controller import ModuleController

    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=6)
    controller = ModuleController(scene)
    controller.use_engine(InProcessEngine(model))
    controller.select(volume, segmentation, segment_id)
    ras, k = sf.prompt_ras(volume, values)
    view = _red_view(scene, volume, k)
    controller.attach_view(view)
    assert controller.review() == [] and controller.next_uncertain_slice() is None

    def settle():
        while controller.busy:
            controller.poll()

    controller.place_point(ras, AXIAL)
    settle()
    assert [(r["frame"], r["source"]) for r in controller.review()] == [(k, "prompt")]
    controller.propagate("both", slice_normal=AXIAL)
    settle()
    propagated = controller.review()
    shown = sf.segment_array(scene, segmentation, segment_id, volume)
    assert [r["frame"] for r in propagated] == list(range(6))
    assert [r["area"] for r in propagated] == [int(s.sum()) for s in shown]  # what the segment shows
    controller.undo()  # the propagation: only the prompted slice is left, and its record
    assert [r["frame"] for r in controller.review()] == [k]
    controller.redo()
    assert controller.review() == propagated

    # a slice painted small between two large ones, used as the prompt there: a jump the rule flags
    _paint(volume, segmentation, segment_id, k + 1, (60, 64), (40, 44))
    controller.use_edited_slice(sf.ijk_to_ras(volume, (42.0, 62.0, float(k + 1))), AXIAL)
    settle()
    records = {r["frame"]: r for r in controller.review()}
    # the engine's mask of the painted 4 x 4 pixels (SAM2 resamples a mask prompt)
    assert 0 < records[k + 1]["area"] <= 32 and records[k + 1]["source"] == "prompt"
    flagged = [f for f, r in records.items() if r["flagged"]]
    assert k + 1 in flagged and "area-jump" in records[k + 1]["reason"]

    assert _shown_slice(volume, view) == k
    assert controller.next_uncertain_slice() == k + 1  # the next flagged after the slice on screen
    assert _shown_slice(volume, view) == k + 1
    after = [f for f in flagged if f > k + 1]
    expected = after[0] if after else min(flagged)  # cycling
    assert controller.next_uncertain_slice() == expected and _shown_slice(volume, view) == expected
    before = [f for f in flagged if f < expected]
    assert controller.next_uncertain_slice(backwards=True) == (before[-1] if before else max(flagged))
    assert controller.show_frame(0) and _shown_slice(volume, view) == 0
    controller.set_review_rule(min_confidence=1.0)  # stricter: every slice with a mask under 1.0 is flagged
    assert [r["frame"] for r in controller.review() if r["flagged"]] == \
        sorted(set(flagged) | {f for f, r in records.items() if r["area"] and r["confidence"] < 1.0})
    cells = controller.review_cells()
    assert [c["frame"] for c in cells] == list(range(6)) and [c["flagged"] for c in cells] == \
        [r["flagged"] for r in controller.review()]
    controller.set_review_rule(min_confidence=0.5)
    controller.undo()  # the painted slice's prompt: its flag goes with it
    assert k + 1 not in [r["frame"] for r in controller.review() if r["flagged"]]
