"""Multi-axis fusion: prompts carried to the other axes, the fused volume against three independent
single-axis runs, cancel, and what cannot be fused."""

import threading

import numpy as np
import pytest

import medsam2
from medsam2.tracking.fusion import FusionProgress, axis_prompts, total_steps
from medsam2.io.volume_io import from_frames, to_frames


@pytest.fixture(scope="module")
def small_ct():
    """A 5 x 14 x 16 block of the chest CT: 35 frames over its three axes."""
    import slicerio
    import SimpleITK as sitk
    from pathlib import Path

    path = Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"
    return np.ascontiguousarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[14:19, 50:64, 46:62])


def test_prompts_are_carried_to_the_voxel_they_name_on_each_axis(model, small_ct):
    s = model.open(small_ct)
    # object 1: include (x=11, y=10) and exclude (x=3, y=10) on slice 3
    s.add_prompt(3, obj_id=1, points=[[11, 10], [3, 10]], labels=[1, 0])
    s.add_prompt(2, obj_id=2, box=[4, 6, 10, 12])              # centre (7, 9)
    drawn = np.zeros((14, 16), bool)
    drawn[10:13, 12:15] = True                                 # 3 x 3 block, centre row 11, col 13
    s.add_prompt(4, obj_id=3, mask=drawn)

    # axis 1: frames along rows (y); a frame's rows are the slices, its columns x
    got = [(p["frame"], p["obj_id"], p["points"].tolist(), p["labels"].tolist()) for p in axis_prompts(s, 1)]
    assert got == [(10, 1, [[11, 3], [3, 3]], [1, 0]),         # both points lie on row 10
                   (9, 2, [[7, 2]], [1]),
                   (11, 3, [[13, 4]], [1])]
    # axis 2: frames along columns (x); a frame's rows are the slices, its columns y. The exclude
    # point at x=3 lands alone on frame 3: dropped (it would make SAM2 stop object 1 there)
    got = [(p["frame"], p["obj_id"], p["points"].tolist(), p["labels"].tolist()) for p in axis_prompts(s, 2)]
    assert got == [(11, 1, [[10, 3]], [1]), (7, 2, [[9, 2]], [1]), (13, 3, [[11, 4]], [1])]

    # the mapped pixel is the same voxel of the volume
    for axis in (1, 2):
        view = to_frames(small_ct, axis)
        p = axis_prompts(s, axis)[0]
        x, y = p["points"][0].astype(int)
        assert view[p["frame"], y, x] == small_ct[3, 10, 11]


def _single_axis(model, volume, axis, prompts, window):
    """An independent run along one axis: (probabilities, masks) per object, in the volume's layout."""
    s = model.open(to_frames(volume, axis), window=window)
    for frame, obj_id, x, y in prompts:
        s.add_prompt(frame, obj_id=obj_id, points=[[x, y]], labels=[1])
    probs = {o: np.zeros(to_frames(volume, axis).shape, np.float32) for o in s.obj_ids}
    seen = []
    for frame, _masks, p in s.propagate("both", probabilities=True):
        seen.append(frame)
        for o in s.obj_ids:
            probs[o][frame] = p[o]
    assert sorted(seen) == list(range(s.num_frames)), "each frame once"
    return ({o: from_frames(probs[o], axis) for o in s.obj_ids},
            {o: from_frames(s.mask(o), axis) for o in s.obj_ids})


