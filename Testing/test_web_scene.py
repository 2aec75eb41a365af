"""The web shell's scene helpers on a real slicer-core scene: volumes read like the CLI reads them,
segments read back exactly (shared label layers included), and Save writes the file `medsam2
segment` would write (slicerio reads names, colours, geometry and voxels back)."""

import numpy as np
import pytest

import slicer_fixtures as sf



def test_a_loaded_volume_sits_where_simpleitk_puts_it(ct_path):
    import SimpleITK as sitk

    from MedSAM2Web import scene

    mrml = sf.new_scene()
    loaded = scene.load_volume(mrml, ct_path)
    image = sitk.ReadImage(str(ct_path))
    for ijk in ((0, 0, 0), (127, 5, 33), (40, 90, 17)):
        lps = image.TransformIndexToPhysicalPoint(ijk)
        ras = sf.ijk_to_ras(loaded.node, ijk)
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-6)
    assert loaded.name == "CTChest4"
    width, level = scene.window_level(loaded.node)
    low, high = np.percentile(sitk.GetArrayFromImage(image), scene.AUTO_PERCENTILES)
    assert np.isclose(level - width / 2, low) and np.isclose(level + width / 2, high)


def test_segment_masks_read_back_exactly_on_shared_and_separate_layers():
    from MedSAM2Lib.geometry import VolumeGeometry
    from MedSAM2Lib.segment_io import SegmentFrames
    from MedSAM2Web import scene

    mrml = sf.new_scene()
    volume = sf.add_volume(mrml, sf.blob_volume((6, 30, 40), (3, 15, 20), (2, 8, 9)), sf.matrix4(spacing=(2, 2, 5)))
    segmentation, (a, b) = sf.add_segmentation(mrml, volume)
    geometry = VolumeGeometry(volume)
    layout = geometry.layout(2)
    ma, mb = np.zeros(layout.frame_shape, bool), np.zeros(layout.frame_shape, bool)
    ma[2:10, 3:20], mb[15:25, 25:35] = True, True
    SegmentFrames(segmentation, a, geometry).write(layout, {3: ma})
    SegmentFrames(segmentation, b, geometry).write(layout, {2: mb})
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1  # both share one label layer
    for segment_id in (a, b):
        np.testing.assert_array_equal(scene.segment_mask(segmentation, segment_id, volume),
                                      sf.segment_array(mrml, segmentation, segment_id, volume))
    SegmentFrames(segmentation, b, geometry).write(layout, {3: ma | mb})  # overlaps a: b moves to its own layer
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 2
    for segment_id in (a, b):
        np.testing.assert_array_equal(scene.segment_mask(segmentation, segment_id, volume),
                                      sf.segment_array(mrml, segmentation, segment_id, volume))
    empty = scene.add_segment(segmentation)
    assert not scene.segment_mask(segmentation, empty, volume).any()


def test_save_writes_names_colours_geometry_and_voxels(tmp_path, ct_path):
    import slicerio

    from MedSAM2Web import scene

    mrml = sf.new_scene()
    loaded = scene.load_volume(mrml, ct_path)
    segmentation = scene.new_segmentation(mrml, loaded.node)
    first = scene.add_segment(segmentation)
    second = scene.add_segment(segmentation, "lesion", scene.parse_hex_color("#ff00ff"))
    scene.rename_segment(segmentation, first, "liver")
    scene.recolor_segment(segmentation, first, scene.parse_hex_color("#00ff00"))
    from MedSAM2Lib.geometry import VolumeGeometry
    from MedSAM2Lib.segment_io import SegmentFrames

    geometry = VolumeGeometry(loaded.node)
    layout = geometry.layout(2)
    mask = np.zeros(layout.frame_shape, bool)
    mask[30:60, 40:90] = True
    SegmentFrames(segmentation, second, geometry).write(layout, {12: mask, 13: mask})
    out = scene.save_segmentation(segmentation, loaded, tmp_path / "result.seg.nrrd")
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(seg["ijkToLPS"], loaded.volume.ijk_to_lps, atol=1e-6)
    names = {s["name"]: s for s in seg["segments"]}
    assert set(names) == {"liver", "lesion"}
    np.testing.assert_allclose(names["liver"]["color"], (0, 1, 0))
    np.testing.assert_allclose(names["lesion"]["color"], (1, 0, 1))
    saved = slicerio.extract_segments(seg, [("lesion", 1)])["voxels"].transpose(2, 1, 0) > 0  # -> (k, j, i)
    np.testing.assert_array_equal(saved, sf.segment_array(mrml, segmentation, second, loaded.node))
    assert saved.sum() == 2 * mask.sum()


def test_colours_and_names_are_checked():
    from medsam2.errors import InputError
    from MedSAM2Web import scene

    assert scene.hex_color(scene.parse_hex_color("#1a2B3c")) == "#1a2b3c"
    assert scene.parse_hex_color("#ff000080") == (1.0, 0.0, 0.0)  # a picker's alpha is dropped
    for bad in ("red", "#12345", "#gg0000"):
        with pytest.raises(InputError, match="not #rrggbb"):
            scene.parse_hex_color(bad)
    mrml = sf.new_scene()
    volume = sf.add_volume(mrml, sf.blob_volume((3, 8, 8), (1, 4, 4), (1, 2, 2)), sf.matrix4())
    segmentation = scene.new_segmentation(mrml, volume)
    segment_id = scene.add_segment(segmentation)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == "Segment_1"
    with pytest.raises(InputError, match="cannot be empty"):
        scene.rename_segment(segmentation, segment_id, "  ")
    scene.remove_segment(segmentation, segment_id)
    with pytest.raises(InputError, match="no segment"):
        scene.remove_segment(segmentation, segment_id)


def test_a_dicom_series_folder_opens_where_the_scanner_put_it(tmp_path, ct_path):
    import SimpleITK as sitk
    from test_cli_segment import _write_dicom_series

    from MedSAM2Web import scene

    slab = sitk.ReadImage(str(ct_path))[16:112, 24:104, 14:18]
    _write_dicom_series(slab, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.77")
    loaded = scene.load_volume(sf.new_scene(), tmp_path / "dicom")
    assert loaded.node.GetImageData().GetDimensions() == slab.GetSize()
    lps = slab.TransformIndexToPhysicalPoint((5, 7, 3))
    np.testing.assert_allclose(sf.ijk_to_ras(loaded.node, (5, 7, 3)), (-lps[0], -lps[1], lps[2]), atol=1e-3)
