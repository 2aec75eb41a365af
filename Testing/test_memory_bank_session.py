"""The self-sorting bank inside a session: what each tracked frame reads, what reaches memory
attention, what the bank keeps through corrections, undo and several objects, and how it differs
from stock SAM2 memory on the same frames. Random weights: these compare mechanisms, not quality.
`min_confidence=0` admits every frame the object-score head calls present, so the banks fill."""

import numpy as np
import pytest
import torch

from medsam2.tracking.memory_bank import SelfSortingMemoryBank

FILLING = {"min_confidence": 0.0}


def open_session(model, volume, memory="self-sorting", **bank):
    return model.open(volume, memory=memory, memory_bank={**FILLING, **bank} if memory == "self-sorting" else None)


def frames_of(gen):
    return [item[0] for item in gen]


def own_outputs(session, obj_id):
    """The object's tracked outputs as SAM2 stores them (white box: where bank payloads come from)."""
    tracking = session._tracking
    return tracking.outputs(tracking.known(obj_id))["non_cond_frame_outputs"]


@pytest.fixture()
def attention_calls(model):
    """What each memory-attention call received: (memory tokens, pointer tokens, tokens per memory)."""
    calls = []

    def record(_module, _args, kwargs):
        curr = kwargs["curr"]
        calls.append((kwargs["memory"].shape[0], kwargs["num_obj_ptr_tokens"], (curr[0] if isinstance(curr, list)
                                                                                 else curr).shape[0]))

    handle = model.predictor.memory_attention.register_forward_pre_hook(record, with_kwargs=True)
    yield calls
    handle.remove()


@pytest.fixture()
def bank_reads(monkeypatch):
    """Every call of the bank's read, as (frame asked for, frames returned)."""
    reads, read = [], SelfSortingMemoryBank.read

    def counting(self, descriptor, k, frame=None):
        got = read(self, descriptor, k, frame)
        reads.append((frame, [r.frame for r in got]))
        return got

    monkeypatch.setattr(SelfSortingMemoryBank, "read", counting)
    return reads


@pytest.mark.parametrize("memory", ["self-sorting", "sam2"])
def test_each_tracked_frame_reads_memory_once_and_what_it_reads_reaches_attention(
        model, ct_slab, memory, attention_calls, bank_reads):
    s = open_session(model, ct_slab, memory)
    s.add_prompt(4, obj_id=1, points=[[64, 64]], labels=[1])
    s.add_prompt(6, obj_id=2, points=[[30, 40]], labels=[1])
    attention_calls.clear()
    yielded = frames_of(s.propagate("both"))
    trace = s.memory_trace()

    # one record per tracked (frame, object), in tracking order: prompted frames are not tracked,
    # and the backward pass tracks the start frame 4 again (object 2 is not prompted there)
    forward, backward = range(4, 10), range(4, -1, -1)
    expected = [(f, o, d) for order, d in ((forward, "forward"), (backward, "backward")) for f in order
                for o, cond in ((1, 4), (2, 6)) if f != cond]
    assert [(r["frame"], r["obj_id"], r["direction"]) for r in trace] == expected
    assert yielded == [5, 6, 7, 8, 9, 4, 3, 2, 1, 0]

    # the memories a record lists are exactly what memory attention received, token for token
    assert len(attention_calls) == len(trace)
    ptr_tokens = model.predictor.hidden_dim // model.predictor.mem_dim
    for r, (memory_tokens, pointer_tokens, per_memory) in zip(trace, attention_calls):
        assert pointer_tokens == len(r["pointers"]) * ptr_tokens, r
        assert memory_tokens - pointer_tokens == len(r["attended"]) * per_memory, r
        assert r["frame"] not in r["attended"]
        assert set(r["prompted"]) <= set(r["attended"])  # prompted frames are always attended
    if memory == "self-sorting":
        # the bank is read once per tracked frame and object, for that frame
        assert [f for f, _ in bank_reads] == [r["frame"] for r in trace]
        assert all(r["attended"][len(r["prompted"]):] == [e["frame"] for e in r["recalled"]] for r in trace)
        assert sum(len(r["recalled"]) for r in trace) > len(trace), "the banks were read, not empty"
    else:
        assert bank_reads == [] and s.memory_bank(1) is None