def test_fused_volume_agrees_with_each_single_axis_run_where_they_agree(model, small_ct):
    fused_session = model.open(small_ct)
    window = fused_session.frames.window
    # object 1 at voxel (slice 3, row 10, col 11), object 2 at voxel (1, 5, 6): each prompt written
    # out by hand on each axis, independently of the mapping code
    runs = [
        _single_axis(model, small_ct, 0, [(3, 1, 11, 10), (1, 2, 6, 5)], window),
        _single_axis(model, small_ct, 1, [(10, 1, 11, 3), (5, 2, 6, 1)], window),
        _single_axis(model, small_ct, 2, [(11, 1, 10, 3), (6, 2, 5, 1)], window),
    ]
    fused_session.add_prompt(3, obj_id=1, points=[[11, 10]], labels=[1])
    fused_session.add_prompt(1, obj_id=2, points=[[6, 5]], labels=[1])
    items = list(fused_session.propagate(axes="all"))

    progress = [f for f, _ in items if isinstance(f, FusionProgress)]
    frames = [f for f, _ in items if not isinstance(f, FusionProgress)]
    assert len(progress) + len(frames) == total_steps(small_ct.shape)
    assert [p.axis for p in progress] == [0] * 5 + [1] * 14 + [2] * 16   # each frame of an axis once
    assert frames == list(range(5))

    for o in (1, 2):
        fused = fused_session.mask(o)
        masks = [run[1][o] for run in runs]
        all_in = masks[0] & masks[1] & masks[2]
        all_out = ~masks[0] & ~masks[1] & ~masks[2]
        disagree = ~all_in & ~all_out
        assert all_in.any() and all_out.any() and disagree.any(), "the check below would be vacuous"
        # where all three single-axis runs agree, the fused volume says the same
        assert fused[all_in].all()
        assert not fused[all_out].any()
        # where they disagree, the mean of the three probabilities decides
        mean = (runs[0][0][o] + runs[1][0][o] + runs[2][0][o]) / np.float32(3)
        assert np.array_equal(fused[disagree], mean[disagree] > 0.5)
        # the yielded frames are the fused ones, and the session now returns them
        for f, masks_f in items[-5:]:
            assert np.array_equal(masks_f[o], fused[f])
    labels = fused_session.masks()
    assert np.array_equal(labels == 2, fused_session.mask(2))


def test_cancel_during_the_other_axes_keeps_the_single_axis_result(model, small_ct):
    s = model.open(small_ct)
    s.add_prompt(3, points=[[11, 10]], labels=[1])
    cancel = threading.Event()
    seen = []
    for frame, masks in s.propagate(axes="all", cancel=cancel):
        seen.append(frame)
        if isinstance(frame, FusionProgress) and frame.axis == 1:
            cancel.set()
    # the own axis finished (5 items); on axis 1 the frame after the start finished, the cancel
    # stopped the run, and the start frame (tracked first, said once) closed it; nothing fused
    assert [f.axis for f in seen] == [0] * 5 + [1, 1]
    assert seen[-1].frame == seen[-2].frame - 1
    single = model.open(small_ct, window=s.frames.window)
    single.add_prompt(3, points=[[11, 10]], labels=[1])
    for _ in single.propagate():
        pass
    assert np.array_equal(s.mask(1), single.mask(1))


def test_what_cannot_be_fused_is_refused_before_anything_runs(model, small_ct):
    s = model.open(small_ct)
    with pytest.raises(medsam2.InputError, match="add a prompt first"):
        s.propagate(axes="all")
    s.add_prompt(3, points=[[11, 10]], labels=[1])
    with pytest.raises(medsam2.InputError, match="direction='both' without start/stop"):
        s.propagate("forward", axes="all")
    with pytest.raises(medsam2.InputError, match="without start/stop"):
        s.propagate(start=2, axes="all")
    with pytest.raises(medsam2.InputError, match="axes must be one of"):
        s.propagate(axes="three")
    s.add_prompt(4, obj_id=2, mask=np.zeros((14, 16), bool))   # "not on this slice": nothing to carry
    with pytest.raises(medsam2.InputError, match="object 2: none of its prompts can be carried"):
        s.propagate(axes="all")
    images = model.open_images([small_ct[0], small_ct[1, :10]])
    images.add_prompt(0, points=[[5, 5]], labels=[1])
    with pytest.raises(medsam2.InputError, match="image set"):
        images.propagate(axes="all")


def test_segment_cli_axes_all_writes_the_fused_result(tmp_path, model, random_checkpoint, ct_volume):
    import json

    import SimpleITK as sitk

    from medsam2.cli import main as cli_main

    volume = np.ascontiguousarray(ct_volume[15:19, 52:60, 50:59])          # 4 x 8 x 9
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.7, 5.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    (tmp_path / "p.json").write_text(json.dumps({"coordinates": "ijk", "objects": [
        {"id": 2, "name": "spot", "points": [{"position": [4, 3, 2], "label": 1}]}]}))
    out = tmp_path / "fused.nrrd"
    code = cli_main(["segment", str(tmp_path / "ct.nrrd"), "--prompts", str(tmp_path / "p.json"),
                     "--output", str(out), "--axes", "all", "--model", "sam2.1_hiera_tiny",
                     "--checkpoint", str(random_checkpoint), "--device", "cpu", "--image-size", "256"])
    assert code == 0
    s = model.open(volume)
    s.add_prompt(2, obj_id=2, points=[[4, 3]], labels=[1])   # voxel i=4, j=3, k=2
    for _ in s.propagate(axes="all"):
        pass
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(written == 2, s.mask(2))
