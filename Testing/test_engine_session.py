"""Engine behaviour a user relies on: prompts, corrections, cancel, odd volumes, clear errors."""

import threading

import numpy as np
import pytest
import torch

import medsam2
from medsam2.tracking.features import FeatureCache
from medsam2.tracking.frames import IMAGENET_MEAN, IMAGENET_STD, FrameSource


# -- prompts ------------------------------------------------------------------------------
def test_every_prompt_kind_returns_that_frames_mask(model, ct_slab):
    s = model.open(ct_slab)
    m = s.add_prompt(4, obj_id=1, points=[[64, 64]], labels=[1])
    assert m.dtype == bool and m.shape == (128, 128) and m.any()
    b = s.add_prompt(4, obj_id=2, box=[20, 30, 70, 90])
    assert b.shape == (128, 128)
    drawn = np.zeros((128, 128), bool)
    drawn[40:80, 30:90] = True
    got = s.add_prompt(5, obj_id=3, mask=drawn)
    # a mask prompt is taken as the answer for its frame (SAM2 feeds it through unchanged)
    assert (got == drawn).mean() > 0.98
    assert s.obj_ids == [1, 2, 3]
    assert s.conditioning_frames() == [4, 5]


def test_clicks_on_a_frame_accumulate(model, ct_slab):
    s = model.open(ct_slab, memory="sam2")
    s.add_prompt(4, obj_id=1, points=[[64, 64]], labels=[1])
    two = s.add_prompt(4, obj_id=1, points=[[20, 20]], labels=[0])
    fresh = model.open(ct_slab, memory="sam2")
    both = fresh.add_prompt(4, obj_id=1, points=[[64, 64], [20, 20]], labels=[1, 0])
    # the second click refines the first (it is not a new single-click prompt)
    alone = model.open(ct_slab, memory="sam2").add_prompt(4, obj_id=1, points=[[20, 20]], labels=[0])
    assert not np.array_equal(two, alone)
    assert two.shape == both.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(frame=10, points=[[5, 5]], labels=[1]), "frame 10 is outside the volume"),
    (dict(frame=-1, points=[[5, 5]], labels=[1]), "frame -1 is outside the volume"),
    (dict(frame=2, points=[[128.6, 5]], labels=[1]), "x=128.6 is outside the frame"),
    (dict(frame=2, points=[[5, -3]], labels=[1]), "y=-3 is outside the frame"),
    (dict(frame=2, points=[[5, 5]], labels=[1, 0]), "1 points but 2 labels"),
    (dict(frame=2, points=[[5, 5]], labels=[2]), "labels must be 1"),
    (dict(frame=2, points=[[5, 5]]), "points and labels must be given together"),
    (dict(frame=2, box=[0, 0, 200, 10]), "x=200 is outside the frame"),
    (dict(frame=2, mask=np.ones((10, 10), bool)), "does not match the frame"),
    (dict(frame=2), "a prompt needs"),
    (dict(frame=2, obj_id=0, points=[[5, 5]], labels=[1]), "obj_id must be a positive integer"),
])
def test_bad_prompts_say_what_is_wrong(model, ct_slab, kwargs, message):
    s = model.open(ct_slab)
    with pytest.raises(ValueError, match=message) as info:
        s.add_prompt(**kwargs)
    assert isinstance(info.value, medsam2.InputError)


def test_propagate_needs_a_prompt_and_a_known_direction(model, ct_slab):
    s = model.open(ct_slab)
    with pytest.raises(medsam2.InputError, match="add a prompt first"):
        s.propagate()
    s.add_prompt(3, points=[[64, 64]], labels=[1])
    with pytest.raises(medsam2.InputError, match="direction"):
        s.propagate(direction="up")
    with pytest.raises(medsam2.InputError, match="before its start"):
        s.propagate(direction="forward", stop=1)
    with pytest.raises(medsam2.InputError, match="unknown object id 5"):
        s.mask(5)


