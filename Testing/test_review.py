"""Per-slice review records (Session.review): the decoder's own outputs kept beside each mask, the
records following the masks through corrections, undo/redo and object changes, and the flag rule
on constructed cases (a slice replaced by an empty mask, a leak, a gap)."""

import numpy as np
import pytest

from medsam2.errors import InputError
from medsam2.tracking.review import FlagRule, SliceRecord, flagged_frames, jump, review_rows

KEYS = {"frame", "obj_id", "confidence", "object_score", "area", "change", "source", "flagged", "reason"}


class DecoderLog:
    """Every mask-decoder call's own outputs, in call order: (predicted IoU of the kept mask, logit)."""

    def __init__(self, model):
        self.calls = []
        self._hook = model.predictor.sam_mask_decoder.register_forward_hook(self._note)

    def _note(self, _module, _args, out):
        _masks, ious, _tokens, object_score = out
        self.calls.append((float(ious[0].max()), float(object_score[0, 0])))

    def close(self):
        self._hook.remove()


def _expected(call):
    iou, logit = call
    return (iou if logit > 0 else 0.0), logit


@pytest.mark.parametrize("memory", ["self-sorting", "sam2"])
def test_records_are_the_decoders_own_outputs(model, ct_slab, memory):
    log = DecoderLog(model)
    try:
        s = model.open(ct_slab, memory=memory)
        mask = s.add_prompt(4, box=[40, 40, 90, 90])
        order = [f for f, _ in s.propagate()]
    finally:
        log.close()
    rows = s.review()
    assert [r["frame"] for r in rows] == list(range(10)) and all(set(r) == KEYS for r in rows)
    by_frame = {r["frame"]: r for r in rows}
    # one decoder call for the prompt, then one per tracked frame in the order they were tracked
    tracked = [f for f in order if f != 4]
    assert len(log.calls) == 1 + len(tracked)
    for frame, call in zip([4] + tracked, log.calls):
        row = by_frame[frame]
        assert (row["confidence"], row["object_score"]) == _expected(call)
        assert row["source"] == ("prompt" if frame == 4 else "propagated")
    volume = s.mask(1)
    for r in rows:
        assert r["area"] == int(volume[r["frame"]].sum())
        previous = int(volume[r["frame"] - 1].sum()) if r["frame"] else r["area"]
        assert r["change"] == pytest.approx(abs(r["area"] - previous) / max(r["area"], previous, 1))
    assert by_frame[4]["area"] == int(mask.sum())


def _own(rows):
    """frame -> what a slice's record says on its own (change and flags also depend on neighbours)."""
    return {r["frame"]: (r["confidence"], r["object_score"], r["area"], r["source"]) for r in rows}


