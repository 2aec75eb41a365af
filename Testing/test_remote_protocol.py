"""The remote protocol against a real uvicorn on 127.0.0.1: a remote session gives the local one's
masks, only changed masks travel, volumes travel once, one GPU lock serves clients in turn, and
a client re-opens a session the server lost.
"""

import json
import threading
import time

import httpx
import numpy as np
import pytest

import medsam2
from medsam2.errors import SessionExpired
from medsam2.remote import wire
from medsam2.remote.client import SessionReopened
from medsam2.remote.server import create_app
from remote_fixtures import (AUTH, TOKEN, ServerThread, assert_healthy, client, make_volume, same_frames,  # noqa: F401
                             server, wait_until)


def test_openapi_health_and_info(server, client):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    for path in ("/v1/health", "/v1/info", "/v1/volumes/{digest}", "/v1/sessions", "/v1/sessions/{sid}/prompts",
                 "/v1/sessions/{sid}/propagate", "/v1/sessions/{sid}/masks"):
        assert path in spec["paths"], path
    assert httpx.get(f"{server.url}/docs", timeout=10).status_code == 200
    assert_healthy(server.url)  # no token needed for liveness
    info = client.refresh_info()
    assert info["version"] == medsam2.__version__
    assert info["model"] == "sam2.1_hiera_tiny" and info["image_size"] == 256 and info["device"] == "cpu"
    assert info["weights_are_random"] is True and client.weights_are_random
    assert info["sessions"]["max"] == 6 and info["sessions"]["free"] <= 6


def test_local_and_remote_sessions_give_identical_masks(model, client):
    vol = make_volume(slices=6)
    local = model.open(vol)
    remote = client.open(vol)
    assert (remote.num_frames, remote.frame_shape) == (local.num_frames, local.frame_shape)
    for p in (dict(frame=2, obj_id=1, points=[[33, 30], [10, 10]], labels=[1, 0]),
              dict(frame=3, obj_id=2, box=(24, 20, 44, 42))):
        want, got = local.add_prompt(**p), remote.add_prompt(**p)
        assert got.dtype == np.bool_ and got.shape == vol.shape[1:]
        assert np.array_equal(got, want)
    assert remote.obj_ids == local.obj_ids == [1, 2]
    same_frames(list(remote.propagate()), list(local.propagate()))

    # a correction (a hand-edited slice), then re-propagation of its span only
    edited = np.zeros(vol.shape[1:], bool)
    edited[25:35, 28:40] = True
    assert np.array_equal(remote.add_prompt(4, obj_id=1, mask=edited), local.add_prompt(4, obj_id=1, mask=edited))
    same_frames(list(remote.propagate(direction="forward", start=4)),
                list(local.propagate(direction="forward", start=4)))
    for obj in (1, 2):
        got = remote.mask(obj)
        assert got.dtype == np.bool_ and got.shape == vol.shape
        assert np.array_equal(got, local.mask(obj))
    labels = remote.masks()
    assert labels.dtype == np.uint16 and np.array_equal(labels, local.masks())
    assert labels.any(), "the comparison needs some foreground to mean anything"
    for frame in (0, 4):
        got, want = remote.frame_masks(frame), local.frame_masks(frame)
        assert sorted(got) == sorted(want) and all(np.array_equal(got[o], want[o]) for o in want)

    remote.remove_object(2)
    local.remove_object(2)
    assert remote.obj_ids == local.obj_ids == [1]
    assert np.array_equal(remote.masks(), local.masks())
    remote.clear_prompts(4, 1)
    local.clear_prompts(4, 1)
    same_frames(list(remote.propagate(direction="backward")), list(local.propagate(direction="backward")))
    assert np.array_equal(remote.masks(), local.masks())
    remote.reset()
    local.reset()
    assert remote.obj_ids == local.obj_ids == []
    assert not remote.masks().any()
    remote.close()


