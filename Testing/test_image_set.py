"""One-prompt sessions on sets of unrelated 2D images of different sizes, and `medsam2 one-prompt`."""

import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

import medsam2
from medsam2.cli import main as cli_main
from medsam2.tracking.image_set import GREY_WEIGHTS


@pytest.fixture()
def image_set(ct_volume):
    """Four CT slices cut to four different sizes (one not square, one 40 x 100)."""
    return [ct_volume[5, :64, :96], ct_volume[15], ct_volume[25, 10:50, 20:120], ct_volume[30, :80, 16:]]


def test_images_of_different_sizes_each_get_a_mask_of_their_own_size(model, image_set):
    s = model.open_images(image_set)
    assert s.image_shapes == [(64, 96), (128, 128), (40, 100), (80, 112)]
    first = s.add_prompt(1, points=[[64, 64]], labels=[1])
    assert first.shape == (128, 128) and first.dtype == bool
    seen = []
    for frame, masks in s.propagate():
        seen.append(frame)
        assert masks[1].shape == image_set[frame].shape
    # the documented order: forward from the prompted image to the last, then back to image 0
    # (the prompted image is tracked again by the backward pass and yielded then, once)
    assert seen == [2, 3, 1, 0]
    per_image = s.mask(1)
    assert [m.shape for m in per_image] == s.image_shapes
    assert np.array_equal(per_image[1], first)
    labels = s.masks()
    assert all(np.array_equal(l == 1, m) for l, m in zip(labels, per_image))
    assert all(np.array_equal(s.frame_masks(i)[1], per_image[i]) for i in range(4))


def test_a_prompted_image_gets_the_mask_a_session_on_it_alone_gives(model, image_set):
    # prompts are in the image's own pixels: SAM2 maps them into its square input exactly as it
    # does for a one-image volume of that size, and the mask comes back at the image's size
    s = model.open_images(image_set)
    got = s.add_prompt(2, points=[[70, 20], [10, 5]], labels=[1, 0])
    alone = model.open(image_set[2][None]).add_prompt(0, points=[[70, 20], [10, 5]], labels=[1, 0])
    assert got.shape == (40, 100)
    assert np.array_equal(got, alone)
    got = s.add_prompt(0, obj_id=2, box=[10, 5, 80, 50])
    alone = model.open(image_set[0][None]).add_prompt(0, box=[10, 5, 80, 50])
    assert np.array_equal(got, alone)


def test_same_size_images_with_one_window_match_a_volume_session(model, ct_slab):
    # with equal sizes and one window, an image set is the volume seen frame by frame: same masks
    stack = ct_slab[:4]
    window = (-1000.0, 400.0)
    images = model.open_images(stack, window=window)
    volume = model.open(stack, window=window)
    for s in (images, volume):
        s.add_prompt(1, points=[[64, 64]], labels=[1])
    got = [(f, m[1], p[1]) for f, m, p in images.propagate(probabilities=True)]
    want = [(f, m[1], p[1]) for f, m, p in volume.propagate(probabilities=True)]
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, gm, gp), (_, wm, wp) in zip(got, want):
        assert np.array_equal(gm, wm) and np.array_equal(gp, wp)
    assert np.array_equal(np.stack(images.mask(1)), volume.mask(1))


def test_prompts_are_checked_against_the_image_they_are_on(model, image_set):
    s = model.open_images(image_set)
    # x=110 is inside the 128-wide image 1 but outside the 100-wide image 2
    with pytest.raises(medsam2.InputError, match=r"x=110 is outside this image \(columns 0..99\)"):
        s.add_prompt(2, points=[[110, 5]], labels=[1])
    with pytest.raises(medsam2.InputError, match=r"y=45 is outside this image \(rows 0..39\)"):
        s.add_prompt(2, box=[0, 0, 10, 45])
    with pytest.raises(medsam2.InputError, match=r"does not match this image's \(rows, cols\) \(40, 100\)"):
        s.add_prompt(2, mask=np.ones((128, 128), bool))
    drawn = np.zeros((40, 100), bool)
    drawn[10:30, 20:60] = True
    got = s.add_prompt(2, mask=drawn)
    assert got.shape == (40, 100) and (got == drawn).mean() > 0.95
    with pytest.raises(medsam2.InputError, match="frame 4 is outside"):
        s.add_prompt(4, points=[[1, 1]], labels=[1])


