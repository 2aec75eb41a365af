"""What a user sees: MedSAM2's writes drawn by Slicer's own slice view pipeline (slicer-core,
rendered offscreen, see slice_view.py), on slicerio's chest CT read by Slicer's readers.

The view watches a slice before anything is written there, as a user does; each check renders
again and counts the pixels tinted by the segment's colour, then maps every pixel back through
the slice node's XYToRAS and the volume's RASToIJK to the segment's voxels (read through
Slicer's own export), so the overlay must lie where the voxels are, not merely change.
"""

import warnings

import numpy as np
import pytest

import slice_view as sv
import slicer_fixtures as sf

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

GREEN = (0.0, 1.0, 0.0)  # a saturated colour: over the greyscale CT, only the overlay is tinted
SLICE = 17  # an axial slice through both lungs (slicerio's CTChest4: 128 x 128 x 34)
AROUND = 10  # half-size in pixels of the window counted around a prompted point


def _chest_scene(ct_path):
    scene = sf.new_scene()
    return scene, sf.load_volume_file(scene, ct_path)


@pytest.fixture()
def chest(ct_path):
    """Slicer's scene as after loading the CT and adding a segment: (scene, volume, segmentation, id)."""
    scene, volume = _chest_scene(ct_path)
    segmentation, (segment_id,) = sf.add_segmentation(scene, volume, ("MedSAM2",))
    segmentation.CreateDefaultDisplayNodes()  # as Segment Editor does for a new segmentation
    segmentation.GetSegmentation().GetSegment(segment_id).SetColor(*GREEN)
    return scene, volume, segmentation, segment_id


@pytest.fixture()
def reference_chest(ct_path, ct_segmentation_path):
    """The CT with slicerio's reference segmentation (seven segments sharing labelmap layers); only
    its right lung is shown, in green: (scene, volume, segmentation, id)."""
    scene, volume = _chest_scene(ct_path)
    segmentation = sf.load_segmentation_file(scene, ct_segmentation_path)
    segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("right lung")
    display = segmentation.GetDisplayNode()
    for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):
        other = segmentation.GetSegmentation().GetNthSegmentID(i)
        display.SetSegmentVisibility(other, other == segment_id)
    segmentation.GetSegmentation().GetSegment(segment_id).SetColor(*GREEN)
    return scene, volume, segmentation, segment_id


def _red(scene, volume, slice_view):
    view = slice_view(scene, "Red", "Axial")
    view.set_background(volume)
    return view


def _watch(view, volume, k):
    """Scroll the view to axial slice k and look at it (so the pipeline holds that picture)."""
    view.jump_to(sf.ijk_to_ras(volume, (0, 0, k)))
    return sv.overlay_mask(view.capture(), GREEN)


def _expected(view, scene_parts):
    scene, volume, segmentation, segment_id = scene_parts
    return sv.voxel_mask_on_view(view, volume, sf.segment_array(scene, segmentation, segment_id, volume))


def _assert_overlay_on_voxels(view, scene_parts, shown):
    expected = _expected(view, scene_parts)
    assert 100 < expected.sum() < expected.size, "a non-trivial segment on this slice, so the check means something"
    off = sv.disagreement_off_edges(shown, expected, edge_px=1)
    assert not off.any(), (f"the view shows {shown.sum()} overlay pixels where the segment's voxels project on "
                           f"{expected.sum()}; {off.sum()} differ away from the segment's edges")
    assert (shown != expected).sum() <= 0.02 * expected.sum(), "edges aside, the overlay is the segment"
    return expected


def _around(mask, pixel):
    r, c = pixel
    return int(mask[max(r - AROUND, 0):r + AROUND + 1, max(c - AROUND, 0):c + AROUND + 1].sum())


def _write_axial(scene_parts, k, kji_mask):
    """Write slice k of `kji_mask` through SegmentFrames, the path every engine result takes."""
    from MedSAM2Lib import VolumeGeometry
    from MedSAM2Lib.segment_io import SegmentFrames

    _, volume, segmentation, segment_id = scene_parts
    geometry = VolumeGeometry(volume)
    layout = geometry.layout(geometry.axis_for_normal((0.0, 0.0, 1.0)))
    return SegmentFrames(segmentation, segment_id, geometry).write(layout, {k: layout.frames(kji_mask)[k]})


def _reference_segment(scene, volume, ct_segmentation_path, name):
    reference = sf.load_segmentation_file(scene, ct_segmentation_path, name="reference")
    segment_id = reference.GetSegmentation().GetSegmentIdBySegmentName(name)
    mask = sf.segment_array(scene, reference, segment_id, volume)
    scene.RemoveNode(reference)
    return mask