def test_unchanged_frames_travel_as_digests_and_missed_ones_are_fetched(model, client, server):
    vol = make_volume(slices=6, seed=1)
    local, remote = model.open(vol), client.open(vol)
    for s in (local, remote):
        s.add_prompt(2, obj_id=1, points=[[33, 30]], labels=[1])
    same_frames(list(remote.propagate()), list(local.propagate()))

    # raw stream: the prompted frame's mask has not changed since the client got it, so it comes
    # back as a digest only (twice: "both" starts both passes there); re-tracked frames in full
    r = httpx.post(f"{server.url}/v1/sessions/{remote.id}/propagate", json={}, headers=AUTH, timeout=60)
    events = [json.loads(line) for line in r.text.splitlines() if line]
    frames = [e for e in events if e["type"] == "frame"]
    end = events[-1]
    assert {k: end[k] for k in ("type", "frames", "cancelled")} == {"type": "end", "frames": len(frames), "cancelled": False}
    # where and why each pass stopped
    assert {d["direction"]: d["reason"] for d in end["report"]["directions"]} == {"forward": "end", "backward": "end"}
    assert [e["frame"] for e in frames] == [3, 4, 5, 2, 1, 0]  # each frame once; the prompted one backwards
    local_frames = dict(local.propagate())
    for e in frames:
        enc = e["masks"]["1"]
        want = local_frames[e["frame"]][1]
        if e["frame"] == 2:
            assert set(enc) == {"same"} and enc["same"] == wire.mask_bits(want)[1]
        elif "bits" in enc:
            assert np.array_equal(wire.decode_mask(enc), want)
        else:  # unchanged since the first run
            assert enc["same"] == wire.mask_bits(want)[1]

    # a client that lost its copies (e.g. a cancelled stream) fetches the frames it lacks
    remote._mirror.clear()
    fetched = []
    original = remote._fetch_frame
    remote._fetch_frame = lambda f: fetched.append(f) or original(f)
    same_frames(list(remote.propagate()), list(local.propagate()))
    assert 2 in fetched
    remote.close()


def test_the_same_volume_is_uploaded_once(client, server):
    vol = make_volume(seed=2)
    digest = wire.volume_digest(vol)
    assert httpx.head(f"{server.url}/v1/volumes/{digest}", headers=AUTH, timeout=10).status_code == 404
    before = server.state.stats["uploads"]
    a = client.open(vol)
    b = client.open(vol.copy())
    assert server.state.stats["uploads"] == before + 1
    assert a.id != b.id
    assert httpx.head(f"{server.url}/v1/volumes/{digest}", headers=AUTH, timeout=10).status_code == 200
    # the same voxels in another dtype are another volume
    assert wire.volume_digest(vol.astype(np.float32)) != digest
    a.close()
    b.close()


def test_volumes_no_session_uses_are_kept_only_up_to_twice_the_upload_limit(server, client):
    # the module's server takes 1 MiB uploads: at most 2 MiB of unused volumes stay cached
    vols = [np.full((16, 128, 128), i, np.float32) for i in range(3)]  # 1 MiB each
    digests = [client.upload(v)[0] for v in vols]
    here = [httpx.head(f"{server.url}/v1/volumes/{d}", headers=AUTH, timeout=10).status_code for d in digests]
    assert here == [404, 200, 200], "the least recently used unused volume goes first"
    session = client.open(vols[0])  # re-uploaded transparently when evicted
    assert session.num_frames == 16
    session.close()


def test_client_cancel_and_break_stop_the_server_keeping_finished_frames(model, server, client):
    vol = make_volume(slices=12, seed=7)
    session = client.open(vol)
    session.add_prompt(0, points=[[33, 30]], labels=[1])
    state = server.state
    for how in ("event", "break"):
        cancel = threading.Event()
        done_before = state.stats["propagations"]
        cancelled_before = state.stats["propagations_cancelled"]
        got = []
        for frame, masks in session.propagate(direction="forward", cancel=cancel):
            got.append((frame, masks[1]))
            if len(got) == 2:
                if how == "event":
                    cancel.set()  # the generator must yield nothing more
                else:
                    break
        assert len(got) == 2
        wait_until(lambda: state.stats["propagations"] > done_before, 15, "the propagation to stop")
        assert state.stats["propagations_cancelled"] == cancelled_before + 1
        assert not state.gpu.locked()
        kept = session.mask(1)
        for frame, mask in got:  # finished frames are kept on the server
            assert np.array_equal(kept[frame], mask)
    assert_healthy(server.url)


