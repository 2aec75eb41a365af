"""Scoring: Dice and HD95 against hand-computed values, the simulated user, and `medsam2 evaluate`
end to end on slicerio's chest CT and its segmentation with a random checkpoint."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

import medsam2
from medsam2.study import evaluate as ev
from medsam2.cli import main as cli_main


# -- Dice -------------------------------------------------------------------------------------------
def test_dice_by_hand():
    pred = np.zeros((5, 5), bool)
    pred[0:2, 0:2] = True          # 4 pixels
    ref = np.zeros((5, 5), bool)
    ref[0:2, 1:4] = True           # 6 pixels, 2 shared with pred
    assert ev.dice(pred, ref) == pytest.approx(2 * 2 / (4 + 6))  # 0.4
    assert ev.dice(ref, ref) == 1.0
    empty = np.zeros((5, 5), bool)
    assert ev.dice(empty, empty) == 1.0   # nothing to find, nothing found
    assert ev.dice(pred, empty) == 0.0
    assert ev.dice(empty, ref) == 0.0
    with pytest.raises(medsam2.InputError, match="does not match"):
        ev.dice(pred, np.zeros((4, 5), bool))


# -- surfaces and HD95 ------------------------------------------------------------------------------
def test_surface_is_the_voxels_touching_the_outside():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    assert ev.surface(cube).sum() == 26            # all but the centre voxel
    assert not ev.surface(cube)[2, 2, 2]
    full = np.ones((3, 3), bool)                   # the array border counts as outside
    assert ev.surface(full).sum() == 8


def test_hd95_of_two_voxels_is_their_distance_in_mm():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, 0, 0] = True
    b[1, 2, 2] = True
    # spacing per array axis (k, j, i): offsets (1, 2, 2) voxels = (3, 2, 4) mm
    assert ev.hd95(a, b, spacing=(3.0, 1.0, 2.0)) == pytest.approx(math.sqrt(9 + 4 + 16))


def test_hd95_interpolates_the_95th_percentile_and_ignores_a_lone_outlier():
    ref = np.zeros((11, 10), bool)
    ref[0, :] = True                  # a one-pixel-thick line: 10 surface pixels
    pred = ref.copy()
    pred[10, 0] = True                # plus one pixel 10 rows away
    # pred -> ref: ten 0 mm and one 10 rows x 2 mm = 20 mm; the 95th percentile of 11 sorted values
    # sits at position 0.95 * 10 = 9.5, halfway between 0 and 20 -> 10 mm. ref -> pred: all 0.
    assert ev.hd95(pred, ref, spacing=(2.0, 1.0)) == pytest.approx(10.0)
    # the plain Hausdorff distance would be 20 mm
    assert ev.surface_distances(pred, ref, (2.0, 1.0)).max() == pytest.approx(20.0)


def test_hd95_of_shifted_squares_with_anisotropic_pixels():
    a = np.zeros((8, 8), bool)
    a[2:5, 2:5] = True
    b = np.zeros((8, 8), bool)
    b[2:5, 3:6] = True                # shifted one column; columns are 2 mm, rows 1 mm
    # a's 8 surface pixels to b's surface: 2 mm at the three left pixels (one column), 1 mm at the
    # middle right pixel (3, 4) (b's (2, 4) one row up), 0 elsewhere -> sorted [0,0,0,0,1,2,2,2];
    # the 95th percentile at position 6.65 is 2. Symmetric the other way.
    assert sorted(ev.surface_distances(a, b, (1.0, 2.0))) == pytest.approx([0, 0, 0, 0, 1, 2, 2, 2])
    assert ev.hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(2.0)
    assert ev.hd95(a, b) == pytest.approx(1.0)  # unit spacing by default


def test_hd95_of_empty_masks():
    empty = np.zeros((4, 4, 4), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert ev.hd95(empty, empty) == 0.0
    assert ev.hd95(one, empty) == math.inf
    assert ev.hd95(empty, one) == math.inf
    with pytest.raises(medsam2.InputError, match="spacing"):
        ev.hd95(one, one, spacing=(1.0, 1.0))


# -- the simulated user -----------------------------------------------------------------------------
def test_first_prompt_is_on_the_middle_slice_of_the_label():
    ref = np.zeros((10, 12, 12), bool)
    ref[2:6, 1:6, 2:7] = True            # slices 2, 3, 4, 5: the median index 2 of them is slice 4
    ref[4, 8, 9] = True                  # a stray pixel widens slice 4's box
    box = ev.reference_prompt(ref, "box")
    assert box == {"frame": 4, "box": [2.0, 1.0, 9.0, 8.0]}
    ref[4, 8, 9] = False
    click = ev.reference_prompt(ref, "click")
    # the 5 x 5 square's centre: row 3, column 4
    assert click == {"frame": 4, "points": [[4.0, 3.0]], "labels": [1]}
    with pytest.raises(medsam2.InputError, match="empty"):
        ev.reference_prompt(np.zeros((3, 4, 4), bool))
    with pytest.raises(medsam2.InputError, match="prompt kind"):
        ev.reference_prompt(ref, "scribble")


def test_correction_clicks_the_worst_slice_where_most_went_wrong():
    ref = np.zeros((4, 10, 10), bool)
    ref[:, 1:8, 1:8] = True
    pred = ref.copy()
    pred[1, 1:8, 1] = False              # slice 1: 7 pixels missed
    pred[2, 2:5, 2:5] = False            # slice 2: a 3 x 3 hole, 9 pixels missed -> the worst
    click = ev.correction_click(pred, ref)
    # an include click at the hole's centre (x=3, y=3), the missed pixel farthest from the rest
    assert click == {"frame": 2, "points": [[3.0, 3.0]], "labels": [1]}

    pred = ref.copy()
    pred[3, 0:10, 8:10] = True           # slice 3: 20 pixels wrongly added
    click = ev.correction_click(pred, ref)
    assert click["frame"] == 3 and click["labels"] == [0]
    x, y = click["points"][0]
    assert pred[3, int(y), int(x)] and not ref[3, int(y), int(x)]
    assert ev.correction_click(ref, ref) is None


def test_interactions_count_clicks_and_boxes():
    assert ev.prompt_interactions({"box": [0, 0, 1, 1]}) == 1
    assert ev.prompt_interactions({"points": [[1, 1], [2, 2]], "labels": [1, 0]}) == 2
    assert ev.prompt_interactions({"points": np.array([[1.0, 1.0]]), "labels": [1], "box": [0, 0, 3, 3]}) == 2


# -- engine and CLI end to end ----------------------------------------------------------------------
def _reference(seg_path, name):
    import slicerio

    seg = slicerio.read_segmentation(str(seg_path))
    return slicerio.segment_mask(seg, name).transpose(2, 1, 0)  # (i, j, k) -> (k, j, i)


def test_evaluate_on_the_chest_ct_and_its_segmentation(tmp_path, random_checkpoint, ct_path, ct_segmentation_path):
    out = tmp_path / "pred.seg.nrrd"  # keeps overlapping predictions (a label map would not)
    report = tmp_path / "scores.json"
    code = cli_main(["evaluate", str(ct_path), str(ct_segmentation_path), "--labels", "right lung", "3",
                     "--model", "sam2.1_hiera_tiny", "--checkpoint", str(random_checkpoint), "--device", "cpu",
                     "--image-size", "256", "--output", str(out), "--json", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["settings"]["random_weights"] is True
    (case,) = data["cases"]
    objects = case["objects"]
    assert [(o["label"], o["name"]) for o in objects] == [(5, "right lung"), (3, "thoracic vertebral column")]
    # the scores describe the prediction written on the CT's geometry
    import slicerio

    image = sitk.ReadImage(str(ct_path))
    written = slicerio.read_segmentation(str(out))
    assert np.allclose(written["ijkToLPS"], slicerio.read_segmentation(str(ct_segmentation_path))["ijkToLPS"])
    spacing = image.GetSpacing()[::-1]
    for o in objects:
        ref = _reference(ct_segmentation_path, o["name"])
        pred = _reference(out, o["name"])
        assert pred.shape == ref.shape == sitk.GetArrayFromImage(image).shape
        assert o["reference_voxels"] == int(ref.sum()) and o["predicted_voxels"] == int(pred.sum())
        assert o["interactions"] == 1                  # one box, no corrections
        assert o["dice"] == pytest.approx(ev.dice(pred, ref))
        hd = ev.hd95(pred, ref, spacing)
        assert (o["hd95_mm"] is None and hd == math.inf) or o["hd95_mm"] == pytest.approx(hd)
        assert 0.0 <= o["dice"] <= 1.0
        assert 0 <= o["flagged_slices"] <= ref.shape[0]
        assert {o["review_recall_at_5"] * 5, o["review_recall_at_10"] * 10} <= set(range(11))


def _write_case(folder, name, array, labels, spacing=(0.8, 0.8, 2.5), label_name=None):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(folder / "images" / f"{name}.nrrd"))
    lab = sitk.GetImageFromArray(labels.astype(np.uint8))
    lab.CopyInformation(image)
    sitk.WriteImage(lab, str(folder / "labels" / f"{label_name or name}.nii.gz"))


def test_folders_of_cases_with_corrections_give_a_table(tmp_path, random_checkpoint, ct_volume, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "out").mkdir()
    lab = np.zeros((5, 12, 14), np.uint8)
    lab[1:4, 3:9, 4:10] = 2
    _write_case(tmp_path, "a", np.ascontiguousarray(ct_volume[14:19, 50:62, 50:64]), lab)
    # nnU-Net naming: image b_0000 goes with label b
    _write_case(tmp_path, "b_0000", np.ascontiguousarray(ct_volume[20:25, 60:72, 40:54]), lab, label_name="b")
    report = tmp_path / "scores.json"
    code = cli_main(["evaluate", str(tmp_path / "images"), str(tmp_path / "labels"), "--corrections", "1",
                     "--prompt-kind", "click", "--model", "sam2.1_hiera_tiny",
                     "--checkpoint", str(random_checkpoint), "--device", "cpu", "--image-size", "256",
                     "--output", str(tmp_path / "out"), "--json", str(report)])
    assert code == 0
    table = capsys.readouterr().out
    assert "case" in table and "hd95_mm" in table and "mean" in table
    data = json.loads(report.read_text())
    assert [c["case"] for c in data["cases"]] == ["a", "b_0000"]
    for case in data["cases"]:
        (obj,) = case["objects"]
        assert obj["label"] == 2 and obj["reference_voxels"] == 3 * 6 * 6
        # a first click and one correction (random weights are never perfect)
        assert obj["interactions"] == 2
        assert (tmp_path / "out" / f"{case['case']}.seg.nrrd").exists()


def test_fused_evaluation_counts_corrections(model, ct_volume):
    volume = np.ascontiguousarray(ct_volume[14:18, 50:58, 50:58])
    ref = np.zeros(volume.shape, bool)
    ref[1:3, 2:6, 2:6] = True
    score, pred = ev.evaluate_object(model, volume, ref, label=7, axes="all", corrections=1)
    assert pred.shape == volume.shape and pred.dtype == bool
    assert score.interactions == 2
    assert score.prompts[0]["frame"] == 2 and "box" in score.prompts[0]
    assert score.dice == pytest.approx(ev.dice(pred, ref))


def test_a_cropped_reference_is_placed_on_the_image_grid(tmp_path):
    from medsam2.cli.evaluate import read_reference
    from medsam2.io.volume_io import read_volume

    image = sitk.GetImageFromArray(np.zeros((6, 10, 12), np.int16))
    image.SetSpacing((0.5, 0.5, 2.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    crop = np.zeros((2, 3, 4), np.uint8)
    crop[1, 2, 3] = 4
    lab = sitk.GetImageFromArray(crop)
    lab.SetSpacing((0.5, 0.5, 2.0))
    # starts at voxel (i=5, j=2, k=3) of the image
    lab.SetOrigin((10.0 + 5 * 0.5, 20.0 + 2 * 0.5, 30.0 + 3 * 2.0))
    sitk.WriteImage(lab, str(tmp_path / "lab.nii.gz"))
    ((value, name, mask),) = read_reference(str(tmp_path / "lab.nii.gz"), read_volume(str(tmp_path / "img.nrrd")))
    assert (value, name) == (4, "label 4")
    assert mask.shape == (6, 10, 12)
    assert np.argwhere(mask).tolist() == [[3 + 1, 2 + 2, 5 + 3]]


def test_evaluate_says_what_is_wrong_before_loading_a_model(tmp_path, ct_path, ct_segmentation_path, capsys):
    code = cli_main(["evaluate", str(ct_path), str(ct_segmentation_path), "--labels", "spleen",
                     "--checkpoint", str(tmp_path / "none.pt")])
    assert code == 1 and "no such file" in capsys.readouterr().err
    code = cli_main(["evaluate", str(ct_path), str(ct_segmentation_path), "--labels", "spleen"])
    err = capsys.readouterr().err
    assert code == 1 and "no object 'spleen'" in err and "5 (right lung)" in err
    code = cli_main(["evaluate", str(ct_path), str(tmp_path)])
    assert code == 1 and "IMAGE must be a folder too" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["label map", "seg.nrrd"])
def test_labels_that_do_not_overlap_the_image_say_so_and_where_each_lies(tmp_path, ct_path, ct_segmentation_path,
                                                                          capsys, kind):
    """A reference exported without its geometry (or of another scan) is not "empty": it is elsewhere."""
    import slicerio

    if kind == "label map":
        labels = sitk.GetImageFromArray(np.ones((4, 8, 8), np.uint8))  # origin 0, spacing 1: lost geometry
        path = tmp_path / "labels.nii.gz"
        sitk.WriteImage(labels, str(path))
        where = "the labelled voxels at x -0.5..7.5, y -0.5..7.5, z -0.5..3.5 mm (LPS)"
    else:  # slicerio's lungs moved 1 m towards the feet
        seg = slicerio.read_segmentation(str(ct_segmentation_path))
        seg["ijkToLPS"] = np.asarray(seg["ijkToLPS"], float) + np.array([[0, 0, 0, 0]] * 2 + [[0, 0, 0, -1000]] + [[0] * 4])
        path = tmp_path / "moved.seg.nrrd"
        slicerio.write_segmentation(str(path), seg)
        where = "the labelled voxels at x -186.2..194.6, y -138.6..150.9, z -1345.2..-1005.3 mm (LPS)"
    code = cli_main(["evaluate", str(ct_path), str(path)])  # refused before any model loads or downloads
    err = capsys.readouterr().err
    assert code == 1 and "holds no labelled object" not in err
    assert f"LABEL {path} does not overlap IMAGE {ct_path}" in err
    assert "the image lies at x -195.4..194.6, y -172.1..217.9, z -345.2..-5.3 mm (LPS)" in err and where in err


def _rows(confidences, flagged=()):
    return [{"frame": f, "confidence": c, "flagged": f in flagged} for f, c in enumerate(confidences)]


def test_the_review_ranks_flagged_slices_first_then_by_confidence():
    rows = _rows([0.9, 0.2, 0.8, 0.5], flagged={2})
    assert ev.review_ranking(rows) == [2, 1, 3, 0]


def test_review_recall_counts_the_worst_slices_the_review_found():
    dices = np.array([1.0, 0.1, 0.9, 0.2, 0.95, 0.3])
    # worst 2: slices 1 and 3; the review ranks 1 first (lowest confidence) and flags 5
    rows = _rows([0.9, 0.1, 0.9, 0.8, 0.9, 0.9], flagged={5})
    assert ev.review_recall(rows, dices, 2) == 0.5
    assert ev.review_recall(_rows([0.9] * 6, flagged={1, 3}), dices, 2) == 1.0
    assert ev.review_recall(rows, dices, 10) == 1.0  # k capped at the 6 reviewed slices
    assert ev.review_recall([], dices, 5) == 1.0


def test_slice_dice_is_per_slice():
    ref = np.zeros((3, 4, 4), bool)
    ref[1, :2] = True
    pred = ref.copy()
    pred[2, 0, 0] = True
    assert list(ev.slice_dice(pred, ref)) == [1.0, 1.0, 0.0]
