"""Remote server and client against a real uvicorn on 127.0.0.1 (issue 4).

The engine is the real one (random checkpoint at 256 px, the `model` fixture); each server runs
uvicorn in a thread on a free port. Every fault row ends with a health check: the server must
still answer after it.
"""

import json
import logging
import select
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

import medsam2
from medsam2.remote import wire
from medsam2.remote.client import SessionReopened
from medsam2.errors import InputError, ServerError, SessionExpired
from medsam2.remote.server import create_app

TOKEN = "tok-7f3a9c1e5b"  # distinctive, so finding it in logs is unambiguous
WRONG_TOKEN = "wrong-tok-42d8e6"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_S = 0.02


class ServerThread:
    """uvicorn in a background thread on 127.0.0.1, on a free port (or a given one, for restarts)."""

    def __init__(self, app, port=0, log_level="warning"):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(POLL_S)

    @property
    def state(self):
        return self.app.state.medsam2

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.sock.close()


def assert_healthy(url):
    r = httpx.get(f"{url}/v1/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(POLL_S)


def make_volume(slices=8, seed=0, dtype=np.int16):
    """A small CT-like volume: noise plus a bright block the prompts land on."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 60, size=(slices, 64, 64))
    vol[:, 18:44, 22:46] += 600
    return vol.astype(dtype)


@pytest.fixture(scope="module")
def server(model):
    srv = ServerThread(create_app(model, token=TOKEN, max_sessions=6, session_ttl=600, max_upload_mb=1))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with medsam2.connect(server.url, token=TOKEN) as remote:
        yield remote


def same_frames(remote_frames, local_frames):
    assert [f for f, _ in remote_frames] == [f for f, _ in local_frames]
    for (frame, rm), (_, lm) in zip(remote_frames, local_frames):
        assert sorted(rm) == sorted(lm), f"objects differ on frame {frame}"
        for obj in lm:
            assert rm[obj].dtype == np.bool_ and rm[obj].shape == lm[obj].shape
            assert np.array_equal(rm[obj], lm[obj]), f"mask of object {obj} differs on frame {frame}"


# -- the protocol ---------------------------------------------------------------------------------
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
    assert events[-1] == {"type": "end", "frames": len(frames), "cancelled": False}
    assert [e["frame"] for e in frames] == [2, 3, 4, 5, 2, 1, 0]
    local_frames = dict(local.propagate())
    for e in frames:
        enc = e["masks"]["1"]
        want = local_frames[e["frame"]][1]
        if e["frame"] == 2:
            assert set(enc) == {"same"} and enc["same"] == wire.pack_mask(want)[1]
        elif "bits" in enc:
            assert np.array_equal(wire.decode_mask(enc), want)
        else:  # unchanged since the first run
            assert enc["same"] == wire.pack_mask(want)[1]

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


# -- what it must survive -------------------------------------------------------------------------
@pytest.fixture()
def logged():
    """Everything the server's and uvicorn's loggers emit while the test runs."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "medsam2", "medsam2.remote.server", "medsam2.remote.client"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield lines
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_missing_or_wrong_token_is_401_and_tokens_never_logged(model, logged, capfd):
    srv = ServerThread(create_app(model, token=TOKEN), log_level="debug")
    try:
        for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"}, {"Authorization": WRONG_TOKEN}):
            r = httpx.get(f"{srv.url}/v1/info", headers=headers, timeout=10)
            assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert "token" in r.json()["message"] and WRONG_TOKEN not in r.text
        # an upload with a bad token is refused before its body is read
        r = httpx.put(f"{srv.url}/v1/volumes/{'0' * 64}", content=b"x" * 100_000, timeout=10,
                      headers={"Authorization": f"Bearer {WRONG_TOKEN}"})
        assert r.status_code == 401
        with pytest.raises(ServerError, match="401") as err:
            medsam2.connect(srv.url, token=WRONG_TOKEN)
        assert WRONG_TOKEN not in str(err.value)
        with pytest.raises(ServerError, match="401"):
            medsam2.connect(srv.url)
        with medsam2.connect(srv.url, token=TOKEN) as remote:  # the right token works, end to end
            session = remote.open(make_volume(seed=3))
            session.add_prompt(1, points=[[33, 30]], labels=[1])
            session.close()
        assert srv.state.stats["unauthorized"] == 6
        assert_healthy(srv.url)
    finally:
        srv.stop()
    out, err = capfd.readouterr()
    text = "\n".join(logged) + out + err
    assert "/v1/info" in text, "the log capture must have seen the requests for this test to mean anything"
    assert TOKEN not in text and WRONG_TOKEN not in text


def test_malformed_json_is_422_with_a_message(server, client):
    session = client.open(make_volume())
    base = f"{server.url}/v1/sessions"
    r = httpx.post(base, content=b'{"volume": "abc",', headers={**AUTH, "Content-Type": "application/json"},
                   timeout=10)
    assert r.status_code == 422 and "not valid JSON" in r.json()["message"]
    r = httpx.post(f"{base}/{session.id}/prompts", json={"frame": "three", "points": [[1, 2]]}, headers=AUTH,
                   timeout=10)
    assert r.status_code == 422 and "frame" in r.json()["message"]
    r = httpx.post(f"{base}/{session.id}/prompts", json=[1, 2, 3], headers=AUTH, timeout=10)
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"
    r = httpx.post(f"{base}/{session.id}/prompts", json={"frame": 1, "points": [[1, 2]], "labels": [1],
                                                         "mask": {"shape": [64, 64], "bits": "!!not base64"}},
                   headers=AUTH, timeout=10)
    assert r.status_code == 400 and "base64" in r.json()["message"]
    session.close()
    assert_healthy(server.url)


def _put_volume(url, digest, body, dtype="<i2", shape="8,64,64", codec="zstd"):
    headers = {**AUTH, wire.DTYPE_HEADER: dtype, wire.SHAPE_HEADER: shape, wire.CODEC_HEADER: codec}
    return httpx.put(f"{url}/v1/volumes/{digest}", content=body, headers=headers, timeout=30)


def test_volume_body_that_is_not_what_its_header_says(server):
    vol = make_volume(seed=4)
    digest = wire.volume_digest(vol)
    raw = vol.tobytes()
    zstd = wire.encode_array(vol)[1]
    cases = [
        (dict(body=raw[:-10], codec="raw"), "shorter than its header"),
        (dict(body=raw + b"\0" * 10, codec="raw"), "longer than its header"),
        (dict(body=wire.encode_array(vol[:7])[1]), "shorter than its header"),
        (dict(body=wire.encode_array(np.concatenate([vol, vol[:1]]))[1]), "longer than its header"),
        (dict(body=b"definitely not zstd" * 10), "not valid zstd"),
        (dict(body=zstd, dtype="<i4", shape="4,64,64"), "does not match its digest"),  # same length, other array
        (dict(body=zstd, dtype="|O"), "unsupported dtype"),
        (dict(body=zstd, dtype="<c8"), "unsupported dtype"),
        (dict(body=zstd, shape="8,sixty-four,64"), "bad shape"),
        (dict(body=zstd, shape="8,64"), "must be 3D"),
    ]
    for kwargs, phrase in cases:
        r = _put_volume(server.url, digest, **kwargs)
        assert r.status_code == 400, (phrase, r.text)
        assert phrase in r.json()["message"], (phrase, r.text)
        assert_healthy(server.url)
    r = httpx.put(f"{server.url}/v1/volumes/not-a-digest", content=zstd, headers=AUTH, timeout=10)
    assert r.status_code == 400 and "sha256" in r.json()["message"]
    assert httpx.head(f"{server.url}/v1/volumes/{digest}", headers=AUTH, timeout=10).status_code == 404
    assert _put_volume(server.url, digest, zstd).status_code == 201  # the honest upload is accepted
    assert_healthy(server.url)


def test_nan_volume_is_refused_with_a_clear_message(model, client, server):
    vol = make_volume(dtype=np.float32)
    vol[2, 5, 7] = np.nan
    with pytest.raises(InputError, match="NaN") as remote_err:
        client.open(vol)
    assert "slice 2" in str(remote_err.value)
    with pytest.raises(InputError):  # the local engine refuses it too
        model.open(vol)
    assert_healthy(server.url)


def _raw_request(port, head, body_chunks=(), chunked=False, limit_s=10.0):
    """Send a request by hand; stop sending as soon as the server answers. -> (status, sent bytes, text)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit_s)
    try:
        sock.sendall(head.encode("latin-1"))
        sent, answer = 0, b""
        deadline = time.monotonic() + limit_s
        for chunk in body_chunks:
            assert time.monotonic() < deadline, "the server never answered"
            if select.select([sock], [], [], 0.005)[0]:  # answered: stop sending
                break
            data = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        while time.monotonic() < deadline:  # the server closes after an early refusal: read to the end
            if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            try:
                got = sock.recv(65536)
            except ConnectionResetError:  # it closed with our unread bytes pending; keep what came
                break
            if not got:
                break
            answer += got
        status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
        return status, sent, answer.decode("latin-1", "replace")
    finally:
        sock.close()


def test_oversized_upload_is_413_before_it_is_all_read(client, server):
    digest = "ab" * 32
    common = (f"PUT /v1/volumes/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
              f"{wire.DTYPE_HEADER}: <f4\r\n{wire.CODEC_HEADER}: raw\r\n")
    # 1. the header declares 64 MiB (limit 1 MiB): refused without a byte of body
    status, sent, text = _raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 64,512,512\r\nContent-Length: {64 << 20}\r\n\r\n")
    assert status == 413 and "exceeds the server's limit" in text and sent == 0
    assert_healthy(server.url)
    # 2. a plausible shape but a Content-Length of 50 MiB: refused before the body
    status, sent, text = _raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 4,256,256\r\nContent-Length: {50 << 20}\r\n\r\n")
    assert status == 413 and sent == 0
    assert_healthy(server.url)
    # 3. no length at all (chunked) and more bytes than allowed: counted while streaming
    chunk = b"\0" * (64 << 10)
    status, sent, text = _raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 4,256,256\r\nTransfer-Encoding: chunked\r\n\r\n",
        body_chunks=[chunk] * 512, chunked=True)  # offers 32 MiB
    assert status == 413, text
    assert sent < (4 << 20), f"the server took {sent} bytes before refusing"
    assert_healthy(server.url)
    # 4. the client says so before uploading anything
    with pytest.raises(InputError, match="max-upload-mb"):
        client.open(np.zeros((40, 128, 128), np.float32))  # 2.5 MiB
    # 5. an oversized JSON body is refused too, before it is read
    status, sent, text = _raw_request(
        server.port, f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {40 << 20}\r\n\r\n")
    assert status == 413 and "request body of 40.0 MiB exceeds" in text
    assert_healthy(server.url)


def test_prompts_out_of_range_are_400_with_the_engines_message(model, client, server):
    vol = make_volume()
    local, remote = model.open(vol), client.open(vol)
    bad = [
        dict(frame=3, points=[[64.7, 10]], labels=[1]),
        dict(frame=3, points=[[10, -3]], labels=[1]),
        dict(frame=8, points=[[10, 10]], labels=[1]),
        dict(frame=-1, box=(1, 1, 5, 5)),
        dict(frame=3, box=(1, 1, 5, 99)),
        dict(frame=3, points=[[10, 10]], labels=[2]),
        dict(frame=3, points=[[10, 10], [20, 20]], labels=[1]),
        dict(frame=3, mask=np.ones((32, 64), bool)),
        dict(frame=3),
    ]
    for kwargs in bad:
        with pytest.raises(InputError) as want:
            local.add_prompt(**kwargs)
        with pytest.raises(InputError) as got:
            remote.add_prompt(**kwargs)
        assert str(got.value) == str(want.value)
    r = httpx.post(f"{server.url}/v1/sessions/{remote.id}/prompts", headers=AUTH, timeout=10,
                   json={"frame": 3, "points": [[99, 10]], "labels": [1]})
    assert r.status_code == 400 and "x=99 is outside the frame" in r.json()["message"]
    for kwargs in (dict(direction="sideways"), dict(start=12), dict(direction="forward", start=0, stop=9)):
        with pytest.raises(InputError) as want:
            local.propagate(**kwargs)
        with pytest.raises(InputError) as got:
            remote.propagate(**kwargs)  # raised at the call, like the local session
        assert str(got.value) == str(want.value)
    with pytest.raises(InputError, match="integer"):
        remote.add_prompt(2.5, points=[[1, 1]], labels=[1])
    remote.close()
    assert_healthy(server.url)


def test_unknown_and_expired_sessions_are_404_saying_so(model, server):
    r = httpx.post(f"{server.url}/v1/sessions/no-such-session/prompts", headers=AUTH, timeout=10,
                   json={"frame": 0, "points": [[1, 1]], "labels": [1]})
    assert r.status_code == 404 and r.json()["error"] == "session_unknown"
    assert "re-open" in r.json()["message"]
    assert_healthy(server.url)

    srv = ServerThread(create_app(model, token=TOKEN, session_ttl=1.0))
    try:
        remote = medsam2.connect(srv.url, token=TOKEN, auto_reopen=False)
        session = remote.open(make_volume())
        session.add_prompt(2, points=[[33, 30]], labels=[1])
        time.sleep(1.3)
        with pytest.raises(SessionExpired, match="expired after 1 s idle; session expired, re-open"):
            session.add_prompt(2, points=[[20, 20]], labels=[1])
        r = httpx.get(f"{srv.url}/v1/sessions/{session.id}", headers=AUTH, timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "session_expired"
        # idle sessions are freed by the reaper too, without anyone touching them
        other = remote.open(make_volume())
        assert remote.refresh_info()["sessions"]["open"] == 1
        wait_until(lambda: remote.refresh_info()["sessions"]["open"] == 0, 10, "the reaper")
        r = httpx.get(f"{srv.url}/v1/sessions/{other.id}", headers=AUTH, timeout=10)
        assert r.status_code == 404 and "expired" in r.json()["message"]
        # a closed session says so as well
        third = remote.open(make_volume())
        third_id = third.id
        third.close()
        r = httpx.get(f"{srv.url}/v1/sessions/{third_id}", headers=AUTH, timeout=10)
        assert r.status_code == 404 and "closed" in r.json()["message"]
        assert_healthy(srv.url)
        remote.close()
    finally:
        srv.stop()


def test_too_many_sessions_is_429_with_a_retry_hint(model):
    srv = ServerThread(create_app(model, token=TOKEN, max_sessions=1, session_ttl=30))
    try:
        remote = medsam2.connect(srv.url, token=TOKEN)
        vol = make_volume()
        first = remote.open(vol)
        with pytest.raises(ServerError, match="limit of 1 open sessions") as err:
            remote.open(vol)
        assert 1 <= err.value.retry_after <= 30 and err.value.status == 429
        r = httpx.post(f"{srv.url}/v1/sessions", json={"volume": wire.volume_digest(vol)}, headers=AUTH, timeout=10)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 30
        assert remote.refresh_info()["sessions"]["free"] == 0
        assert_healthy(srv.url)
        first.close()
        second = remote.open(vol)  # the freed slot is usable at once
        second.add_prompt(1, points=[[33, 30]], labels=[1])
        second.close()
        remote.close()
        assert_healthy(srv.url)
    finally:
        srv.stop()


def _frame_seconds(model, vol):
    """Time of one propagated frame on this machine (the bound for 'free within a frame')."""
    s = model.open(vol)
    s.add_prompt(0, points=[[33, 30]], labels=[1])
    t0 = time.perf_counter()
    frames = list(s.propagate(direction="forward", stop=3))
    return (time.perf_counter() - t0) / len(frames)


class _AsgiSpec24:
    """Presents requests as ASGI spec 2.4, where Starlette no longer watches for disconnects
    itself and a server may silently drop writes to a closed connection."""

    def __init__(self, app):
        self.app, self.state = app, app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.4"}}
        await self.app(scope, receive, send)


@pytest.mark.parametrize("spec", ["uvicorn", "asgi-2.4"])
def test_client_disconnect_mid_propagation_frees_the_gpu_within_a_frame(model, server, spec):
    srv = server if spec == "uvicorn" else ServerThread(_AsgiSpec24(create_app(model, token=TOKEN)))
    try:
        _disconnect_mid_propagation(model, srv.url, srv.app.state.medsam2)
    finally:
        if srv is not server:
            srv.stop()


def _disconnect_mid_propagation(model, url, state):
    vol = make_volume(slices=16, seed=5)
    frame_s = _frame_seconds(model, vol)
    client = medsam2.connect(url, token=TOKEN)
    session = client.open(vol)
    session.add_prompt(0, points=[[33, 30]], labels=[1])
    done_before = state.stats["propagations"]
    frames_before = state.stats["frames_propagated"]
    with httpx.Client(headers=AUTH, timeout=60) as http:
        with http.stream("POST", f"{url}/v1/sessions/{session.id}/propagate", json={"direction": "forward"}) as r:
            for line in r.iter_lines():
                if json.loads(line)["type"] == "frame":
                    break
            t_close = time.monotonic()
        # leaving the block closes the connection mid-stream
    wait_until(lambda: state.stats["propagations"] > done_before, 5 + 3 * frame_s, "the propagation to stop")
    freed_after = time.monotonic() - t_close
    assert not state.gpu.locked()
    assert freed_after < 2 * frame_s + 1.0, f"GPU busy {freed_after:.2f} s after the disconnect (frame {frame_s:.2f} s)"
    assert state.stats["propagations_cancelled"] >= 1
    assert state.stats["frames_propagated"] - frames_before < 15, "it ran to the end despite the disconnect"
    # the next client is served, and the session itself is usable again
    with medsam2.connect(url, token=TOKEN) as other:
        s2 = other.open(make_volume(seed=6))
        assert s2.add_prompt(1, points=[[33, 30]], labels=[1]).shape == (64, 64)
        s2.close()
    assert session.add_prompt(3, points=[[30, 30]], labels=[1]).shape == (64, 64)
    session.close()
    client.close()
    assert_healthy(url)


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

        with pytest.warns(SessionReopened, match="replayed 1 prompt"):
            got = s2.add_prompt(4, points=[[30, 30]], labels=[1])  # transparent
        local = model.open(vol)
        local.add_prompt(3, points=[[33, 30]], labels=[1])
        assert np.array_equal(got, local.add_prompt(4, points=[[30, 30]], labels=[1]))
        same_frames(list(s2.propagate()), list(local.propagate()))
        assert s1.add_prompt(4, points=[[30, 30]], labels=[1]).shape == (64, 64)
        assert_healthy(srv.url)
        strict.close()
        easy.close()
    finally:
        srv.stop()


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(ServerError, match="cannot reach the MedSAM2 server"):
        medsam2.connect(f"http://127.0.0.1:{port}", token=TOKEN)
    with pytest.raises(InputError, match="bad server URL"):
        medsam2.connect("gpu-box:8765")


# -- wire format ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, bool])
def test_wire_round_trip(dtype):
    rng = np.random.default_rng(0)
    arr = (rng.normal(size=(3, 5, 7)) * 50).astype(dtype)
    headers, body = wire.encode_array(arr)
    back = wire.decode_array(headers, body)
    assert back.dtype == arr.dtype and np.array_equal(back, arr)
    mask = rng.random((13, 11)) > 0.5
    assert np.array_equal(wire.decode_mask(wire.encode_mask(mask)), mask)
    with pytest.raises(InputError, match="does not match the frame shape"):
        wire.decode_mask(wire.encode_mask(mask), shape=(11, 13))


def test_wire_refuses_a_decompression_bomb():
    bomb = wire.encode_array(np.zeros((512, 512, 512), np.uint8))[1]  # 128 MiB of zeros, tiny on the wire
    assert len(bomb) < 1 << 20
    decoder = wire.StreamDecoder(np.uint8, (8, 64, 64))
    with pytest.raises(InputError, match="longer than its header"):
        decoder.feed(bomb)
    assert len(decoder.buffer) == 8 * 64 * 64  # it never grew past the declared size


# -- medsam2 serve --------------------------------------------------------------------------------
def test_serve_refuses_a_network_address_without_a_token(monkeypatch, capsys, tmp_path):
    from medsam2 import cli

    monkeypatch.delenv("MEDSAM2_TOKEN", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "no such file" in capsys.readouterr().err  # arguments are checked before anything loads
    for host in ("0.0.0.0", "192.168.1.20", "gpu-box.local"):
        assert cli.main(["serve", "--host", host]) == 1
        err = capsys.readouterr().err
        assert f"refusing to listen on {host} without a token" in err and "--insecure" in err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert cli.main(["serve", "--token-file", str(empty)]) == 1
    assert "first line is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["serve", "--token", "a", "--token-file", str(empty)])


def test_serve_end_to_end(random_checkpoint, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(Path(medsam2.__file__).parents[1])}
    env.pop("MEDSAM2_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "medsam2.cli", "serve", "--model", "sam2.1_hiera_tiny", "--checkpoint",
         str(random_checkpoint), "--image-size", "256", "--device", "cpu", "--port", str(port), "--token-file",
         str(token_file), "--max-sessions", "2", "--session-ttl", "60", "--max-upload-mb", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"medsam2 serve exited: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "medsam2 serve did not come up"
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with medsam2.connect(url, token=TOKEN) as remote:
            info = remote.refresh_info()
            assert (info["image_size"], info["sessions"]["max"], info["max_upload_mb"]) == (256, 2, 4)
            assert info["session_ttl"] == 60 and info["weights_are_random"]
            session = remote.open(make_volume(slices=4))
            assert session.add_prompt(1, points=[[33, 30]], labels=[1]).shape == (64, 64)
            session.close()
        assert httpx.get(f"{url}/v1/info", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    assert "token required" in output and "RANDOM WEIGHTS" in output
    assert TOKEN not in output


def test_slicer_refuses_a_server_running_random_weights_unless_allowed(server):
    """A remote model is refused on the same grounds as a local random checkpoint."""
    from medsam2.errors import CheckpointError

    from MedSAM2Lib.models import ModelHolder, ModelSettings

    settings = ModelSettings(name="sam2.1_hiera_tiny", server_url=server.url, token=TOKEN)
    with pytest.raises(CheckpointError, match=f"server at {server.url} holds random test weights"):
        ModelHolder(settings).get()
    holder = ModelHolder(ModelSettings(**{**settings.__dict__, "allow_random": True}))
    assert holder.get().weights_are_random
    assert_healthy(server.url)


def test_remote_session_refuses_multi_axis_fusion_clearly(client):
    session = client.open(make_volume())
    session.add_prompt(3, points=[[32, 30]], labels=[1])
    with pytest.raises(medsam2.InputError, match="axes='all'.*local model only"):
        session.propagate(axes="all")
    assert [f for f, _ in session.propagate("forward", stop=4)] == [3, 4]
