"""What the server must survive, each fault ending with a health check: bad tokens, malformed
requests and bodies, oversized uploads, bad prompts, unknown and expired sessions, too many
sessions, clients that go away mid-propagation, an unreachable server.
"""

import json
import socket
import time

import httpx
import numpy as np
import pytest

import medsam2
from medsam2.errors import InputError, ServerError, SessionExpired
from medsam2.remote import wire
from medsam2.remote.server import create_app
from remote_fixtures import (AUTH, TOKEN, WRONG_TOKEN, ServerThread, assert_healthy, client, logged,  # noqa: F401
                             make_volume, put_volume, raw_request, server, wait_until)


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
        r = put_volume(server.url, digest, **kwargs)
        assert r.status_code == 400, (phrase, r.text)
        assert phrase in r.json()["message"], (phrase, r.text)
        assert_healthy(server.url)
    r = httpx.put(f"{server.url}/v1/volumes/not-a-digest", content=zstd, headers=AUTH, timeout=10)
    assert r.status_code == 400 and "sha256" in r.json()["message"]
    assert httpx.head(f"{server.url}/v1/volumes/{digest}", headers=AUTH, timeout=10).status_code == 404
    assert put_volume(server.url, digest, zstd).status_code == 201  # the honest upload is accepted
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


def test_oversized_upload_is_413_before_it_is_all_read(client, server):
    digest = "ab" * 32
    common = (f"PUT /v1/volumes/{digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
              f"{wire.DTYPE_HEADER}: <f4\r\n{wire.CODEC_HEADER}: raw\r\n")
    # 1. the header declares 64 MiB (limit 1 MiB): refused without a byte of body
    status, sent, text = raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 64,512,512\r\nContent-Length: {64 << 20}\r\n\r\n")
    assert status == 413 and "exceeds the server's limit" in text and sent == 0
    assert_healthy(server.url)
    # 2. a plausible shape but a Content-Length of 50 MiB: refused before the body
    status, sent, text = raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 4,256,256\r\nContent-Length: {50 << 20}\r\n\r\n")
    assert status == 413 and sent == 0
    assert_healthy(server.url)
    # 3. no length at all (chunked) and more bytes than allowed: counted while streaming
    chunk = b"\0" * (64 << 10)
    status, sent, text = raw_request(
        server.port, common + f"{wire.SHAPE_HEADER}: 4,256,256\r\nTransfer-Encoding: chunked\r\n\r\n",
        body_chunks=[chunk] * 512, chunked=True)  # offers 32 MiB
    assert status == 413, text
    assert sent < (4 << 20), f"the server took {sent} bytes before refusing"
    assert_healthy(server.url)
    # 4. the client says so before uploading anything
    with pytest.raises(InputError, match="max-upload-mb"):
        client.open(np.zeros((40, 128, 128), np.float32))  # 2.5 MiB
    # 5. an oversized JSON body is refused too, before it is read
    status, sent, text = raw_request(
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


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    with pytest.raises(ServerError, match="cannot reach the MedSAM2 server"):
        medsam2.connect(f"http://127.0.0.1:{port}", token=TOKEN)
    with pytest.raises(InputError, match="bad server URL"):
        medsam2.connect("gpu-box:8765")


def test_an_engine_bug_is_a_500_with_its_traceback_in_the_log(server, client, logged, monkeypatch):
    """Only the user's mistakes are 4xx: an engine failure must not read as bad input."""
    from medsam2.tracking.propagation import Propagator
    from medsam2.tracking.session import Session

    session = client.open(make_volume(seed=11))
    session.add_prompt(3, points=[[33, 30]], labels=[1])

    def broken_lookup(self, frame):
        raise KeyError("bank entry 7")

    def broken_tracking(self, frame, *args):
        raise TypeError("unsupported operand for the memory attention")

    monkeypatch.setattr(Session, "frame_masks", broken_lookup)
    r = httpx.get(f"{server.url}/v1/sessions/{session.id}/frames/3", headers=AUTH, timeout=10)
    assert r.status_code == 500 and r.json()["error"] == "server" and "KeyError" in r.json()["message"]
    # the client's kept-alive connection survives the 500: its next request is answered on it
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        answers = []
        for path in (f"/v1/sessions/{session.id}/frames/3", "/v1/health"):
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            answers.append(answer.split(b" ", 2)[1] if answer else b"closed")
        assert answers == [b"500", b"200"]
    with pytest.raises(ServerError, match="500"):
        session.frame_masks(3)
    monkeypatch.setattr(Propagator, "_track_frame", broken_tracking)
    with pytest.raises(ServerError, match="500.*TypeError"):
        list(session.propagate())  # in-band: the stream had started
    text = "\n".join(logged)
    assert "Traceback" in text and "bank entry 7" in text and "memory attention" in text
    monkeypatch.undo()
    assert session.frame_masks(3)[1].shape == (64, 64)  # the session is still usable
    session.close()
    assert_healthy(server.url)
