"""The self-sorting memory bank's rules, on hand-made entries with known similarities."""

import math

import pytest
import torch

from medsam2.tracking.memory_bank import BankParams, MemoryEntry, SelfSortingMemoryBank, unit


def direction(deg):
    """A unit vector in the plane at `deg` degrees: cos similarity between two = cos(angle between)."""
    r = math.radians(deg)
    return unit(torch.tensor([math.cos(r), math.sin(r), 0.0]))


def entry(frame, confidence, mem_deg=0.0, img_deg=0.0):
    return MemoryEntry(frame=frame, confidence=confidence, memory_descriptor=direction(mem_deg),
                       image_descriptor=direction(img_deg))


def test_low_confidence_is_not_admitted():
    bank = SelfSortingMemoryBank(capacity=4, min_confidence=0.5)
    assert bank.admit(entry(1, 0.49)) == "rejected: low confidence"
    assert bank.admit(entry(2, 0.5)) == "admitted"
    assert bank.frames() == [2]


def test_admits_until_full():
    bank = SelfSortingMemoryBank(capacity=3)
    for f in range(3):
        assert bank.admit(entry(f, 0.9, mem_deg=10 * f)) == "admitted"
    assert len(bank) == 3


def test_full_bank_replaces_redundant_neighbour_with_novel_entry():
    # entries at 0, 5 and 90 degrees: 0 and 5 are near-duplicates
    bank = SelfSortingMemoryBank(capacity=3, replace_margin=0.1)
    bank.admit(entry(1, 0.9, mem_deg=0))
    bank.admit(entry(2, 0.8, mem_deg=5))
    bank.admit(entry(3, 0.9, mem_deg=90))
    # new at 180: least similar A = entry 1 (0 deg, sim -1); A's most similar B = entry 2 (sim cos 5)
    # sim(new, A) = -1 < sim(A, B) = 0.996 and conf 0.75 > 0.8 - 0.1 -> B (frame 2) replaced
    assert bank.admit(entry(4, 0.75, mem_deg=180)) == "replaced 2"
    assert sorted(bank.frames()) == [1, 3, 4]


def test_full_bank_keeps_confident_entry_over_weaker_newcomer():
    bank = SelfSortingMemoryBank(capacity=3, replace_margin=0.1)
    bank.admit(entry(1, 0.9, mem_deg=0))
    bank.admit(entry(2, 0.95, mem_deg=5))
    bank.admit(entry(3, 0.9, mem_deg=90))
    # same geometry, but conf(new)=0.8 is not > conf(B)=0.95 - 0.1
    assert bank.admit(entry(4, 0.8, mem_deg=180)) == "rejected: redundant"
    assert sorted(bank.frames()) == [1, 2, 3]


def test_full_bank_rejects_newcomer_close_to_everything():
    # three mutually orthogonal memories (pairwise similarity 0); the newcomer lies between them all
    axes = [torch.tensor(v, dtype=torch.float32) for v in ([1, 0, 0], [0, 1, 0], [0, 0, 1])]
    bank = SelfSortingMemoryBank(capacity=3)
    for f, v in enumerate(axes):
        bank.admit(MemoryEntry(f, 0.9, unit(v), unit(v)))
    middle = unit(torch.tensor([1.0, 1.0, 1.0]))
    # A = least similar to new (sim 0.577), B = A's nearest other (sim 0): 0.577 >= 0 -> not novel
    assert bank.admit(MemoryEntry(9, 0.99, middle, middle)) == "rejected: redundant"
    assert bank.frames() == [0, 1, 2]


def test_reread_frame_replaces_its_own_older_memory():
    bank = SelfSortingMemoryBank(capacity=4)
    bank.admit(entry(7, 0.6, mem_deg=0))
    bank.admit(entry(7, 0.9, mem_deg=40))
    assert bank.frames() == [7] and bank.entries[0].confidence == 0.9


def test_read_topk_most_similar_first_and_deterministic():
    bank = SelfSortingMemoryBank(capacity=8)
    for f, img in [(1, 80), (2, 10), (3, 40), (4, 10), (5, 170)]:
        bank.admit(entry(f, 0.9, mem_deg=20 * f, img_deg=img))
    picked = bank.read(direction(0), k=3)
    # similarities: frames 2 and 4 at 10 deg (tie -> lower frame first), then 3 at 40
    assert [e.frame for e in picked] == [2, 4, 3]
    assert [e.frame for e in bank.read(direction(0), k=3)] == [2, 4, 3]
    assert [e.frame for e in bank.read(direction(0), k=10)] == [2, 4, 3, 1, 5]