def test_colour_images_are_seen_as_their_grey_level(model, ct_volume):
    grey = ct_volume[10, :50, :60].astype(np.float32)
    rgb = np.stack([grey * 1.0, grey * 0.5, grey * 0.25], axis=-1)
    rgba = np.concatenate([rgb, np.full(grey.shape + (1,), 7.0, np.float32)], axis=-1)
    expected = rgb @ GREY_WEIGHTS
    s = model.open_images([rgb, rgba, expected])
    assert s.image_shapes == [(50, 60)] * 3
    # the model input (windowed, resized, normalised) is that of the grey image; alpha is ignored
    assert torch_equal(s.frame_tensor(0), s.frame_tensor(2))
    assert torch_equal(s.frame_tensor(1), s.frame_tensor(2))


def torch_equal(a, b):
    return bool((a == b).all())


def test_each_image_has_its_own_window_unless_one_is_given(model, ct_volume):
    ct = ct_volume[10, :40, :50]
    photo = np.zeros((30, 20, 3), np.uint8)
    photo[5:25, 5:15] = (200, 100, 50)
    s = model.open_images([ct, photo, photo[..., 0]])
    lo, hi = np.percentile(ct.astype(np.float64), (0.5, 99.5))
    assert s.frames.windows[0] == pytest.approx((lo, hi))          # HU: the image's own percentiles
    assert s.frames.windows[1] == s.frames.windows[2] == (0.0, 255.0)  # 8-bit: as stored
    assert model.open_images([ct, photo], window=(-500, 500)).frames.windows == [(-500.0, 500.0)] * 2


@pytest.mark.parametrize("images, message", [
    ([], "the image set is empty"),
    (np.zeros((2, 3, 4, 5)), r"must be \(N, rows, cols\)"),
    ([np.zeros((4, 4)), np.zeros(5)], "image 1: shape"),
    ([np.zeros((4, 4)), np.full((3, 3), np.nan)], r"image 1: has 9 NaN/infinite pixels \(first NaN at row 0, col 0\)"),
    ([np.zeros((0, 4))], "image 0: is empty"),
    ([np.array([["a", "b"], ["c", "d"]])], "image 0: dtype"),
    (42, "list of 2-D arrays"),
])
def test_bad_image_sets_say_what_is_wrong(model, images, message):
    with pytest.raises(medsam2.InputError, match=message):
        model.open_images(images)


def test_memory_mode_is_checked(model, image_set):
    with pytest.raises(medsam2.InputError, match="memory must be one of"):
        model.open_images(image_set, memory="lstm")
    assert model.open_images(image_set, memory="sam2").memory == "sam2"
    assert model.open_images(image_set).memory == "self-sorting"