def test_two_clients_propagating_at_once_are_served_in_turn(model, server):
    vol = make_volume(seed=8)
    local = model.open(vol)
    local.add_prompt(3, points=[[33, 30]], labels=[1])
    want = list(local.propagate())
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(name):
        try:
            with medsam2.connect(server.url, token=TOKEN) as remote:
                session = remote.open(vol)
                session.add_prompt(3, points=[[33, 30]], labels=[1])
                barrier.wait(timeout=30)
                frames = []
                for frame, masks in session.propagate():
                    frames.append((frame, masks, time.monotonic()))
                results[name] = frames
                session.close()
        except Exception as exc:  # reported below, with the other thread's outcome
            errors.append((name, exc))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(results) == ["a", "b"]
    for frames in results.values():
        same_frames([(f, m) for f, m, _ in frames], want)
    # one GPU lock: one propagation ran entirely before the other began
    a, b = results["a"], results["b"]
    first, second = (a, b) if a[0][2] < b[0][2] else (b, a)
    assert first[-1][2] <= second[0][2], "the two propagations interleaved on the GPU"
    assert_healthy(server.url)


def test_server_restart_expires_sessions_and_the_client_can_reopen(model):
    vol = make_volume(seed=9)
    srv = ServerThread(create_app(model, token=TOKEN))
    port = srv.port
    try:
        strict = medsam2.connect(srv.url, token=TOKEN, auto_reopen=False)
        easy = medsam2.connect(srv.url, token=TOKEN)
        s1, s2 = strict.open(vol), easy.open(vol)
        for s in (s1, s2):
            s.add_prompt(3, points=[[33, 30]], labels=[1])
            list(s.propagate(direction="forward"))
        srv.stop()
        srv = ServerThread(create_app(model, token=TOKEN), port=port)  # same address, empty memory
        assert_healthy(srv.url)

        with pytest.raises(SessionExpired, match="session expired, re-open"):
            s1.add_prompt(4, points=[[30, 30]], labels=[1])
        with pytest.raises(SessionExpired, match="session expired, re-open"):
            s1.propagate()
        assert s1.reopen() == 1  # volume re-uploaded, the one prompt replayed
        assert srv.state.stats["uploads"] == 1

        with pytest.warns(SessionReopened, match="replayed 1 prompt.* and 1 propagation"):
            got = s2.add_prompt(4, points=[[30, 30]], labels=[1])  # transparent
        local = model.open(vol)  # the same history, with no restart: a correction after a propagation
        local.add_prompt(3, points=[[33, 30]], labels=[1])
        list(local.propagate(direction="forward"))
        assert np.array_equal(got, local.add_prompt(4, points=[[30, 30]], labels=[1]))
        same_frames(list(s2.propagate()), list(local.propagate()))
        assert s1.add_prompt(4, points=[[30, 30]], labels=[1]).shape == (64, 64)
        assert_healthy(srv.url)
        strict.close()
        easy.close()
    finally:
        srv.stop()


def test_slicer_refuses_a_server_running_random_weights_unless_allowed(server):
    """A remote model is refused on the same grounds as a local random checkpoint."""
    from medsam2.errors import CheckpointError

    from MedSAM2Lib import ModelSettings

    settings = ModelSettings(name="sam2.1_hiera_tiny", server_url=server.url, token=TOKEN)
    engine = settings.create_engine()
    try:
        with pytest.raises(CheckpointError, match=f"server at {server.url} holds random test weights"):
            engine.wait_ready(timeout=120)
    finally:
        engine.close()
    allowed = ModelSettings(**{**settings.__dict__, "allow_random": True}).create_engine()
    try:
        assert allowed.wait_ready(timeout=120)["weights_are_random"]
    finally:
        allowed.close()
    assert_healthy(server.url)