def test_read_softmax_is_seeded_and_ranked():
    def picks(seed):
        bank = SelfSortingMemoryBank(BankParams(capacity=8, read="softmax", temperature=0.5, seed=seed))
        for f in range(6):
            bank.admit(entry(f, 0.9, mem_deg=30 * f, img_deg=30 * f))
        return [[e.frame for e in bank.read(direction(0), k=3)] for _ in range(5)]

    assert picks(1) == picks(1)  # same seed, same draws
    draws = picks(1) + picks(2) + picks(3)
    assert len({tuple(d) for d in draws}) > 1  # it does sample
    query = direction(0)
    for d in draws:  # each draw is ordered most similar first
        sims = [float(direction(30 * f) @ query) for f in d]
        assert sims == sorted(sims, reverse=True)


def test_discard_and_params_validation():
    bank = SelfSortingMemoryBank(capacity=4)
    for f in range(3):
        bank.admit(entry(f, 0.9, mem_deg=40 * f))
    bank.discard([0, 2])
    assert bank.frames() == [1]
    with pytest.raises(ValueError, match="capacity"):
        BankParams(capacity=0)
    with pytest.raises(ValueError, match="read"):
        BankParams(read="random")


def test_low_confidence_resegmentation_still_removes_the_stale_entry():
    # admit frame 7 at 0.9, re-segment it at 0.3: the 0.9 memory described a mask that is gone
    bank = SelfSortingMemoryBank(capacity=4, min_confidence=0.5)
    bank.admit(entry(3, 0.9, mem_deg=60))
    assert bank.admit(entry(7, 0.9, mem_deg=0)) == "admitted"
    assert bank.admit(entry(7, 0.3, mem_deg=20)) == "rejected: low confidence"
    assert bank.frames() == [3]


def test_object_absent_frames_never_enter_even_without_a_threshold():
    bank = SelfSortingMemoryBank(capacity=4, min_confidence=0.0)
    absent = entry(5, 0.0)
    absent.object_present = False
    assert bank.admit(absent) == "rejected: object absent"
    assert bank.admit(entry(6, 0.0)) == "admitted"  # present with confidence 0 passes a 0 threshold
    assert bank.frames() == [6]


def test_a_frame_never_reads_its_own_entry():
    bank = SelfSortingMemoryBank(capacity=8)
    for f, img in [(1, 0), (2, 30), (3, 60)]:
        bank.admit(entry(f, 0.9, mem_deg=40 * f, img_deg=img))
    # frame 1 is the most similar to this query (identical image): it is skipped for frame 1 only
    assert [r.frame for r in bank.read(direction(0), k=3, frame=1)] == [2, 3]
    assert [r.frame for r in bank.read(direction(0), k=3, frame=9)] == [1, 2, 3]
    picked = bank.read(direction(0), k=1, frame=9)[0]
    assert picked.similarity == pytest.approx(1.0) and picked.entry is bank.entries[0]


def test_capacity_is_strict_and_one_entry_banks_keep_the_more_confident():
    bank = SelfSortingMemoryBank(capacity=1, replace_margin=0.1)
    assert bank.admit(entry(1, 0.8)) == "admitted"
    assert bank.admit(entry(2, 0.6)) == "rejected: redundant"  # 0.6 is not > 0.8 - 0.1
    assert bank.admit(entry(3, 0.75)) == "replaced 1"
    assert bank.frames() == [3]
    big = SelfSortingMemoryBank(capacity=3)
    for f in range(20):
        big.admit(entry(f, 0.9, mem_deg=17 * f))
        assert len(big) <= 3


def test_take_and_put_back_restore_the_bank_exactly():
    bank = SelfSortingMemoryBank(BankParams(capacity=3, read="softmax", seed=4))
    for f in range(3):
        bank.admit(entry(f, 0.9, mem_deg=50 * f, img_deg=30 * f))
    before, state = list(bank.entries), bank.rng_state()
    position, taken = bank.take(1)
    assert position == 1 and bank.frames() == [0, 2]
    first_draws = [r.frame for r in bank.read(direction(0), k=2)]
    assert bank.put_back(position, taken)
    bank.set_rng_state(state)
    assert bank.entries == before  # the same entries, in the same order
    bank.take(1)
    assert [r.frame for r in bank.read(direction(0), k=2)] == first_draws  # the same draw again
    bank.put_back(1, taken)
    assert not bank.put_back(1, taken), "a frame never has two entries"
    bank.take(0)
    bank.admit(entry(9, 0.9, mem_deg=170))
    assert not bank.put_back(0, before[0]), "a bank filled since keeps its capacity"
