"""Session.prepare(frame): a click after propagation reuses memory-conditioned features computed
ahead, gives exactly the mask it gives unprepared, and never reuses features of a stale memory.
(sam2 mode against the official predictor: test_engine_equivalence.py.)"""

import numpy as np
import pytest

from medsam2 import InputError

BANKS = {"sam2": ("sam2", None), "topk": ("self-sorting", None), "softmax": ("self-sorting", {"read": "softmax"})}


def propagated(model, slab, kind):
    memory, bank = BANKS[kind]
    s = model.open(slab, memory=memory, memory_bank=bank)
    s.add_prompt(2, points=[[64, 64]], labels=[1])
    list(s.propagate("both"))
    return s


@pytest.mark.parametrize("kind", ["topk", "softmax"])
def test_a_prepared_click_and_its_refine_equal_the_unprepared_ones(model, ct_slab, kind):
    prepared, plain = propagated(model, ct_slab, kind), propagated(model, ct_slab, kind)
    prepared.prepare(6)
    for points, labels in (([[30, 90]], [0]), ([[64, 64]], [1])):  # a correction, then a second click
        np.testing.assert_array_equal(prepared.add_prompt(6, points=points, labels=labels),
                                      plain.add_prompt(6, points=points, labels=labels))
    # the first click took frame 6's bank entry out; its own features stayed valid. A softmax read
    # draws anew at every click (the generator moved on), so there only the first click reuses.
    assert prepared._tracking.prepared.reused == (2 if kind == "topk" else 1)
    # the bank's read generator (softmax) was left where an unprepared click leaves it
    list(prepared.propagate("both", start=6))
    list(plain.propagate("both", start=6))
    np.testing.assert_array_equal(prepared.mask(1), plain.mask(1))
    assert prepared.memory_bank(1).frames() == plain.memory_bank(1).frames()


def test_prepared_state_is_dropped_when_the_memory_changes(model, ct_slab):
    s = propagated(model, ct_slab, "sam2")
    s.add_prompt(2, obj_id=2, points=[[40, 60]], labels=[1])
    s.add_prompt(5, points=[[30, 90]], labels=[0])  # a correction, not yet propagated
    prepared = s._tracking.prepared

    def dropped_by(change, action):
        s.prepare(7)
        assert prepared.frames() == [7] and prepared.get(7, 1, False) is not None
        action()
        assert prepared.get(7, 1, False) is None, f"features computed before {change} are still offered"

    dropped_by("undo", lambda: s.clear_prompts(5, 1))
    s.add_prompt(5, points=[[30, 90]], labels=[0])
    dropped_by("a propagation", lambda: list(s.propagate("forward", start=5, until="conditioning")))
    dropped_by("removing an object", lambda: s.remove_object(2))
    s.add_prompt(7, points=[[30, 90]], labels=[0])
    assert prepared.reused == 0  # no click ever used stale features
    dropped_by("reset", s.reset)


def test_prepare_on_an_untracked_slice_encodes_it_and_a_prompted_one_skips_memory(model, ct_slab):
    s = model.open(ct_slab, memory="sam2")
    s.prepare(4)  # nothing tracked: a click there needs only the image features
    assert 4 in s.feature_cache and s._tracking.prepared.frames() == []
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    s.prepare(4)  # prompted, not yet propagated: a click reads no memory, nothing to prepare
    assert s._tracking.prepared.frames() == []
    with pytest.raises(InputError, match="outside the volume"):
        s.prepare(10)


def test_preparing_brings_a_spilled_frame_back_into_ram_exactly():
    import torch

    from medsam2.tracking.features import FeatureCache

    cache = FeatureCache(ram_mb=0.001)  # room for one frame: the others spill to disk

    def encoded(v):
        return {"backbone_fpn": [torch.full((1, 4, 8, 8), v + 0.25), torch.full((1, 2, 4, 4), v).to(torch.bfloat16)],
                "vision_pos_enc": [torch.zeros(1, 4, 8, 8), torch.zeros(1, 2, 4, 4)]}

    for frame in range(3):
        cache.put(frame, encoded(float(frame)))
    assert list(cache._ram) == [2]
    cache.keep_in_ram(0)
    assert list(cache._ram) == [0] and len(cache) == 3  # frame 2 spilled in its place
    for frame in range(3):
        got, want = cache.get(frame, "cpu")["backbone_fpn"], encoded(float(frame))["backbone_fpn"]
        assert all(torch.equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want))