# -- propagation --------------------------------------------------------------------------
def test_propagation_fills_every_slice_in_order(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    frames = [f for f, _ in s.propagate("both")]
    assert frames == [5, 6, 7, 8, 9, 4, 3, 2, 1, 0]  # each frame once
    vol = s.mask(1)
    assert vol.shape == ct_slab.shape and vol.dtype == bool
    assert all(vol[f].any() for f in range(10))
    labels = s.masks()
    assert labels.dtype == np.uint16 and set(np.unique(labels)) <= {0, 1}
    assert np.array_equal(labels == 1, vol)


def test_stop_limits_the_span(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    assert [f for f, _ in s.propagate("forward", stop=6)] == [4, 5, 6]
    assert [f for f, _ in s.propagate("both", stop=(2, 5))] == [5, 4, 3, 2]
    assert not s.mask(1)[7:].any() and not s.mask(1)[:2].any()


@pytest.mark.parametrize("memory", ["sam2", "self-sorting"])
def test_correction_repropagates_only_its_span(model, ct_slab, memory):
    s = model.open(ct_slab, memory=memory)
    s.add_prompt(2, points=[[64, 64]], labels=[1])
    list(s.propagate("both"))
    s.add_prompt(8, points=[[100, 40]], labels=[1])  # a second conditioning frame, far ahead
    before = s.mask(1).copy()
    corrected = s.add_prompt(5, points=[[30, 90], [64, 64]], labels=[0, 1])
    assert s.conditioning_frames(1) == [2, 5, 8]
    redone = [f for f, _ in s.propagate("both", start=5, until="conditioning")]
    # forward stops before frame 8, backward before frame 2
    assert redone == [6, 7, 5, 4, 3]
    after = s.mask(1)
    for f in (0, 1, 2, 8, 9):
        assert np.array_equal(after[f], before[f]), f"frame {f} outside the span changed"
    assert np.array_equal(after[5], corrected)


def test_cancel_stops_within_a_frame_and_keeps_finished_frames(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(0, points=[[64, 64]], labels=[1])
    cancel = threading.Event()
    seen = []
    for frame, _ in s.propagate("forward", cancel=cancel):
        seen.append(frame)
        if len(seen) == 3:
            cancel.set()
    assert seen == [0, 1, 2]
    vol = s.mask(1)
    assert vol[:3].any(axis=(1, 2)).all() and not vol[3:].any()
    # going on later finishes the rest
    assert [f for f, _ in s.propagate("forward", start=2)] == list(range(2, 10))


def test_remove_object_and_reset(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(3, obj_id=1, points=[[64, 64]], labels=[1])
    s.add_prompt(3, obj_id=2, points=[[30, 30]], labels=[1])
    s.remove_object(1)
    assert s.obj_ids == [2]
    with pytest.raises(medsam2.InputError):
        s.mask(1)
    list(s.propagate("forward"))
    assert s.mask(2)[3:].any()
    s.reset()
    assert s.obj_ids == [] and not s.masks().any()


# -- self-sorting memory --------------------------------------------------------------------
def test_self_sorting_bank_fills_with_confident_non_conditioning_frames(model, ct_slab):
    s = model.open(ct_slab, memory="self-sorting", memory_bank={"capacity": 3, "min_confidence": 0.5})
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    list(s.propagate("both"))
    bank = s.memory_bank(1)
    assert 0 < len(bank) <= 3
    assert 4 not in bank.frames()  # the prompted frame conditions; it is never a bank entry
    assert all(e.confidence >= 0.5 for e in bank.entries)
    strict = model.open(ct_slab, memory="self-sorting", memory_bank={"min_confidence": 1.0})
    strict.add_prompt(4, points=[[64, 64]], labels=[1])
    list(strict.propagate("forward"))
    assert len(strict.memory_bank(1)) == 0  # nothing reaches a confidence of 1.0
    with pytest.raises(medsam2.InputError, match="capacity"):
        model.open(ct_slab, memory_bank={"capacity": 0})
    with pytest.raises(medsam2.InputError, match="memory must be one of"):
        model.open(ct_slab, memory="recent")


# -- frames and odd volumes ------------------------------------------------------------------
@pytest.mark.parametrize("volume", [
    np.random.default_rng(0).integers(-1024, 2000, (4, 30, 50)).astype(np.int16),  # non-square CT
    np.random.default_rng(1).integers(0, 255, (4, 64, 40)).astype(np.uint8),
    np.random.default_rng(2).random((4, 48, 48)).astype(np.float32) * 800.0,  # float MR
    np.concatenate([np.zeros((2, 40, 40), np.float64), np.full((2, 40, 40), 7.0)]),  # constant slices
    np.full((3, 40, 40), -1000, np.int32),  # constant volume
], ids=["int16-nonsquare", "uint8", "float-mr", "constant-slices", "constant-volume"])
def test_odd_volumes_segment_at_their_own_size(model, volume):
    s = model.open(volume)
    rows, cols = volume.shape[1:]
    m = s.add_prompt(1, points=[[cols // 2, rows // 2]], labels=[1])
    assert m.shape == (rows, cols)
    list(s.propagate("both"))
    assert s.mask(1).shape == volume.shape
    t = s.frame_tensor(0)
    assert t.shape == (3, model.image_size, model.image_size) and torch.isfinite(t).all()


def test_nan_and_bad_shapes_are_refused_clearly(model):
    vol = np.zeros((3, 20, 20), np.float32)
    vol[1, 4, 7] = np.nan
    with pytest.raises(medsam2.InputError, match=r"NaN.*slice 1, row 4, col 7"):
        model.open(vol)
    with pytest.raises(medsam2.InputError, match="3-D"):
        model.open(np.zeros((20, 20)))
    with pytest.raises(medsam2.InputError, match="window"):
        model.open(np.zeros((2, 20, 20)), window=(5, 5))


def test_frame_tensor_is_windowed_and_imagenet_normalised(model):
    vol = np.zeros((2, 16, 16), np.int16)
    vol[0, :, 8:] = 400  # right half at the top of the window
    s = model.open(vol, window=(-100, 300))
    t = s.frame_tensor(0)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    left = (0.25 - mean) / std  # 0 HU is 1/4 up the window
    right = (1.0 - mean) / std  # 400 HU clips to the top
    assert torch.allclose(t[:, 10, 2], left, atol=1e-5)
    assert torch.allclose(t[:, 10, -3], right, atol=1e-5)


def test_frames_are_built_lazily_and_default_window_is_robust():
    vol = np.arange(10 * 20 * 20, dtype=np.float32).reshape(10, 20, 20)
    vol[0, 0, 0] = -1e6  # one outlier must not squash the window
    src = FrameSource(vol, 64)
    low, high = src.window
    assert low > -1e5 and high < vol.max()
    assert src.volume is vol  # the volume is referenced, not copied or converted up front


# -- feature cache ------------------------------------------------------------------------
# float32 (CPU), and the mix bf16 autocast leaves: two levels in bfloat16, the last in float32
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.bfloat16, torch.bfloat16, torch.float32)])
def test_feature_cache_spills_losslessly_past_its_ram_budget(dtypes):
    rng = torch.Generator().manual_seed(0)
    shapes = [(1, 32, 16, 16), (1, 64, 8, 8), (1, 256, 4, 4)]
    frames = {f: [torch.randn(s, generator=rng).to(d) for s, d in zip(shapes, dtypes)] for f in range(6)}
    pos = [torch.randn(s, generator=rng).to(d) for s, d in zip(shapes, dtypes)]
    record_mb = sum(np.prod(s) * torch.empty((), dtype=d).element_size() for s, d in zip(shapes, dtypes)) / 2**20
    cache = FeatureCache(ram_mb=2.5 * record_mb)
    for f, fpn in frames.items():
        cache.put(f, {"backbone_fpn": fpn, "vision_pos_enc": pos})
    stats = cache.stats()
    assert stats["in_ram"] == 2 and stats["on_disk"] == 4
    for f, fpn in frames.items():
        got = cache.get(f, "cpu")
        assert [t.dtype for t in got["backbone_fpn"]] == list(dtypes)  # handed back as stored
        assert all(torch.equal(a, b) for a, b in zip(got["backbone_fpn"], fpn))
        assert all(torch.equal(a, b) for a, b in zip(got["vision_pos_enc"], pos))
    assert cache.get(99, "cpu") is None


def test_sessions_on_the_same_volume_share_encoded_features(model, ct_slab):
    a = model.open(ct_slab, window=(-1000, 1000))
    a.add_prompt(3, points=[[64, 64]], labels=[1])
    cache = a.feature_cache
    misses = cache.misses
    b = model.open(ct_slab.copy(), window=(-1000, 1000))  # same content, another array
    assert b.feature_cache is cache
    b.add_prompt(3, obj_id=1, points=[[40, 40]], labels=[1])
    assert cache.misses == misses  # frame 3 was not encoded again


def test_prompt_history_and_probabilities(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(3, obj_id=1, points=[[64, 64]], labels=[1])
    s.add_prompt(3, obj_id=1, points=[[20, 20]], labels=[0])
    s.add_prompt(6, obj_id=2, box=[10, 10, 50, 50])
    assert [(p["frame"], p["obj_id"]) for p in s.prompts()] == [(3, 1), (3, 1), (6, 2)]
    s.add_prompt(3, obj_id=1, box=[30, 30, 90, 90])  # a box starts frame 3 afresh
    assert [(p["frame"], p["box"] is not None) for p in s.prompts(1)] == [(3, True)]
    s.clear_prompts(6, 2)
    assert s.prompts(2) == []
    with pytest.raises(medsam2.InputError, match="object 2 has no prompts left"):
        s.propagate()
    s.remove_object(2)
    for frame, masks, probs in s.propagate("forward", stop=4, probabilities=True):
        assert probs[1].dtype == np.float32 and probs[1].shape == masks[1].shape
        assert np.array_equal(probs[1] > 0.5, masks[1]) or np.abs(probs[1] - 0.5).min() < 1e-6


@pytest.mark.parametrize("memory", ["sam2", "self-sorting"])
def test_clearing_a_correction_then_redoing_it_gives_the_same_mask(model, ct_slab, memory):
    """Undo/redo in Slicer: clear a correction's prompts, add the same prompt again."""
    s = model.open(ct_slab, memory=memory)
    s.add_prompt(2, points=[[64, 64]], labels=[1])
    list(s.propagate("forward"))
    first = s.add_prompt(6, points=[[30, 90]], labels=[0])
    s.clear_prompts(6, 1)
    assert s.conditioning_frames(1) == [2]
    again = s.add_prompt(6, points=[[30, 90]], labels=[0])
    np.testing.assert_array_equal(again, first)
    assert np.array_equal(s.frame_masks(6)[1], first)


def test_encode_ahead_changes_nothing_but_time(model, ct_slab):
    def run(lookahead):
        model.prefetch_lookahead = lookahead
        model._feature_caches.clear()  # start cold: every frame must be encoded
        s = model.open(ct_slab, memory="sam2")
        s.add_prompt(3, points=[[64, 64]], labels=[1])
        list(s.propagate("both"))
        assert "prefetcher" not in s._tracking.inference_state  # stopped and removed after each pass
        return s.mask(1)

    saved = model.prefetch_lookahead
    try:
        plain, ahead = run(0), run(3)
    finally:
        model.prefetch_lookahead = saved
    np.testing.assert_array_equal(plain, ahead)


def test_batched_encode_ahead_the_cuda_path_gives_the_same_masks(model, ct_slab):
    # on CUDA the encoder runs ahead in batches; the same code runs here on the CPU
    predictor, batches = model.predictor, []
    encode = predictor.forward_image

    def recording(images):
        batches.append(images.shape[0])
        return encode(images)

    def run(lookahead, batch):
        model.prefetch_lookahead, model.encode_batch = lookahead, batch
        model._feature_caches.clear()
        s = model.open(ct_slab, memory="sam2")
        s.add_prompt(3, points=[[64, 64]], labels=[1])
        list(s.propagate("both"))
        return s.mask(1)

    saved = model.prefetch_lookahead, model.encode_batch
    predictor.forward_image = recording
    try:
        plain = run(0, 1)
        batches.clear()
        batched = run(8, 4)
    finally:
        model.prefetch_lookahead, model.encode_batch = saved
        del predictor.forward_image
    assert max(batches) == 4  # frames really went through the encoder four at a time
    np.testing.assert_array_equal(plain, batched)


def test_bfloat16_precision_is_opt_in_and_close_to_float32(random_checkpoint, ct_slab, model):
    assert model.precision == "float32" and not model.mixed_precision  # CPU default: exact
    fast = medsam2.load_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                              image_size=model.image_size, precision="bfloat16")
    assert fast.mixed_precision
    results = []
    for m in (model, fast):
        s = m.open(ct_slab, memory="sam2")
        s.add_prompt(4, points=[[64, 64]], labels=[1])
        list(s.propagate("forward", stop=6))
        results.append(s.mask(1)[4:7])
    agreement = (results[0] == results[1]).mean()
    assert agreement > 0.9  # same segmentation up to bf16 rounding at the mask borders
    # its cache keeps the features as autocast made them (partly bfloat16), not widened to float32
    cached = next(iter(fast._feature_caches.values())).get(5, "cpu")
    assert torch.bfloat16 in {t.dtype for t in cached["backbone_fpn"]}
    with pytest.raises(medsam2.InputError, match="precision"):
        medsam2.load_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu", precision="half")
