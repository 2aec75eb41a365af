"""propagate(start=f): a refine stops where the new masks agree with the previous result
(until="agreement", its default), keeps what lies beyond, and reports why each direction stopped."""

import threading

import numpy as np
import pytest

from medsam2 import InputError


def corrected(model, volume, memory):
    s = model.open(volume, memory=memory)
    s.add_prompt(5, points=[[64, 64]], labels=[1])
    list(s.propagate("both"))
    before = s.mask(1)
    s.add_prompt(10, points=[[70, 60]], labels=[1])
    return s, before


def test_a_refine_stops_where_the_new_masks_agree_and_equals_the_full_refine_there(model, ct_volume):
    volume = np.ascontiguousarray(ct_volume[2:22])
    agree, before = corrected(model, volume, "sam2")
    full, _ = corrected(model, volume, "sam2")
    redone = [f for f, _ in agree.propagate("forward", start=10)]
    everything = [f for f, _ in full.propagate("forward", start=10, until="conditioning")]
    report = agree.last_propagation
    assert everything == list(range(10, 20)) and full.last_propagation.directions[0].reason == "end"
    assert report.directions[0].reason == "agreement" and report.directions[0].frames == redone
    assert 11 < redone[-1] < 19, "stopped after agreeing slices, before the volume's end"
    assert report.summary() == f"Refined {len(redone) - 1} slices; the rest agreed"
    a, f = agree.mask(1), full.mask(1)
    for frame in range(20):  # sam2 reads only slices behind: re-tracked slices equal the full refine's
        expected = f[frame] if frame in redone else before[frame]
        np.testing.assert_array_equal(a[frame], expected, err_msg=f"frame {frame}")

    # why else a direction stops
    list(agree.propagate("both", start=10, stop=(7, 15), until="conditioning"))
    assert [d.reason for d in agree.last_propagation.directions] == ["stop", "stop"]
    list(agree.propagate("both", start=10, until="conditioning"))
    assert [d.reason for d in agree.last_propagation.directions] == ["end", "conditioning"]
    cancel = threading.Event()
    cancel.set()
    assert list(agree.propagate("backward", start=10, cancel=cancel)) == []
    assert agree.last_propagation.as_dict()["directions"] == [
        {"direction": "backward", "start": 10, "frames": [], "reason": "cancelled"}]
    with pytest.raises(InputError, match="give start"):
        agree.propagate("both", until="agreement")
    with pytest.raises(InputError, match="until must be one of"):
        agree.propagate("both", start=10, until="never")


def test_a_self_sorting_refine_keeps_the_memories_of_the_slices_it_did_not_redo(model, ct_volume):
    s, before = corrected(model, np.ascontiguousarray(ct_volume[2:22]), "self-sorting")
    bank = s.memory_bank(1)
    old = {e.frame: e for e in bank.entries}
    list(s.propagate("both", start=10))
    report = s.last_propagation
    redone = {f for d in report.directions for f in d.frames}
    assert "agreement" in {d.reason for d in report.directions} and len(redone) < 14
    new = {e.frame: e for e in bank.entries}
    after = s.mask(1)
    for frame in set(range(20)) - redone:
        np.testing.assert_array_equal(after[frame], before[frame], err_msg=f"frame {frame}")
        if frame in old:  # its memory went back to the bank, the very same entry
            assert new.get(frame) is old[frame], f"frame {frame} lost its memory"
    s.clear_prompts(10, 1)  # undo the correction: the slice shows its propagated result again
    np.testing.assert_array_equal(s.mask(1)[10], before[10])
