"""`medsam2 segment` and its file I/O, on slicerio's chest CT and files a user would open.

Outputs are read back with slicerio / SimpleITK / the source image's own header, never with the
code under test. Engine runs use a random-weight checkpoint at 256 px, so masks are meaningless but
deterministic: the CLI's mask on a prompted slice must equal the engine's own answer for the same
prompt, which pins down frame, orientation and pixel order.
"""

import json
import locale
import os

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsam2 import cli
from medsam2.errors import InputError
from medsam2.io.volume_io import palette_color, read_volume, write_labelmap, write_segmentation


def _geometry(image):
    return (image.GetSize(), np.array(image.GetOrigin()), np.array(image.GetSpacing()), np.array(image.GetDirection()))


def _assert_same_geometry(a, b, atol=1e-6):
    size_a, origin_a, spacing_a, dir_a = _geometry(a)
    size_b, origin_b, spacing_b, dir_b = _geometry(b)
    assert size_a == size_b
    np.testing.assert_allclose(origin_a, origin_b, atol=atol)
    np.testing.assert_allclose(spacing_a, spacing_b, atol=atol)
    np.testing.assert_allclose(dir_a, dir_b, atol=atol)


def _ijk_to_lps(image):
    m = np.eye(4)
    m[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


@pytest.fixture(scope="module")
def chest_masks(ct_segmentation_path):
    """Right and left lung from slicerio's segmentation, as (k, j, i) bool arrays."""
    seg = slicerio.read_segmentation(str(ct_segmentation_path))
    return {name: slicerio.segment_mask(seg, name).transpose(2, 1, 0) for name in ("right lung", "left lung", "tissue")}


# --- writing -------------------------------------------------------------------------------------

def test_seg_nrrd_reads_back_in_slicerio_with_geometry_names_colours_and_overlaps(tmp_path, ct_path, chest_masks):
    volume = read_volume(ct_path)
    lungs = chest_masks["right lung"] | chest_masks["left lung"]
    segments = [  # "both lungs" overlaps the other two: Slicer keeps overlapping segments in layers
        {"name": "right lung", "color": None, "mask": chest_masks["right lung"]},
        {"name": "left lung", "color": (0.1, 0.2, 0.9), "mask": chest_masks["left lung"]},
        {"name": "both lungs", "mask": lungs},
    ]
    out = write_segmentation(tmp_path / "lungs.seg.nrrd", segments, volume)
    seg = slicerio.read_segmentation(str(out))
    np.testing.assert_allclose(seg["ijkToLPS"], _ijk_to_lps(sitk.ReadImage(str(ct_path))), atol=1e-9)
    assert seg["voxels"].shape[-3:] == (128, 128, 34)
    assert slicerio.segment_names(seg) == ["right lung", "left lung", "both lungs"]
    colours = [s["color"] for s in seg["segments"]]
    np.testing.assert_allclose(colours, [palette_color(0), (0.1, 0.2, 0.9), palette_color(2)], atol=1e-6)
    for entry in segments:
        np.testing.assert_array_equal(slicerio.segment_mask(seg, entry["name"]), entry["mask"].transpose(2, 1, 0))
    assert not [p for p in os.listdir(tmp_path) if p != "lungs.seg.nrrd"]  # no temporary left behind


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd", "labels.mha"])
def test_label_map_reads_back_in_simpleitk_on_the_same_geometry(tmp_path, ct_path, chest_masks, name):
    volume = read_volume(ct_path)
    labels = np.zeros(volume.array.shape, np.uint16)
    labels[chest_masks["right lung"]] = 1
    labels[chest_masks["left lung"]] = 300  # above uint8: written as uint16
    write_labelmap(tmp_path / name, labels, volume)
    back = sitk.ReadImage(str(tmp_path / name))
    _assert_same_geometry(back, sitk.ReadImage(str(ct_path)), atol=1e-5)  # NIfTI stores float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels)


def test_writers_never_replace_an_existing_file_unless_asked(tmp_path, ct_path, chest_masks):
    volume = read_volume(ct_path)
    labels = chest_masks["right lung"].astype(np.uint8)
    for name in ("mine.nii.gz", "mine.seg.nrrd"):
        target = tmp_path / name
        target.write_bytes(b"the user's own file")
        with pytest.raises(InputError, match="already exists.*--overwrite"):
            if name.endswith(".seg.nrrd"):
                write_segmentation(target, [{"name": "a", "mask": labels > 0}], volume)
            else:
                write_labelmap(target, labels, volume)
        assert target.read_bytes() == b"the user's own file"
    write_labelmap(tmp_path / "mine.nii.gz", labels, volume, overwrite=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mine.nii.gz"))), labels)
    assert sorted(os.listdir(tmp_path)) == ["mine.nii.gz", "mine.seg.nrrd"]


@pytest.mark.parametrize("name, message", [
    ("out.png", "unknown output type"),
    ("no/such/folder/out.nii.gz", "does not exist"),
])
def test_bad_output_paths_are_refused(tmp_path, ct_path, name, message):
    with pytest.raises(InputError, match=message):
        write_labelmap(tmp_path / name, np.zeros((34, 128, 128), np.uint8), read_volume(ct_path))


# --- reading -------------------------------------------------------------------------------------

def _write_dicom_series(image, folder, series_uid, prefix="slice"):
    """One DICOM file per slice with the tags a scanner writes for geometry (SimpleITK's recipe)."""
    folder.mkdir(parents=True, exist_ok=True)
    saved_locale = locale.setlocale(locale.LC_ALL)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    for z in range(image.GetDepth()):
        s = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {
            "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0010|0010": "Test^Phantom",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1", "0020|000e": series_uid,
            "0008|103e": "medsam2 test", "0020|0037": orientation,
            "0020|0032": "\\".join(str(v) for v in position), "0020|0013": str(z + 1),
            "0018|0050": str(image.GetSpacing()[2]),
            "0008|0018": f"{series_uid}.{z + 1}",
        }
        for key, value in tags.items():
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{z:03d}.dcm"))
        writer.Execute(s)
    # GDCM's writer leaves the process in the C locale (ASCII text encoding), which would leak
    # into later tests; our reader does not do this (tested below)
    locale.setlocale(locale.LC_ALL, saved_locale)


@pytest.fixture(scope="module")
def chest_slab(ct_path):
    """Slices 14..19 of the chest CT, in-plane cropped: a small real scan with CTChest4's direction."""
    return sitk.ReadImage(str(ct_path))[16:112, 24:104, 14:20]


def test_dicom_series_folder_reads_with_its_geometry(tmp_path, chest_slab):
    _write_dicom_series(chest_slab, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.2")
    volume = read_volume(tmp_path / "dicom")
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(chest_slab))
    np.testing.assert_allclose(volume.origin, chest_slab.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, chest_slab.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, chest_slab.GetDirection(), atol=1e-6)


def test_reading_dicom_keeps_the_process_locale(tmp_path, chest_slab):
    # a reader that left the C locale behind would turn Python's text encoding ASCII for the rest of
    # the process (torch.compile, for one, then fails to read its UTF-8 kernel templates)
    _write_dicom_series(chest_slab, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.5")
    before = locale.setlocale(locale.LC_ALL)
    read_volume(tmp_path / "dicom")
    assert locale.setlocale(locale.LC_ALL) == before


def test_folder_with_two_series_asks_which(tmp_path, chest_slab):
    uids = ["1.2.826.0.1.3680043.2.1125.1.3", "1.2.826.0.1.3680043.2.1125.1.4"]
    _write_dicom_series(chest_slab, tmp_path / "dicom", uids[0])
    _write_dicom_series(chest_slab[:, :, :3], tmp_path / "dicom", uids[1], prefix="other")
    with pytest.raises(InputError, match=r"holds 2 DICOM series.*--series"):
        read_volume(tmp_path / "dicom")
    assert read_volume(tmp_path / "dicom", series=uids[1]).array.shape == (3, 80, 96)


def test_unreadable_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.nrrd").write_text("not an image")
    with pytest.raises(InputError, match="cannot read this file"):
        read_volume(tmp_path / "notes.nrrd")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([8, 8, 4], sitk.sitkVectorUInt8, 3), str(tmp_path / "rgb.nrrd"))
    with pytest.raises(InputError, match="3 components"):
        read_volume(tmp_path / "rgb.nrrd")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="without any DICOM series"):
        read_volume(tmp_path / "empty")


# --- the CLI end to end --------------------------------------------------------------------------

def _engine_args(random_checkpoint):
    return ["--model", "sam2.1_hiera_tiny", "--checkpoint", str(random_checkpoint), "--image-size", "256",
            "--device", "cpu"]


def _lung_prompt(mask_kji, k):
    """A user's prompt on slice k: the lung's box and one include point at its centre, in ijk."""
    jj, ii = np.nonzero(mask_kji[k])
    centre = [float(ii.mean()), float(jj.mean()), float(k)]
    return {"points": [{"position": centre, "label": 1}],
            "boxes": [{"min": [int(ii.min()), int(jj.min()), k], "max": [int(ii.max()), int(jj.max()), k]}]}


def test_cli_segments_the_chest_ct_into_a_seg_nrrd_slicer_reads(tmp_path, ct_path, chest_masks, random_checkpoint,
                                                                 model, capsys):
    k = 17
    image = sitk.ReadImage(str(ct_path))
    # prompts in RAS, as a user copies them from Slicer
    objects = []
    for name in ("right lung", "left lung"):
        prompt = _lung_prompt(chest_masks[name], k)
        to_ras = lambda q: list(np.array(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in q]))  # noqa: E731
                                * (-1, -1, 1))
        objects.append({"name": name,
                        "points": [{"position": to_ras(p["position"]), "label": 1} for p in prompt["points"]],
                        "boxes": [{"min": to_ras(b["min"]), "max": to_ras(b["max"])} for b in prompt["boxes"]]})
    prompts = tmp_path / "lungs.json"
    prompts.write_text(json.dumps({"coordinates": "ras", "objects": objects}))
    out = tmp_path / "lungs.seg.nrrd"

    rc = cli.main(["segment", str(ct_path), "--prompts", str(prompts), "--output", str(out),
                   *_engine_args(random_checkpoint)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "RANDOM WEIGHTS" in captured.err

    seg = slicerio.read_segmentation(str(out))
    header = slicerio.read_volume(str(ct_path), skip_voxels=True)  # the input's own header, not our reader
    np.testing.assert_allclose(seg["ijkToLPS"], header["ijkToLPS"], atol=1e-9)
    assert seg["voxels"].shape[-3:] == tuple(image.GetSize())
    assert slicerio.segment_names(seg) == ["right lung", "left lung"]
    np.testing.assert_allclose([s["color"] for s in seg["segments"]], [palette_color(0), palette_color(1)], atol=1e-6)

    # the engine's own answer on the prompted slice, frame k, pixel (x = i, y = j)
    session = model.open(sitk.GetArrayFromImage(image))
    for obj_id, name in enumerate(("right lung", "left lung"), start=1):
        prompt = _lung_prompt(chest_masks[name], k)
        box = prompt["boxes"][0]
        expected = session.add_prompt(k, obj_id=obj_id, points=[prompt["points"][0]["position"][:2]], labels=[1],
                                      box=[box["min"][0], box["min"][1], box["max"][0], box["max"][1]])
        got = slicerio.segment_mask(seg, name)  # (i, j, k)
        assert 0 < expected.sum() < expected.size and not np.array_equal(expected, expected.T)  # a telling mask
        np.testing.assert_array_equal(got[:, :, k].T, expected)
        assert got.sum(axis=(0, 1)).astype(bool).sum() > 1  # propagated beyond the prompted slice


def test_cli_propagates_along_rows_from_slicer_markups_into_a_nifti_label_map(tmp_path, ct_path, random_checkpoint,
                                                                              model, capsys):
    """--axis 1 (frames along j), prompts as Slicer point list + ROI in LPS, output .nii.gz."""
    chest_slab = sitk.ReadImage(str(ct_path))[16:112, 40:52, 10:24]  # 12 rows along j: 12 frames of 14 x 96
    slab_path = tmp_path / "slab.nrrd"
    sitk.WriteImage(chest_slab, str(slab_path))
    slab = sitk.GetArrayFromImage(chest_slab)  # (k=14, j=12, i=96)
    j = 6
    # include point and a box (a thin ROI across j) on row j of the slab, in LPS mm
    point_ijk = (30.0, j, 7.0)
    lps = lambda q: list(chest_slab.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in q)))  # noqa: E731
    roi_centre = (40.0, j, 7.5)
    spacing = chest_slab.GetSpacing()
    markups = {"markups": [
        {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
            {"label": "F-1", "position": lps(point_ijk), "positionStatus": "defined"}]},
        {"type": "ROI", "coordinateSystem": "LPS", "center": lps(roi_centre),
         "size": [50 * spacing[0], 0.5 * spacing[1], 5 * spacing[2]],
         "orientation": list(np.array(chest_slab.GetDirection()))}]}
    prompts = tmp_path / "lesion.mrk.json"
    prompts.write_text(json.dumps(markups))
    out = tmp_path / "lesion.nii.gz"
    out.write_bytes(b"old result")

    args = ["segment", str(slab_path), "--prompts", str(prompts), "--output", str(out), "--axis", "1",
            *_engine_args(random_checkpoint)]
    assert cli.main(args) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"old result"
    assert cli.main(args + ["--overwrite"]) == 0, capsys.readouterr().err

    back = sitk.ReadImage(str(out))
    _assert_same_geometry(back, chest_slab, atol=1e-5)
    labels = sitk.GetArrayFromImage(back)  # (k, j, i)
    assert set(np.unique(labels)) <= {0, 1}

    # engine reference: frames along j are (k rows, i cols); point (x=i, y=k); the ROI's box on its centre row
    session = model.open(np.transpose(slab, (1, 0, 2)))
    box = [40.0 - 25, 7.5 - 2.5, 40.0 + 25, 7.5 + 2.5]  # the ROI's i and k extents
    expected = session.add_prompt(j, obj_id=1, points=[[point_ijk[0], point_ijk[2]]], labels=[1], box=box)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(labels[:, j, :] == 1, expected)