def test_a_write_in_place_shows_on_the_watched_slice_where_its_voxels_are(chest, slice_view, ct_segmentation_path):
    """The reference right lung written into a new segment (in place, its own layer): the overlay
    covers the lung's voxels, on screen left (Slicer shows the patient's right on the left)."""
    scene, volume, segmentation, _ = chest
    view = _red(scene, volume, slice_view)
    assert not _watch(view, volume, SLICE).any()
    lung = _reference_segment(scene, volume, ct_segmentation_path, "right lung")
    layers = segmentation.GetSegmentation().GetNumberOfLayers()
    assert _write_axial(chest, SLICE, lung)

    image = view.capture()
    shown = sv.overlay_mask(image, GREEN)
    expected = _assert_overlay_on_voxels(view, chest, shown)
    assert np.ptp(image[shown][:, 0]) > 30, "the CT shows through the half-transparent fill, as in Slicer"
    assert np.nonzero(shown)[1].mean() < view.size[0] / 2 - 20, "the right lung is drawn on the left of the view"
    assert expected.sum() == 4 * lung[SLICE].sum()  # 2 x 2 pixels a voxel in this view
    assert segmentation.GetSegmentation().GetNumberOfLayers() == layers, "written in place"
    print(f"\nin place: {shown.sum()} overlay pixels, {expected.sum()} where the voxels project")


def test_a_write_through_slicers_logic_shows_on_the_watched_slice(reference_chest, slice_view):
    """The right lung segment of a shared layer rewritten with the left lung's shape on one slice:
    the left lung's voxels belong to another segment of the layer, so the write goes through
    Slicer's SetBinaryLabelmapToSegment (the segment moves to its own layer)."""
    scene, volume, segmentation, segment_id = reference_chest
    view = _red(scene, volume, slice_view)
    before = _watch(view, volume, SLICE)
    assert np.nonzero(before)[1].mean() < view.size[0] / 2 - 20, "the right lung is shown on the left"
    layers = segmentation.GetSegmentation().GetNumberOfLayers()
    left_lung_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("left lung")
    left_lung = sf.segment_array(scene, segmentation, left_lung_id, volume)
    assert _write_axial(reference_chest, SLICE, left_lung)

    shown = sv.overlay_mask(view.capture(), GREEN)
    _assert_overlay_on_voxels(view, reference_chest, shown)
    assert np.nonzero(shown)[1].mean() > view.size[0] / 2 + 20, "now the left lung's shape, on the right"
    assert segmentation.GetSegmentation().GetNumberOfLayers() == layers + 1, "written by Slicer's logic"
    print(f"\nthrough Slicer's logic: {before.sum()} overlay pixels before, {shown.sum()} after")


def test_prompt_propagation_undo_redo_show_on_the_watched_slice(chest, slice_view, model):
    from MedSAM2Lib import SegmentationSession

    scene, volume, segmentation, segment_id = chest
    view = _red(scene, volume, slice_view)
    session = SegmentationSession(volume, segmentation, segment_id, model)
    point = sf.ijk_to_ras(volume, (85, 60, SLICE))  # in the right lung
    pixel = view.ras_to_pixel(point)
    assert not _watch(view, volume, SLICE).any()

    session.add_point(point)
    after_prompt = sv.overlay_mask(view.capture(), GREEN)
    _assert_overlay_on_voxels(view, chest, after_prompt)
    assert _around(after_prompt, pixel) > 0, "the mask is drawn around the prompted point"

    other = SLICE + 2  # the user watches another slice while propagating
    assert not _watch(view, volume, other).any()
    session.propagate("forward", slice_range=(SLICE, SLICE + 3))
    after_propagation = sv.overlay_mask(view.capture(), GREEN)
    _assert_overlay_on_voxels(view, chest, after_propagation)

    session.undo()
    assert not sv.overlay_mask(view.capture(), GREEN).any(), "undo removes the propagated slice from the view"
    assert not _expected(view, chest).any()
    session.redo()
    after_redo = sv.overlay_mask(view.capture(), GREEN)
    np.testing.assert_array_equal(after_redo, after_propagation)

    # back on the prompted slice: undoing the prompt too clears it
    assert np.array_equal(_watch(view, volume, SLICE), after_prompt)
    session.undo()
    session.undo()
    assert not sv.overlay_mask(view.capture(), GREEN).any()
    print(f"\noverlay pixels: prompt {after_prompt.sum()} (around the point {_around(after_prompt, pixel)}), "
          f"propagation {after_propagation.sum()}, redo {after_redo.sum()}")


def test_the_3d_surface_follows_an_in_place_write(chest):
    """The 3D view shows the closed surface Slicer derives from the labelmap: it must be derived
    again after each write (the labelmap's Modified(), beside the segment's for the slice views)."""
    scene, volume, segmentation, segment_id = chest
    square = np.zeros(volume.GetImageData().GetDimensions()[::-1], dtype=bool)
    square[SLICE, 40:80, 40:80] = True
    _write_axial(chest, SLICE, square)
    segmentation.CreateClosedSurfaceRepresentation()  # as showing the segmentation in 3D does
    surface = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Closed surface")
    first = surface.GetNumberOfPoints()
    bigger = np.zeros_like(square)
    bigger[SLICE + 1:SLICE + 3, 20:100, 20:100] = True
    _write_axial(chest, SLICE + 1, bigger)
    _write_axial(chest, SLICE + 2, bigger)
    segmentation.CreateClosedSurfaceRepresentation()
    surface = segmentation.GetSegmentation().GetSegment(segment_id).GetRepresentation("Closed surface")
    assert first > 0 and surface.GetNumberOfPoints() > 2 * first