def test_self_sorting_and_sam2_attend_to_different_frames_and_give_different_masks(model, ct_volume):
    volume = np.ascontiguousarray(ct_volume[6:22])  # 16 slices: the bank outgrows SAM2's 6-frame window
    runs = {}
    for memory in ("self-sorting", "sam2"):
        s = open_session(model, volume, memory)
        s.add_prompt(8, points=[[40, 64]], labels=[1])
        frames_of(s.propagate("both"))
        runs[memory] = (s.memory_trace(), s.mask(1))
    (ours, ours_mask), (sam2, sam2_mask) = runs["self-sorting"], runs["sam2"]
    assert [r["frame"] for r in ours] == [r["frame"] for r in sam2] == [*range(9, 16), *range(7, -1, -1)]
    # SAM2 attends to the prompt, then its window: the up to six nearest slices already tracked on
    # the side the pass comes from, nearest first; its "bank" is what the next slice will read
    tracked = set()
    for r, following in zip(sam2, sam2[1:] + [None]):
        f, step = r["frame"], -1 if r["direction"] == "forward" else 1
        assert r["attended"] == [8] + [g for g in range(f + step, f + 7 * step, step) if g in tracked], r
        tracked.add(f)
        if following is not None and following["frame"] == f - step:
            assert r["bank"] == following["attended"][1:], r
    # on a contiguous forward pass the most similar slices are the nearest ones, so the bank reads
    # what SAM2 reads; backwards it reads six forward-pass slices where SAM2's window holds five
    # (one of its slots is the prompted slice's), and the sets part
    differ = [(a["frame"], a["direction"]) for a, b in zip(ours, sam2) if set(a["attended"]) != set(b["attended"])]
    assert differ, "the bank read the same frames as SAM2 on every slice"
    assert not np.array_equal(ours_mask, sam2_mask)


def test_capacity_one_holds_and_reads_a_single_memory(model, ct_slab):
    s = open_session(model, ct_slab, capacity=1)
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    frames_of(s.propagate("both"))
    trace = s.memory_trace()
    assert all(len(r["bank"]) <= 1 and len(r["recalled"]) <= 1 for r in trace)
    assert all(r["attended"] == [4] + [e["frame"] for e in r["recalled"]] for r in trace)
    assert any((r["admission"] or "").startswith("replaced") for r in trace), "the one slot changed hands"
    assert len(s.memory_bank(1)) == 1


def test_two_objects_never_share_a_memory(model, ct_slab):
    s = open_session(model, ct_slab)
    s.add_prompt(3, obj_id=1, points=[[64, 64]], labels=[1])
    s.add_prompt(6, obj_id=2, points=[[30, 40]], labels=[1])
    frames_of(s.propagate("both"))
    banks = {o: s.memory_bank(o) for o in (1, 2)}
    assert banks[1] is not banks[2] and len(banks[1]) and len(banks[2])
    for o, other in ((1, 2), (2, 1)):
        mine, theirs = own_outputs(s, o), own_outputs(s, other)
        for e in banks[o].entries:
            # each entry is this object's memory of that slice, never the other object's
            assert e.payload["maskmem_features"] is mine[e.frame]["maskmem_features"]
            assert e.frame not in theirs or e.payload["maskmem_features"] is not theirs[e.frame]["maskmem_features"]
    assert 3 not in banks[1].frames() and 6 not in banks[2].frames()  # prompted frames are never entries


def test_a_correction_evicts_its_frame_and_refine_replaces_only_the_redone_memories(model, ct_slab):
    s = open_session(model, ct_slab)
    s.add_prompt(2, points=[[64, 64]], labels=[1])
    frames_of(s.propagate("both"))
    bank = s.memory_bank(1)
    old = {e.frame: e for e in bank.entries}
    assert 6 in old and {0, 1} <= set(old)
    s.add_prompt(6, points=[[30, 90], [64, 64]], labels=[0, 1])
    assert 6 not in bank.frames(), "a corrected slice conditions; it leaves the bank at once"
    before = len(s.memory_trace())
    assert frames_of(s.propagate("both", start=6, until="conditioning")) == [7, 8, 9, 6, 5, 4, 3]
    new = {e.frame: e for e in bank.entries}
    assert 6 not in new
    for f in (0, 1):  # outside the span: the very same memories
        assert new[f] is old[f]
    outputs = own_outputs(s, 1)
    for f in (3, 4, 5, 7, 8, 9):  # redone: a fresh memory, of the new result, or none
        assert f not in new or (new[f] is not old.get(f) and new[f].payload["maskmem_features"]
                                is outputs[f]["maskmem_features"])
    # no frame of a pass read a memory of a slice that pass had not redone yet
    # (the forward pass may read slices 3..5 as they stand, as SAM2 does, before the backward redoes them)
    redone, spans = set(), {"forward": {7, 8, 9}, "backward": {3, 4, 5}}
    for r in s.memory_trace()[before:]:
        stale = {e["frame"] for e in r["recalled"]} & (spans[r["direction"]] - redone)
        assert not stale, f"frame {r['frame']} ({r['direction']}) read stale memories {stale}"
        redone.add(r["frame"])