def test_cli_reads_a_dicom_folder_and_writes_on_its_geometry(tmp_path, chest_slab, random_checkpoint):
    _write_dicom_series(chest_slab, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.1.5")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinates": "ijk", "objects": [
        {"id": 7, "name": "spine", "points": [{"position": [48, 60, 3]}, {"position": [20, 20, 3], "label": 0}]}]}))
    out = tmp_path / "spine.seg.nrrd"
    assert cli.main(["segment", str(tmp_path / "dicom"), "--prompts", str(prompts), "--output", str(out),
                     *_engine_args(random_checkpoint)]) == 0
    seg = slicerio.read_segmentation(str(out))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    np.testing.assert_allclose(seg["ijkToLPS"], _ijk_to_lps(reader.Execute()), atol=1e-9)
    assert slicerio.segment_names(seg) == ["spine"]
    assert slicerio.segment_mask(seg, "spine").any()


def test_cli_reports_a_prompt_outside_the_image_before_loading_a_model(tmp_path, ct_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinates": "ijk", "objects": [{"name": "liver", "points": [
        {"position": [64, 64, 40]}]}]}))
    # no checkpoint exists: reaching the model would fail differently
    rc = cli.main(["segment", str(ct_path), "--prompts", str(prompts), "--output", str(tmp_path / "o.seg.nrrd"),
                   "--model", "sam2.1_hiera_tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "index k = 40.00" in err and "34 voxels along k" in err
    assert not (tmp_path / "o.seg.nrrd").exists()
