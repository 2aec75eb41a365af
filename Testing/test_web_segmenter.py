"""The web shell's adapter to MedSAM2Lib (MedSAM2Web.segmenter) on a real slicer-core scene with
the real engine (random weights, 256 px): local, and through a real `medsam2 serve` app on
127.0.0.1. No browser: this is the part the page's 40 ms timer drives.

What the page relies on: actions queue, the engine works in its own process, and `poll()` only
applies what it has finished, never holding the event loop (so the page redraws, the progress bar
moves and Cancel works while slices come); errors come back as messages instead of exceptions; the
prompt reported to the status endpoint is the voxel the user clicked; a remote engine gives the
same masks as the local one.
"""

import time

import warnings

import numpy as np
import pytest

import slicer_fixtures as sf

warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")

AXIAL = (0.0, 0.0, 1.0)
SHAPE = (9, 40, 44)  # K, J, I
CENTER = (4, 20, 22)


def settings(checkpoint, **kw):
    from MedSAM2Lib.models import ModelSettings  # the Slicer module's own settings type

    return ModelSettings(name="sam2.1_hiera_tiny", checkpoint=str(checkpoint), device="cpu", image_size=256,
                         allow_random=True, **kw)


class Recorder:
    def __init__(self):
        self.errors, self.messages = [], []


def make_segmenter(engine_settings):
    from MedSAM2Web.segmenter import Segmenter

    rec = Recorder()
    seg = Segmenter(engine_settings, on_error=rec.errors.append, on_message=rec.messages.append)
    seg.start()
    return seg, rec


@pytest.fixture(scope="module")
def local(random_checkpoint):
    seg, rec = make_segmenter(settings(random_checkpoint))
    yield seg, rec
    seg.shutdown()


def scene_with_blob(spacing=(0.8, 0.7, 2.5), rotation=np.eye(3)):
    scene = sf.new_scene()
    values = sf.blob_volume(SHAPE, CENTER, (3, 9, 11))
    volume = sf.add_volume(scene, values, sf.matrix4(rotation, spacing, (10.0, -5.0, 30.0)), window=(-900.0, 500.0))
    segmentation, (first, second) = sf.add_segmentation(scene, volume)
    return scene, volume, segmentation, first, second


def run_until_idle(seg, timeout=180.0):
    """Poll as the page's timer does until the queued actions are done; returns the slowest poll."""
    deadline, slowest = time.monotonic() + timeout, 0.0
    while seg.busy:
        began = time.perf_counter()
        seg.poll()
        slowest = max(slowest, time.perf_counter() - began)
        assert time.monotonic() < deadline, "the action never finished"
        time.sleep(0.005)
    return slowest


def filled(scene, segmentation, segment_id, volume):
    mask = sf.segment_array(scene, segmentation, segment_id, volume)
    return {int(k) for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))}


def filled_of(mask):
    return set(np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)))


def test_poll_never_holds_the_loop_slices_appear_as_they_come_and_cancel_keeps_them(local):
    seg, rec = local
    scene, volume, segmentation, segment_id, _ = scene_with_blob()
    seg.select(volume, segmentation, segment_id)
    seg.place_point(sf.ijk_to_ras(volume, CENTER[::-1]), AXIAL)
    assert seg.busy and not seg.can_undo  # queued: nothing ran yet
    assert run_until_idle(seg) < 0.05, "a poll applies what arrived; the engine computes elsewhere"
    assert filled(scene, segmentation, segment_id, volume) == {CENTER[0]} and rec.errors == []

    seg.propagate("both")
    seen, deadline = [filled(scene, segmentation, segment_id, volume)], time.monotonic() + 120
    while len(seen[-1]) < 3:  # the page sees slices one after another, not all at the end
        seg.poll()
        now = filled(scene, segmentation, segment_id, volume)
        if now != seen[-1]:
            seen.append(now)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert len(seen) >= 3 and seg.busy and seg.progress.maximum == SHAPE[0]
    assert not seg.undo() and rec.messages[-1].startswith("MedSAM2 is still working")
    seg.cancel()
    run_until_idle(seg)
    done = filled(scene, segmentation, segment_id, volume)
    assert CENTER[0] in done and 1 < len(done) < SHAPE[0]
    assert rec.messages[-1].startswith("Cancelled after")
    assert seg.undo() and filled(scene, segmentation, segment_id, volume) == {CENTER[0]}
    assert seg.redo() and filled(scene, segmentation, segment_id, volume) == done


def test_up_within_a_slice_range_stays_there(local):
    """The page's direction and slice-range controls reach the propagation ('up' = along the view normal)."""
    seg, rec = local
    scene, volume, segmentation, segment_id, _ = scene_with_blob()
    seg.select(volume, segmentation, segment_id)
    seg.place_point(sf.ijk_to_ras(volume, CENTER[::-1]), AXIAL)
    seg.propagate("up", slice_range=(CENTER[0] - 3, CENTER[0] + 2))
    run_until_idle(seg)
    assert rec.errors == []
    up = filled(scene, segmentation, segment_id, volume)
    assert up == set(range(CENTER[0], CENTER[0] + 3))  # volume k grows along +S here: up is k + 1, k + 2
    seg.propagate("down", slice_range=(CENTER[0] - 1, CENTER[0] + 2))
    run_until_idle(seg)
    assert filled(scene, segmentation, segment_id, volume) == up | {CENTER[0] - 1}