def test_a_retracked_frame_never_reads_its_own_earlier_memory(model, ct_slab):
    # refine from a slice that is not prompted: it already has a bank entry
    s = open_session(model, ct_slab)
    s.add_prompt(2, points=[[64, 64]], labels=[1])
    frames_of(s.propagate("both"))
    assert 6 in s.memory_bank(1).frames()
    before = len(s.memory_trace())
    frames_of(s.propagate("both", start=6, until="conditioning"))
    redo = s.memory_trace()[before:]
    assert [r["frame"] for r in redo if r["frame"] == 6] == [6, 6]  # forward, then backward again
    for r in redo:
        assert r["frame"] not in r["attended"], f"frame {r['frame']} ({r['direction']}) read its own memory"

    # a second object prompted on an earlier slice: the first object is re-tracked from there
    s = open_session(model, ct_slab)
    s.add_prompt(5, obj_id=1, points=[[64, 64]], labels=[1])
    frames_of(s.propagate("both"))
    assert 2 in s.memory_bank(1).frames()
    s.add_prompt(2, obj_id=2, points=[[30, 40]], labels=[1])
    frames_of(s.propagate("both"))
    for r in s.memory_trace():
        assert r["frame"] not in r["attended"], f"object {r['obj_id']} frame {r['frame']} read its own memory"


def bank_state(bank):
    return list(bank.entries), bank.rng_state().clone()


def same_entries(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@pytest.mark.parametrize("read", ["topk", "softmax"])
def test_undo_restores_the_bank_and_redo_gives_the_same_masks_and_bank(model, ct_slab, read):
    def started():
        s = open_session(model, ct_slab, read=read)
        s.add_prompt(2, points=[[64, 64]], labels=[1])
        frames_of(s.propagate("both"))
        return s

    s, reference = started(), started()
    bank = s.memory_bank(1)
    assert 6 in bank.frames()
    entries, rng = bank_state(bank)
    masks = s.mask(1)

    first = s.add_prompt(6, points=[[30, 90]], labels=[0])
    corrected_entries, _ = bank_state(bank)
    s.clear_prompts(6, 1)  # undo
    undone_entries, undone_rng = bank_state(bank)
    assert same_entries(undone_entries, entries), "undo puts the frame's memory back, in its place"
    assert torch.equal(undone_rng, rng)
    np.testing.assert_array_equal(s.mask(1), masks)

    again = s.add_prompt(6, points=[[30, 90]], labels=[0])  # redo
    np.testing.assert_array_equal(again, first)
    assert same_entries(bank_state(bank)[0], corrected_entries)

    # from here on the session behaves as one that never undid anything
    reference.add_prompt(6, points=[[30, 90]], labels=[0])
    frames_of(s.propagate("both", start=6))
    frames_of(reference.propagate("both", start=6))
    np.testing.assert_array_equal(s.mask(1), reference.mask(1))
    ref_bank = reference.memory_bank(1)
    assert [(e.frame, e.confidence) for e in bank.entries] == [(e.frame, e.confidence) for e in ref_bank.entries]


def test_an_empty_bank_reads_only_the_prompted_frames_and_the_trace_says_so(model, ct_slab):
    s = model.open(ct_slab, memory_bank={"min_confidence": 1.0})  # nothing is ever confident enough
    s.add_prompt(4, points=[[64, 64]], labels=[1])
    frames_of(s.propagate("both"))
    trace = s.memory_trace()
    assert trace and len(s.memory_bank(1)) == 0
    for r in trace:
        assert r["bank_empty"] and r["attended"] == [4] and r["recalled"] == [] and r["bank"] == []
        assert r["admission"] in ("rejected: low confidence", "rejected: object absent")