def test_records_follow_corrections_and_their_undo(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    list(s.propagate())
    before = _own(s.review())
    s.add_prompt(7, points=[[70, 60]], labels=[0])
    after_prompt = _own(s.review())
    assert after_prompt[7][3] == "prompt" and after_prompt[7] != before[7]
    # undo of the correction prompt: frame 7 holds again what it held before it, record included
    s.clear_prompts(7, 1)
    assert _own(s.review()) == before
    s.add_prompt(7, points=[[70, 60]], labels=[0])  # redo
    assert _own(s.review()) == after_prompt
    list(s.propagate(start=7))
    refined = _own(s.review())
    assert [f for f in range(10) if refined[f][3] == "refined"] == [5, 6, 8, 9]
    assert refined[7] == after_prompt[7] and refined[4] == before[4]


def test_records_per_object_and_after_removal_and_reset(model, ct_slab):
    s = model.open(ct_slab)
    s.add_prompt(2, obj_id=1, points=[[50, 50]], labels=[1])
    s.add_prompt(2, obj_id=2, points=[[90, 80]], labels=[1])
    list(s.propagate("forward", stop=5))
    rows = s.review()
    assert [(r["frame"], r["obj_id"]) for r in rows] == [(f, o) for f in range(2, 6) for o in (1, 2)]
    assert [r["obj_id"] for r in s.review(2)] == [2] * 4
    s.remove_object(1)
    assert {r["obj_id"] for r in s.review()} == {2}
    with pytest.raises(InputError, match="unknown object id 1"):
        s.review(1)
    s.reset()
    assert s.review() == []


def test_an_image_set_is_reviewed_at_each_images_size(model, ct_slab):
    images = [ct_slab[0], ct_slab[1, :96, :80], ct_slab[2]]
    s = model.open_images(images)
    s.add_prompt(0, points=[[64, 64]], labels=[1])
    list(s.propagate())
    rows = s.review(rule=FlagRule(min_confidence=0.0, max_jump=1e-6))
    assert [r["area"] for r in rows] == [int(m.sum()) for m in s.mask(1)]
    assert not any(r["flagged"] for r in rows)  # no neighbours between unrelated images


def test_unordered_rows_ignore_neighbours():
    records = {f: SliceRecord(0.9, 1.0, "propagated") for f in range(4)}
    areas = {0: 100, 1: 0, 2: 900, 3: 100}  # a gap and a spike, were these slices of a volume
    rows = review_rows([1], lambda o: records, lambda o, f: areas.get(f, 0))
    assert flagged_frames(rows) == [1, 2]
    assert flagged_frames(review_rows([1], lambda o: records, lambda o, f: areas.get(f, 0), ordered=False)) == []


@pytest.fixture(scope="module")
def propagated(model, ct_volume):
    """A session propagated once, with its masks; each test replaces them by a constructed case."""
    s = model.open(np.ascontiguousarray(ct_volume[10:20]))
    s.add_prompt(5, box=[40, 40, 90, 90])
    list(s.propagate())
    return s


def _disc(area_px):
    yy, xx = np.mgrid[:128, :128]
    return (yy - 64) ** 2 + (xx - 64) ** 2 <= area_px / np.pi


def _constructed(session, areas):
    """Replace the kept masks by discs of these areas (the decoder's records stay)."""
    session.replace_masks(1, np.stack([_disc(a) if a else np.zeros((128, 128), bool) for a in areas]))
    return session.review(rule=FlagRule(min_confidence=0.0))  # geometry only: random weights


SMOOTH = [0, 300, 600, 900, 1200, 1400, 1300, 1000, 700, 0]  # an organ growing and shrinking


def test_a_smooth_organ_is_not_flagged(propagated):
    assert flagged_frames(_constructed(propagated, SMOOTH)) == []


def test_a_slice_replaced_by_an_empty_mask_is_flagged(propagated):
    areas = list(SMOOTH)
    areas[5] = 0
    rows = _constructed(propagated, areas)
    assert flagged_frames(rows) == [5] and rows[5]["reason"] == "vanished" and rows[5]["change"] == 1.0


def test_a_leak_is_flagged(propagated):
    areas = list(SMOOTH)
    areas[4] = 4000  # one slice spills into a neighbour organ
    rows = _constructed(propagated, areas)
    assert flagged_frames(rows) == [4] and rows[4]["reason"] == "area-jump"


def test_a_gap_is_flagged_and_its_ends_are_not(propagated):
    areas = list(SMOOTH)
    areas[4:7] = [0, 0, 0]
    assert flagged_frames(_constructed(propagated, areas)) == [4, 5, 6]


def test_low_confidence_flags_only_non_empty_masks():
    records = {f: SliceRecord(c, 1.0, "propagated") for f, c in enumerate([0.9, 0.2, 0.9, 0.1])}
    areas = {0: 100, 1: 100, 2: 100, 3: 0}
    rows = review_rows([1], lambda o: records, lambda o, f: areas.get(f, 0), rule=FlagRule(min_confidence=0.5))
    assert flagged_frames(rows) == [1] and rows[1]["reason"] == "low-confidence"


def test_a_jump_is_against_both_neighbours():
    assert jump(100, 50, 50) == 0.5 and jump(10, 100, 100) == 0.9
    assert jump(100, 50, 150) == 0.0  # a slope
    with pytest.raises(ValueError, match="max_jump"):
        FlagRule(max_jump=0.0)


def test_next_uncertain_slice_cycles_through_the_flagged_ones():
    from MedSAM2Lib.review import next_flagged

    assert next_flagged([], 3) is None
    assert [next_flagged([2, 7, 11], after) for after in (None, 0, 2, 7, 11, 20)] == [2, 2, 7, 11, 2, 2]
    assert [next_flagged([2, 7, 11], after, backwards=True) for after in (None, 7, 2, 0)] == [11, 2, 11, 11]
    assert next_flagged([5], 5) == 5  # the only one: it stays


def test_the_strip_has_a_cell_per_slice_coloured_by_confidence():
    from MedSAM2Lib.review import NO_RESULT, confidence_color, strip_cells

    records = [{"frame": 1, "confidence": 0.0, "flagged": True, "reason": "low-confidence", "area": 5,
                "source": "propagated"},
               {"frame": 2, "confidence": 1.0, "flagged": False, "reason": "", "area": 9, "source": "prompt"}]
    cells = strip_cells(records, 4)
    assert [c["frame"] for c in cells] == [0, 1, 2, 3] and [c["flagged"] for c in cells] == [False, True, False, False]
    assert cells[0]["color"] == cells[3]["color"] == NO_RESULT
    red, green = (int(cells[1]["color"][i:i + 2], 16) for i in (1, 3)), (int(cells[2]["color"][i:i + 2], 16)
                                                                         for i in (1, 3))
    (r1, g1), (r2, g2) = red, green
    assert r1 > g1 and g2 > r2 and confidence_color(1.5) == cells[2]["color"]
    assert "low-confidence" in cells[1]["title"]


def test_the_default_rule_flags_no_reference_slice_and_catches_every_emptied_one(capsys):
    """What docs/review.md claims from the study: on CTChest4's reference segments, along every axis,
    the default max_jump flags nothing and an emptied interior slice is always caught."""
    from medsam2.study import review_study

    rows = review_study.geometry_rows(review_study.chest_case()[1])
    default = FlagRule().max_jump
    assert default in review_study.JUMPS
    assert sum(r["false"][default] for r in rows) == 0
    assert max(r["max_jump"] for r in rows) < default
    assert sum(r["emptied"] for r in rows) == sum(r["inner"] for r in rows) > 900
    assert review_study.main(["--no-model"]) == 0 and "reference slices flagged" in capsys.readouterr().out