def test_an_action_stays_with_the_segment_it_was_asked_for(local):
    """A click queued behind a running action still goes to the segment selected at the click."""
    seg, rec = local
    scene, volume, segmentation, first, second = scene_with_blob()
    seg.select(volume, segmentation, first)
    seg.place_point(sf.ijk_to_ras(volume, CENTER[::-1]), AXIAL)
    seg.select(volume, segmentation, second)  # the user picks another segment before it ran
    run_until_idle(seg)
    assert filled(scene, segmentation, first, volume) == {CENTER[0]}
    assert filled(scene, segmentation, second, volume) == set()
    assert seg.last_prompt["segment"] == first and not seg.can_undo  # the second segment has nothing to undo


def test_errors_come_back_as_messages_and_the_next_action_still_runs(local):
    seg, rec = local
    scene, volume, segmentation, segment_id, _ = scene_with_blob()
    seg.select(volume, segmentation, segment_id)
    rec.errors.clear()
    seg.place_point(sf.ijk_to_ras(volume, (500, 20, 4)), AXIAL)  # far outside the volume
    seg.propagate("both")  # nothing to propagate yet: refused too
    run_until_idle(seg)
    assert "outside" in rec.errors[0] and "Nothing to propagate" in rec.errors[1]
    seg.place_point(sf.ijk_to_ras(volume, CENTER[::-1]), AXIAL)
    run_until_idle(seg)
    assert filled(scene, segmentation, segment_id, volume) == {CENTER[0]} and len(rec.errors) == 2


def test_the_reported_prompt_is_the_clicked_voxel_on_a_rotated_volume(local):
    """last_prompt (the status endpoint's) is the engine's prompt mapped back to IJK."""
    seg, _ = local
    scene, volume, segmentation, segment_id, _ = scene_with_blob(rotation=np.diag([-1.0, 1.0, -1.0]) @ sf.rotation(2, 90))
    normal = tuple(sf.ijk_to_ras(volume, (0, 0, 1)) - sf.ijk_to_ras(volume, (0, 0, 0)))
    seg.select(volume, segmentation, segment_id)
    target = (25, 17, 4)
    seg.place_point(sf.ijk_to_ras(volume, target), normal, include=False)
    seg.place_box(sf.ijk_to_ras(volume, (15, 12, 4)), sf.ijk_to_ras(volume, (30, 28, 4)), normal)
    count, deadline = seg.prompt_count, time.monotonic() + 120
    while seg.prompt_count == count:  # the point's result arrives first
        seg.poll()
        assert time.monotonic() < deadline
    prompt = seg.last_prompt
    assert prompt["kind"] == "exclude point" and prompt["points"][0]["label"] == 0
    np.testing.assert_allclose(prompt["points"][0]["ijk"], target, atol=1e-6)
    run_until_idle(seg)
    box = np.sort(np.asarray(seg.last_prompt["box"]), axis=0)
    np.testing.assert_allclose(box, [(15, 12, 4), (30, 28, 4)], atol=1e-6)
    assert seg.last_prompt["number"] == prompt["number"] + 1


def test_a_remote_engine_gives_the_same_masks_as_the_local_one(local, model):
    from remote_fixtures import TOKEN, ServerThread

    from medsam2.remote.server import create_app

    server = ServerThread(create_app(model, token=TOKEN, max_sessions=4, session_ttl=600, max_upload_mb=16))
    try:
        from MedSAM2Lib.models import ModelSettings

        remote, rec = make_segmenter(ModelSettings(name="sam2.1_hiera_tiny", server_url=server.url, token=TOKEN,
                                                   allow_random=True))
        masks = []
        for seg in (local[0], remote):
            scene, volume, segmentation, segment_id, _ = scene_with_blob()
            seg.select(volume, segmentation, segment_id)
            seg.place_point(sf.ijk_to_ras(volume, CENTER[::-1]), AXIAL)
            seg.propagate("both", slice_range=(CENTER[0] - 2, CENTER[0] + 2))
            run_until_idle(seg)
            masks.append(sf.segment_array(scene, segmentation, segment_id, volume))
        assert rec.errors == [] and len(filled_of(masks[0])) == 5
        np.testing.assert_array_equal(masks[0], masks[1])
        remote.shutdown()
    finally:
        server.stop()


def test_a_wrong_server_token_fails_at_start_saying_so(model):
    from remote_fixtures import TOKEN, ServerThread

    from medsam2.errors import MedSAM2Error
    from medsam2.remote.server import create_app
    from MedSAM2Lib.models import ModelSettings
    from MedSAM2Web.segmenter import Segmenter

    server = ServerThread(create_app(model, token=TOKEN, max_sessions=1, session_ttl=60, max_upload_mb=1))
    try:
        with pytest.raises(MedSAM2Error, match="token"):
            Segmenter(ModelSettings(name="x", server_url=server.url, token="wrong")).start()
    finally:
        server.stop()
