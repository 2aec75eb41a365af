"""memory="sam2" must give exactly the official SAM2VideoPredictor's masks (same frames, weights, prompts).

The official predictor is built by sam2's own builder from the same checkpoint file, with the
overrides our engine documents (corrections are conditioning frames; the image size). It is fed
the very frames our engine builds (`session.frame_tensor`), so any difference is in tracking.
"""

import warnings

import numpy as np
import pytest
import torch

from conftest import TEST_IMAGE_SIZE

CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def official(random_checkpoint):
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2.models.build import official_overrides

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_sam2_video_predictor(CONFIG, str(random_checkpoint), device="cpu",
                                          hydra_overrides_extra=official_overrides(TEST_IMAGE_SIZE))


def official_state(official, session, tmp_path):
    """An official inference state holding exactly our session's frames."""
    from PIL import Image

    for i in range(2):  # init_state needs a JPEG folder; its frames are replaced below
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i:05d}.jpg")
    state = official.init_state(str(tmp_path))
    state["images"] = torch.stack([session.frame_tensor(i) for i in range(session.num_frames)])
    state["num_frames"] = session.num_frames
    state["video_height"], state["video_width"] = session.frame_shape
    state["cached_features"] = {}
    return state


def run_official(official, state, reverse=False, start=None, count=None):
    out = {}
    for frame, obj_ids, logits in official.propagate_in_video(state, start_frame_idx=start,
                                                              max_frame_num_to_track=count, reverse=reverse):
        for i, obj_id in enumerate(obj_ids):
            out[(frame, obj_id)] = (logits[i, 0] > 0).numpy()
    return out


def assert_same(ours: dict, theirs: dict):
    assert ours.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"frame/object {key} differs")


def collect(gen):
    return {(f, o): m for f, masks in gen for o, m in masks.items()}


def assert_nontrivial(masks: dict):
    """Guards against a vacuous pass: the compared masks are neither all empty nor all full."""
    fractions = [m.mean() for m in masks.values()]
    assert 0.01 < np.mean(fractions) < 0.99


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_single_object_point_matches_official(model, official, ct_slab, tmp_path, direction):
    s = model.open(ct_slab, memory="sam2")
    st = official_state(official, s, tmp_path)
    ours_first = s.add_prompt(5, obj_id=1, points=[[60, 70], [30, 40]], labels=[1, 0])
    _, _, logits = official.add_new_points_or_box(st, 5, 1, points=[[60, 70], [30, 40]], labels=[1, 0])
    np.testing.assert_array_equal(ours_first, (logits[0, 0] > 0).numpy())

    ours = collect(s.propagate(direction=direction))
    theirs = run_official(official, st, reverse=direction == "backward")
    assert_nontrivial(theirs)
    assert_same(ours, theirs)
    expected_frames = range(5, 10) if direction == "forward" else range(0, 6)
    assert sorted({f for f, _ in ours}) == list(expected_frames)


def test_several_objects_box_and_mask_both_directions(model, official, ct_slab, tmp_path):
    s = model.open(ct_slab, memory="sam2")
    st = official_state(official, s, tmp_path)
    drawn = np.zeros(s.frame_shape, bool)
    drawn[50:90, 20:60] = True
    s.add_prompt(3, obj_id=1, box=[70, 40, 110, 100])
    s.add_prompt(3, obj_id=2, points=[[40, 60]], labels=[1])
    s.add_prompt(3, obj_id=3, mask=drawn)
    official.add_new_points_or_box(st, 3, 1, box=[70, 40, 110, 100])
    official.add_new_points_or_box(st, 3, 2, points=[[40, 60]], labels=[1])
    official.add_new_mask(st, 3, 3, drawn)

    ours = collect(s.propagate(direction="both"))
    theirs = run_official(official, st)
    theirs.update(run_official(official, st, reverse=True))
    assert_nontrivial(theirs)
    assert_same(ours, theirs)
    for obj_id in (1, 2, 3):  # the session's volume view equals the streamed frames
        volume = s.mask(obj_id)
        for f in range(s.num_frames):
            np.testing.assert_array_equal(volume[f], theirs[(f, obj_id)])


