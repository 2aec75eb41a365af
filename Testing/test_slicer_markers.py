"""Prompt markers follow undo and redo, on real slicer-core markups nodes and a real session."""

import warnings

import numpy as np

import slice_view as sv
import slicer_fixtures as sf

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
AXIAL = (0.0, 0.0, 1.0)


def _setup(model):
    from MedSAM2Lib import SegmentationSession
    from MedSAM2Lib.markers import PromptMarkers

    shape = (5, 12, 14)
    values = (sf.unique_volume(shape) + 1000 * (sf.blob_volume(shape, (2, 6, 7), (2, 4, 5)) > 0)).astype(np.int16)
    scene = sf.new_scene()
    volume = sf.add_volume(scene, values, sf.matrix4(spacing=(0.8, 0.8, 2.0)), window=(0.0, 1500.0))
    segmentation, (segment_id, _) = sf.add_segmentation(scene, volume)
    session = SegmentationSession(volume, segmentation, segment_id, model, window=(0.0, 1500.0))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "prompts")
    return scene, volume, session, points, PromptMarkers()


def _click(session, markers, points, volume, ijk, include=True):
    """What the module does for a click: a control point, the prompt, the marker bound to its action."""
    from MedSAM2Lib.markers import Marker

    ras = sf.ijk_to_ras(volume, ijk)
    points.AddControlPoint(*ras)
    marker = Marker.for_point(points, points.GetNumberOfControlPoints() - 1)
    action = session.add_point(ras, include, AXIAL)
    markers.attach(session, action, marker)
    markers.prune(session)
    return marker


def test_undo_hides_redo_shows_and_a_new_action_drops_what_cannot_be_redone(model):
    from MedSAM2Lib.markers import Marker

    scene, volume, session, points, markers = _setup(model)
    m1 = _click(session, markers, points, volume, (7, 6, 2))
    m2 = _click(session, markers, points, volume, (3, 3, 2), include=False)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.CreateDefaultDisplayNodes()  # as the module's showBox does
    box = Marker(roi)
    markers.attach(session, session.add_box(sf.ijk_to_ras(volume, (2, 2, 1)), sf.ijk_to_ras(volume, (10, 9, 1)),
                                            AXIAL), box)
    assert m1.visible and m2.visible and box.visible

    markers.undone(session, session.undo())  # the box
    markers.undone(session, session.undo())  # the exclude point
    assert not box.visible and not m2.visible and m1.visible
    markers.redone(session, session.redo())  # the exclude point is back on screen, as in the engine
    assert m2.visible and not box.visible

    # a new click ends the redo history: the box can never come back, so its ROI leaves the scene
    m3 = _click(session, markers, points, volume, (8, 7, 2))
    assert roi.GetScene() is None
    assert points.GetNumberOfControlPoints() == 3 and m1.visible and m2.visible and m3.visible
    # the point markers still name the right control points after their neighbours changed
    np.testing.assert_allclose(points.GetNthControlPointPositionWorld(points.GetNthControlPointIndexByID(m3.point_id)),
                               sf.ijk_to_ras(volume, (8, 7, 2)))


def test_an_undone_point_is_deleted_by_id_even_after_renumbering(model):
    scene, volume, session, points, markers = _setup(model)
    m1 = _click(session, markers, points, volume, (7, 6, 2))
    m2 = _click(session, markers, points, volume, (3, 3, 2))
    markers.undone(session, session.undo())
    # the user deletes the first control point by hand: the second one is renumbered 0
    points.RemoveNthControlPoint(0)
    assert not m1.alive and m2.alive
    _click(session, markers, points, volume, (8, 7, 2))  # ends the redo history of m2
    assert not m2.alive and points.GetNumberOfControlPoints() == 1
    np.testing.assert_allclose(points.GetNthControlPointPositionWorld(0), sf.ijk_to_ras(volume, (8, 7, 2)))


def test_prompts_too_old_to_undo_keep_their_markers_and_closing_removes_them(model, monkeypatch):
    import MedSAM2Lib.session

    monkeypatch.setattr(MedSAM2Lib.session, "MAX_UNDO", 1)
    scene, volume, session, points, markers = _setup(model)
    first = _click(session, markers, points, volume, (7, 6, 2))
    second = _click(session, markers, points, volume, (6, 5, 2))
    markers.undone(session, session.undo())  # the second click
    assert session.undo() is None  # the first fell off the undo history, but still steers the engine
    third = _click(session, markers, points, volume, (8, 7, 2))  # the second can no longer come back
    assert not second.alive
    assert first.alive and first.visible and third.visible  # ...while the first keeps its marker
    markers.forget_session(session)  # the module closed the session (segment or backend changed)
    assert points.GetNumberOfControlPoints() == 0


MARKUPS_2D = "vtkMRMLMarkupsDisplayableManager"


def _box_pixels(image) -> np.ndarray:
    """Pixels in the ROI outline's colour (Slicer's selected markups colour, (1, 0.5, 0.5)): red well
    above green and blue, which stay equal; the greyscale volume has none."""
    pixels = image.astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return (red - green >= 60) & (abs(green - blue) <= 8)


def test_a_box_marker_is_an_outline_on_its_slice_only_and_follows_undo(model, slice_view):
    """What the user sees of a box prompt in a slice view drawn by Slicer's markups displayable manager:
    the rectangle's outline where it was dragged, nothing inside it (the mask stays visible), no centre
    dot that would read as a point prompt, on its slice only; undo hides it, redo shows it again."""
    from MedSAM2Lib.markers import Marker
    from MedSAM2Lib.prompt_nodes import PromptNodes

    scene, volume, session, _, markers = _setup(model)
    view = slice_view(scene, displayable_managers=(sv.SEGMENTATIONS_2D, MARKUPS_2D))
    volume.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")  # the table exists now
    view.set_background(volume)
    corners = sf.ijk_to_ras(volume, (2, 2, 1)), sf.ijk_to_ras(volume, (10, 9, 1))
    view.jump_to(corners[0])
    assert not _box_pixels(view.capture()).any()

    roi = PromptNodes(scene).box(*corners, AXIAL)
    box = Marker(roi)
    markers.attach(session, session.add_box(*corners, AXIAL), box)
    shown = _box_pixels(view.capture())
    (top, left), (bottom, right) = sorted(view.ras_to_pixel(c) for c in corners)
    rows, cols = np.nonzero(shown)
    assert len(rows) > 2 * ((bottom - top) + (right - left)), "the whole outline is drawn"
    assert abs(rows.min() - top) <= 3 and abs(rows.max() - bottom) <= 3
    assert abs(cols.min() - left) <= 3 and abs(cols.max() - right) <= 3
    inside = shown[top + 4:bottom - 3, left + 4:right - 3]
    assert inside.size and not inside.any(), "no fill and no centre dot inside the outline"

    view.jump_to(sf.ijk_to_ras(volume, (2, 2, 2)))  # the next slice
    assert not _box_pixels(view.capture()).any()
    view.jump_to(corners[0])
    markers.undone(session, session.undo())
    assert not _box_pixels(view.capture()).any()
    markers.redone(session, session.redo())
    assert _box_pixels(view.capture()).sum() == shown.sum()