# -- the CLI ---------------------------------------------------------------------------------------
def _folder(tmp_path, ct_volume):
    folder = tmp_path / "images"
    folder.mkdir()
    grey = ct_volume[12, :60, :90]
    png = ((np.clip(grey, -1000, 400) + 1000) / 1400 * 255).astype(np.uint8)
    Image.fromarray(png).save(folder / "a.png")
    colour = ((np.clip(ct_volume[20, 20:120, 10:80], -1000, 400) + 1000) / 1400 * 255).astype(np.uint8)
    Image.fromarray(np.stack([colour, colour, colour // 2], -1)).save(folder / "b.jpg", quality=95)
    sitk.WriteImage(sitk.GetImageFromArray(ct_volume[28, 30:100, 40:90].astype(np.int16)), str(folder / "c.dcm"))
    (folder / "notes.txt").write_text("not an image")
    return folder


def _run(args, random_checkpoint):
    return cli_main(["one-prompt", *args, "--model", "sam2.1_hiera_tiny", "--checkpoint", str(random_checkpoint),
                     "--device", "cpu", "--image-size", "256"])


def test_one_prompt_cli_writes_a_mask_per_image_at_its_size(tmp_path, random_checkpoint, ct_volume):
    folder = _folder(tmp_path, ct_volume)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"prompts": [{"image": "b.jpg", "points": [[30, 50]], "labels": [1]}]}))
    out = tmp_path / "masks"
    assert _run([str(folder), "--prompts", str(prompts), "--output", str(out)], random_checkpoint) == 0
    sizes = {"a": (60, 90), "b": (100, 70), "c": (70, 50)}
    for stem, shape in sizes.items():
        mask = np.array(Image.open(out / f"{stem}.png"))
        assert mask.shape == shape and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}          # one object: 255 inside
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["image"], r["mask"], r["obj_id"], r["prompted"]) for r in rows] == [
        ("a.png", "a.png", "1", "0"), ("b.jpg", "b.png", "1", "1"), ("c.dcm", "c.png", "1", "0")]
    for r in rows:
        mask = np.array(Image.open(out / r["mask"]))
        assert int(r["pixels"]) == int((mask == 255).sum())
        assert (int(r["height"]), int(r["width"])) == mask.shape
    # without --overwrite nothing is replaced
    assert _run([str(folder), "--prompts", str(prompts), "--output", str(out)], random_checkpoint) == 1


def test_one_prompt_cli_with_several_objects_writes_their_ids(tmp_path, random_checkpoint, ct_volume):
    folder = _folder(tmp_path, ct_volume)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"prompts": [
        {"image": "a.png", "obj_id": 3, "box": [10, 10, 60, 50]},
        {"image": "c.dcm", "obj_id": 7, "points": [[20, 30], [2, 2]], "labels": [1, 0]}]}))
    out = tmp_path / "masks"
    assert _run([str(folder), "--prompts", str(prompts), "--output", str(out)], random_checkpoint) == 0
    values = set()
    for stem in "abc":
        values |= set(np.unique(np.array(Image.open(out / f"{stem}.png"))).tolist())
    assert values <= {0, 3, 7} and values & {3, 7}
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["image"], r["obj_id"]) for r in rows] == [
        ("a.png", "3"), ("a.png", "7"), ("b.jpg", "3"), ("b.jpg", "7"), ("c.dcm", "3"), ("c.dcm", "7")]


@pytest.mark.parametrize("entry, message", [
    ({"image": "z.png", "points": [[1, 1]]}, "image 'z.png' is not an image file in the folder"),
    ({"image": "a.png", "points": [[95, 1]]}, r"\(95, 1\) is outside a.png \(90 x 60 pixels"),
    ({"image": "a.png", "box": [0, 0, 10, 70]}, "outside a.png"),
    ({"image": "a.png", "points": [[1, 1]], "labels": [1, 0]}, "1 points but 2 labels"),
    ({"image": "a.png"}, "give points"),
    ({"image": "a.png", "points": [[1, 1]], "obj": 2}, "unknown key"),
    ({"image": "a.png", "points": [[1, 1]], "obj_id": 0}, "obj_id must be an integer"),
])
def test_one_prompt_cli_checks_prompts_before_loading_a_model(tmp_path, ct_volume, capsys, entry, message):
    folder = _folder(tmp_path, ct_volume)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"prompts": [entry]}))
    # no checkpoint exists: reaching the model would fail differently
    code = cli_main(["one-prompt", str(folder), "--prompts", str(prompts), "--output", str(tmp_path / "o"),
                     "--model", "sam2.1_hiera_tiny"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(message, err), err