def test_correction_then_refine_matches_official(model, official, ct_slab, tmp_path):
    s = model.open(ct_slab, memory="sam2")
    st = official_state(official, s, tmp_path)
    s.add_prompt(2, obj_id=1, points=[[64, 64]], labels=[1])
    official.add_new_points_or_box(st, 2, 1, points=[[64, 64]], labels=[1])
    collect(s.propagate(direction="both"))
    run_official(official, st)
    run_official(official, st, reverse=True)

    # a correction click on a propagated frame, then refine from there
    fixed = s.add_prompt(7, obj_id=1, points=[[90, 50]], labels=[0])
    _, _, logits = official.add_new_points_or_box(st, 7, 1, points=[[90, 50]], labels=[0])
    np.testing.assert_array_equal(fixed, (logits[0, 0] > 0).numpy())
    assert s.conditioning_frames(1) == [2, 7]

    ours = collect(s.propagate(direction="both", start=7, until="conditioning"))
    # the official equivalent: forward from 7 to the end, backward from 7 to just after frame 2
    theirs = run_official(official, st, start=7, count=2)
    theirs.update(run_official(official, st, reverse=True, start=7, count=4))
    assert_same(ours, theirs)
    assert sorted({f for f, _ in ours}) == [3, 4, 5, 6, 7, 8, 9]
    final = s.mask(1)
    for (f, _), m in theirs.items():
        np.testing.assert_array_equal(final[f], m)


def test_bfloat16_autocast_matches_official_under_the_same_autocast(random_checkpoint, official, ct_slab, tmp_path):
    # How SAM2 runs on CUDA GPUs (bf16 autocast on both sides), reproduced on the CPU: cached
    # features must come back exactly as the encoder made them, in its dtypes, or corrections
    # (which reuse cached frames) would differ from the official predictor's.
    import medsam2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bf16 = medsam2.load_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                                  image_size=TEST_IMAGE_SIZE, precision="bfloat16")
    s = bf16.open(ct_slab, memory="sam2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st = official_state(official, s, tmp_path)
        s.add_prompt(2, obj_id=1, points=[[64, 64]], labels=[1])
        official.add_new_points_or_box(st, 2, 1, points=[[64, 64]], labels=[1])
        ours = collect(s.propagate(direction="both"))
        theirs = run_official(official, st)
        theirs.update(run_official(official, st, reverse=True))
        assert_nontrivial(theirs)
        assert_same(ours, theirs)
        fixed = s.add_prompt(7, obj_id=1, points=[[90, 50]], labels=[0])
        _, _, logits = official.add_new_points_or_box(st, 7, 1, points=[[90, 50]], labels=[0])
        np.testing.assert_array_equal(fixed, (logits[0, 0] > 0).numpy())
        ours = collect(s.propagate(direction="both", start=7, until="conditioning"))
        theirs = run_official(official, st, start=7, count=2)
        theirs.update(run_official(official, st, reverse=True, start=7, count=4))
    assert_same(ours, theirs)


def test_object_prompted_ahead_of_start_propagates(model, ct_slab):
    """An object whose only prompt lies after the start frame: its memory holds only stored
    (bfloat16) features. The official predictor raises a dtype error here on CPU; we must not."""
    s = model.open(ct_slab, memory="sam2")
    s.add_prompt(2, obj_id=1, points=[[64, 64]], labels=[1])
    s.add_prompt(6, obj_id=2, points=[[40, 60]], labels=[1])
    frames = [f for f, _ in s.propagate(direction="forward")]
    assert frames == list(range(2, 10))
    assert s.mask(2)[2:6].any()  # object 2 is tracked on frames before its own prompt


def test_prepared_clicks_after_propagation_match_official(model, official, ct_slab, tmp_path):
    """A click on a prepared slice reuses the memory-conditioned features computed ahead
    (Session.prepare) and still gives the official predictor's mask, click after click."""
    s = model.open(ct_slab, memory="sam2")
    st = official_state(official, s, tmp_path)
    for obj_id, point in ((1, [64, 64]), (2, [40, 60])):
        s.add_prompt(2, obj_id=obj_id, points=[point], labels=[1])
        official.add_new_points_or_box(st, 2, obj_id, points=[point], labels=[1])
    collect(s.propagate(direction="both"))
    run_official(official, st)
    run_official(official, st, reverse=True)

    prepared = s._tracking.prepared
    # a correction on a propagated slice (first click, then a second one), then the prompted slice again
    clicks = [(7, [[90, 50]], [0], True), (7, [[60, 70]], [1], False), (2, [[30, 40]], [0], False)]
    for frame, points, labels, afresh in clicks:
        s.prepare(frame)
        s.prepare(frame)  # idempotent
        ours = s.add_prompt(frame, obj_id=1, points=points, labels=labels)
        _, _, logits = official.add_new_points_or_box(st, frame, 1, points=points, labels=labels,
                                                      clear_old_points=afresh)
        np.testing.assert_array_equal(ours, (logits[0, 0] > 0).numpy())
    assert prepared.reused == 3  # each click used the prepared features
    assert prepared.frames() == [7, 2]  # bounded: the last two prepared frames

    ours = collect(s.propagate(direction="both", start=7, until="conditioning"))
    theirs = run_official(official, st, start=7, count=2)
    theirs.update(run_official(official, st, reverse=True, start=7, count=4))
    assert_nontrivial(theirs)
    assert_same(ours, theirs)
