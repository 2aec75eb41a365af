"""Hostile and careless clients (issue 16): the server keeps flat memory, a responsive event loop,
its limits, and clear 4xx answers. Memory is read from /proc (Linux).

Two kinds of server: `medsam2 serve` in its own process where its memory or event loop is
measured from outside, and uvicorn in a thread where a small configuration is enough.
"""

import base64
import gc
import json
import socket
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import zstandard

import medsam2
from medsam2.errors import InputError
from medsam2.remote import wire
from medsam2.remote.server import create_app
from remote_fixtures import (AUTH, TOKEN, ServerThread, ServeProcess, assert_healthy, client, logged,  # noqa: F401
                             make_volume, put_volume, raw_request, rss_mb, server, wait_until)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads memory from /proc (Linux)")

MIB = 1 << 20
SERVED_UPLOAD_MB = 72  # the served process's --max-upload-mb: room for the 64 MiB NaN volume


@pytest.fixture(scope="module")
def served(random_checkpoint, tmp_path_factory):
    proc = ServeProcess(random_checkpoint, tmp_path_factory.mktemp("served"),
                        args=["--max-upload-mb", str(SERVED_UPLOAD_MB), "--max-uploads", "2", "--log-level", "warning"])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def tight(model):
    """A small server: 4 MiB uploads, 2 at once, sides up to 256, 16 points a prompt, 3 objects."""
    srv = ServerThread(create_app(model, token=TOKEN, max_upload_mb=4, max_uploads=2, max_side=256, max_points=16,
                                  max_objects=3, session_ttl=600))
    yield srv
    srv.stop()


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the kernel's "reset the peak RSS" command


def info(url):
    return httpx.get(f"{url}/v1/info", headers=AUTH, timeout=10).json()


# -- 1. every zstd decode freed its buffer and context ------------------------------------------
def test_memory_stays_flat_over_repeated_uploads(tight):
    """Each upload used to leak its whole buffer (a cycle through the zstd writer)."""
    def upload(i):
        vol = np.full((16, 256, 256), float(i), np.float32)  # 4 MiB, the limit; a few KiB compressed
        headers, body = wire.encode_array(vol)
        r = put_volume(tight.url, wire.volume_digest(vol), body, dtype=headers[wire.DTYPE_HEADER],
                       shape=headers[wire.SHAPE_HEADER])
        assert r.status_code == 201, r.text

    for i in range(8):  # warm up: the volume store fills to its budget (2 x 4 MiB of unused volumes)
        upload(i)
    gc.collect()
    before = rss_mb()
    for i in range(8, 48):
        upload(i)
    gc.collect()
    grown = rss_mb() - before
    assert grown < 40, f"RSS grew {grown:.0f} MiB over 40 uploads of 4 MiB (a leak keeps 160 MiB)"
    assert info(tight.url)["volumes"] <= 2


def test_memory_stays_flat_while_the_client_decodes_long_propagations(model, client):
    vol = make_volume(slices=8, seed=21)
    session = client.open(vol)
    session.add_prompt(0, points=[[33, 30]], labels=[1])
    frames = list(session.propagate(direction="forward"))
    assert len(frames) == 8
    gc.collect()
    kept = [type(o).__name__ for o in gc.get_objects() if type(o).__module__ == "medsam2.remote.wire"]
    assert not kept, f"{len(kept)} decoders outlived their frames: {sorted(set(kept))}"
    # a long propagation of 512 x 512 frames, as the client decodes it, frame after frame
    encoded = wire.encode_mask(np.random.default_rng(0).random((512, 512)) > 0.5)
    for _ in range(200):
        wire.decode_mask(encoded, (512, 512))
    before = rss_mb()
    for _ in range(2000):
        wire.decode_mask(encoded, (512, 512))
    grown = rss_mb() - before
    assert grown < 20, f"RSS grew {grown:.0f} MiB over 2000 decoded frames (a leak keeps ~240 MiB)"
    session.close()


# -- 2. a mask prompt is checked against the frame before anything is allocated ------------------
def test_a_mask_prompt_declaring_a_huge_shape_costs_nothing(served):
    with medsam2.connect(served.url, token=TOKEN) as remote:
        session = remote.open(make_volume(seed=22))
        bits = base64.b64encode(zstandard.ZstdCompressor().compress(bytes(20000 * 20000 // 8))).decode()
        body = {"frame": 1, "obj_id": 1, "mask": {"shape": [20000, 20000], "bits": bits}}
        assert len(json.dumps(body)) < 10_000  # a few KiB that would decode to 400 MB of pixels
        reset_peak_rss(served.proc.pid)
        before = served.rss_mb()
        r = httpx.post(f"{served.url}/v1/sessions/{session.id}/prompts", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 400
        assert r.json()["message"] == "mask shape (20000, 20000) does not match the frame's (rows, cols) (64, 64)"
        peak = peak_rss_mb(served.proc.pid) - before
        assert peak < 20, f"the refused prompt took {peak:.0f} MiB at its peak"
        session.close()
    assert_healthy(served.url)


# -- 3. upload buffers grow with the bytes, uploads at once are capped, a leaver frees all ----------
def _stalled_upload(port, index, sent_mb=1):
    """An upload that declares the limit's size, sends 1 MiB and stalls. -> the open socket."""
    slices = SERVED_UPLOAD_MB // 4  # float32 slices of 1024 x 1024 (4 MiB): exactly the limit
    head = (f"PUT /v1/volumes/{index:064x} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{wire.DTYPE_HEADER}: <f4\r\n{wire.SHAPE_HEADER}: {slices},1024,1024\r\n{wire.CODEC_HEADER}: raw\r\n"
            f"Content-Length: {SERVED_UPLOAD_MB * MIB}\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + bytes(sent_mb * MIB))
    return sock


def test_stalled_uploads_hold_only_what_they_sent_are_capped_and_freed(served):
    assert info(served.url)["uploads"] == {"receiving": 0, "max": 2}
    gc_before = served.rss_mb()
    socks = [_stalled_upload(served.port, i) for i in (1, 2)]
    try:
        wait_until(lambda: info(served.url)["uploads"]["receiving"] == 2, 10, "two uploads in progress")
        status, _, text = raw_request(served.port, (
            f"PUT /v1/volumes/{3:064x} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"{wire.DTYPE_HEADER}: <f4\r\n{wire.SHAPE_HEADER}: 1,64,64\r\n{wire.CODEC_HEADER}: raw\r\n"
            f"Content-Length: {64 * 64 * 4}\r\n\r\n"))
        assert status == 503 and "Retry-After: 1" in text.replace("retry-after", "Retry-After")
        assert "receiving 2 uploads already" in text
        held = served.rss_mb() - gc_before
        assert held < 24, f"two stalled uploads that sent 1 MiB each hold {held:.0f} MiB"
        assert_healthy(served.url)
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: info(served.url)["uploads"]["receiving"] == 0, 10, "the server to notice the leavers")
    left = served.rss_mb() - gc_before
    assert left < 24, f"{left:.0f} MiB still held after the uploaders left"
    with medsam2.connect(served.url, token=TOKEN) as remote:  # the slots are free again
        remote.open(make_volume(seed=23)).close()


def test_a_client_waits_its_turn_when_the_server_is_receiving_other_uploads(served):
    socks = [_stalled_upload(served.port, i) for i in (4, 5)]
    try:
        wait_until(lambda: info(served.url)["uploads"]["receiving"] == 2, 10, "two uploads in progress")
        result = {}

        def open_volume():
            with medsam2.connect(served.url, token=TOKEN) as remote:
                result["session"] = remote.open(make_volume(seed=24)).num_frames

        opener = threading.Thread(target=open_volume)
        opener.start()
        time.sleep(1.5)
        assert "session" not in result  # refused with 503 + Retry-After, and retrying
    finally:
        for sock in socks:
            sock.close()
    opener.join(30)
    assert result == {"session": 8}


# -- 4. CPU-heavy checks run off the event loop -----------------------------------------------
def test_health_answers_within_100_ms_while_a_nan_volume_is_checked_and_a_huge_prompt_refused(served):
    vol = np.full((64, 512, 512), np.nan, np.float32)  # 64 MiB of NaN: tiny compressed, all to scan
    headers, body = wire.encode_array(vol)
    digest = wire.volume_digest(vol)
    points = json.dumps({"frame": 1, "points": [[30.0, 30.0]] * 100_000, "labels": [1] * 100_000}).encode()
    waits, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                assert http.get(f"{served.url}/v1/health").status_code == 200
                waits.append(time.perf_counter() - t0)
                time.sleep(0.01)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        time.sleep(1.0)
        # what this (possibly busy) machine gives anyway: the bound is 100 ms on top of it
        idle_worst, waits[:] = max(waits), []
        reset_peak_rss(served.proc.pid)
        before = served.rss_mb()
        r = httpx.put(f"{served.url}/v1/volumes/{digest}", content=body, headers={**AUTH, **headers}, timeout=120)
        peak = peak_rss_mb(served.proc.pid) - before
        # 1.7 MB of JSON numbers would hold the event loop for a quarter of a second to parse
        many = httpx.post(f"{served.url}/v1/sessions/any/prompts", content=points, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
        time.sleep(0.2)
    finally:
        stop.set()
        poller.join(30)
    assert r.status_code == 400 and "16777216 NaN voxels (first at slice 0, row 0, col 0)" in r.json()["message"]
    assert many.status_code == 413 and "at most 256 points" in many.json()["message"]
    assert len(waits) > 10
    assert max(waits) < 0.1 + 2 * idle_worst, \
        f"health took {max(waits) * 1000:.0f} ms during the attack ({idle_worst * 1000:.0f} ms before it)"
    assert peak < 64 * 2, f"checking a 64 MiB volume took {peak:.0f} MiB at its peak"


# -- 5. prompts are bounded -------------------------------------------------------------------
def test_prompt_size_and_objects_per_session_are_capped(tight):
    with medsam2.connect(tight.url, token=TOKEN) as remote:
        session = remote.open(make_volume(seed=25))
        t0 = time.monotonic()
        r = httpx.post(f"{tight.url}/v1/sessions/{session.id}/prompts", headers=AUTH, timeout=20,
                       json={"frame": 1, "points": [[30.0, 30.0]] * 10_000, "labels": [1] * 10_000})
        assert r.status_code == 413 and time.monotonic() - t0 < 10  # counted before it is parsed
        assert "carries 30003 values; the server takes at most 384" in r.json()["message"]
        assert "at most 16 points" in r.json()["message"]
        with pytest.raises(InputError, match="at most 16 points on this server; this one has 17"):
            session.add_prompt(1, points=[[30, 30]] * 17, labels=[1] * 17)
        r = httpx.post(f"{tight.url}/v1/sessions/{session.id}/prompts", headers=AUTH, timeout=20,
                       json={"frame": 1, "box": [1.0] * 100})
        assert r.status_code == 400 and "got 100 numbers" in r.json()["message"]
        for obj in (1, 2, 3):
            session.add_prompt(1, obj_id=obj, points=[[30, 30]] * 16, labels=[1] * 16)
        with pytest.raises(InputError, match="has 3 objects, the server's limit"):
            session.add_prompt(2, obj_id=4, points=[[30, 30]], labels=[1])
        session.add_prompt(2, obj_id=3, points=[[20, 20]], labels=[1])  # a known object still takes prompts
        assert session.obj_ids == [1, 2, 3]
        session.close()
    assert_healthy(tight.url)


# -- 6. the reaper never waits for the engine while holding a table lock --------------------------
def test_freeing_an_expired_session_does_not_stall_other_requests(model):
    srv = ServerThread(create_app(model, token=TOKEN, session_ttl=0.5))
    try:
        with medsam2.connect(srv.url, token=TOKEN, auto_reopen=False) as remote:
            idle = remote.open(make_volume(seed=26))
            time.sleep(0.6)  # idle past the TTL: the reaper's next round frees it
            released = threading.Event()

            def long_engine_call():  # what a long prompt or frame does: hold the engine's own lock
                with model.lock:
                    released.wait(10)

            holder = threading.Thread(target=long_engine_call)
            holder.start()
            waits = []
            try:
                deadline = time.monotonic() + 2.5
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    remote.refresh_info()
                    waits.append(time.perf_counter() - t0)
                    time.sleep(0.05)
            finally:
                released.set()
                holder.join(10)
            assert max(waits) < 0.5, f"a request waited {max(waits):.1f} s behind the engine"
            wait_until(lambda: httpx.get(f"{srv.url}/v1/sessions/{idle.id}", headers=AUTH, timeout=5).status_code == 404,
                       5, "the idle session to be freed")
    finally:
        srv.stop()


# -- 7. frame geometry is bounded, before any work ---------------------------------------------
def test_volumes_with_a_side_over_the_limit_are_refused_on_their_header(tight, client):
    # 1 x 1 x 4,000,000: 3.8 MiB, within the upload limit, but one frame of 4 million pixels
    status, _, text = raw_request(tight.port, (
        f"PUT /v1/volumes/{'cd' * 32} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"{wire.DTYPE_HEADER}: |u1\r\n{wire.SHAPE_HEADER}: 1,1,4000000\r\n{wire.CODEC_HEADER}: raw\r\n"
        f"Content-Length: 4000000\r\n\r\n"))  # answered with no byte of body sent
    assert status == 413 and "side over the server's limit of 256" in text
    with medsam2.connect(tight.url, token=TOKEN) as remote:
        with pytest.raises(InputError, match="side over the server's limit of 256"):
            remote.open(np.zeros((2, 257, 8), np.uint8))  # said before uploading
        ok = remote.open(make_volume(slices=2, rows=256, cols=8))  # at the limit: fine
        assert ok.frame_shape == (256, 8)
        ok.close()
    assert_healthy(tight.url)


# -- 8. object ids fit the uint16 label map ----------------------------------------------------
def test_obj_ids_are_bounded_by_the_label_map(server, client):
    session = client.open(make_volume(seed=27))
    r = httpx.post(f"{server.url}/v1/sessions/{session.id}/prompts", headers=AUTH, timeout=10,
                   json={"frame": 1, "obj_id": 65536, "points": [[33, 30]], "labels": [1]})
    assert r.status_code == 422 and "obj_id" in r.json()["message"] and "65535" in r.json()["message"]
    with pytest.raises(InputError, match="65535"):
        session.add_prompt(1, obj_id=70000, points=[[33, 30]], labels=[1])
    mask = session.add_prompt(1, obj_id=65535, points=[[33, 30]], labels=[1])
    labels = session.masks()
    assert labels.dtype == np.uint16 and np.array_equal(labels[1] == 65535, mask) and mask.any()
    session.close()
    assert_healthy(server.url)


# -- 9. the project's own client uploads bool volumes ---------------------------------------------
def test_a_bool_volume_uploads_and_segments_as_locally(model, client):
    vol = make_volume(seed=28) > 300
    local, remote = model.open(vol), client.open(vol)
    for s in (local, remote):
        s.add_prompt(2, points=[[33, 30]], labels=[1])
    assert np.array_equal(remote.mask(1), local.mask(1))
    remote.close()


# -- 10. every malformed upload header is a 400 with a message ---------------------------------
@pytest.mark.parametrize("headers, phrase", [
    ({wire.DTYPE_HEADER: "i999"}, "unsupported dtype"),
    ({wire.DTYPE_HEADER: "M8[zz]"}, "unsupported dtype"),
    ({wire.DTYPE_HEADER: "<U2147483648"}, "unsupported dtype"),
    ({wire.DTYPE_HEADER: "(2)i4"}, "unsupported dtype"),
    ({wire.DTYPE_HEADER: "f" * 5000}, "unsupported dtype"),
    ({wire.DTYPE_HEADER: ""}, "unsupported dtype"),
    ({wire.SHAPE_HEADER: "[1e999, 64, 64]"}, "bad shape header"),
    ({wire.SHAPE_HEADER: "inf,64,64"}, "bad shape header"),
    ({wire.SHAPE_HEADER: "9223372036854775807,9223372036854775807,8"}, "bad shape header"),
    ({wire.SHAPE_HEADER: "3037000500,3037000500,8"}, "side over the server's limit"),
    ({wire.SHAPE_HEADER: "-8,64,64"}, "bad shape header"),
    ({wire.SHAPE_HEADER: "0,64,64"}, "every dimension must be a positive integer"),
    ({wire.SHAPE_HEADER: "[[8], 64, 64]"}, "bad shape header"),
    ({wire.SHAPE_HEADER: ""}, "bad shape header"),
    ({wire.CODEC_HEADER: "gzip"}, "unknown codec"),
    ({wire.PACKED_HEADER: "2"}, "X-MedSAM2-Packed"),
    ({wire.PACKED_HEADER: "1"}, "packed bits are only for bool arrays"),
])
def test_malformed_upload_headers_are_400(server, headers, phrase):
    vol = make_volume(seed=29)
    good = {wire.DTYPE_HEADER: "<i2", wire.SHAPE_HEADER: "8,64,64", wire.CODEC_HEADER: "zstd"}
    r = httpx.put(f"{server.url}/v1/volumes/{wire.volume_digest(vol)}", content=wire.encode_array(vol)[1],
                  headers={**AUTH, **good, **headers}, timeout=10)
    assert r.status_code in (400, 413), r.text
    assert r.status_code == (413 if "limit" in phrase else 400)
    assert phrase in r.json()["message"]
    assert_healthy(server.url)


# -- 12. logs: no query strings of refused requests, no flood of 401 warnings -----------------------
def test_refused_requests_leave_no_query_string_and_401_warnings_are_rate_limited(model, logged, capfd):
    """The server's own lines (uvicorn's access log, medsam2's warnings); the test's client logs its URLs."""
    srv = ServerThread(create_app(model, token=TOKEN), log_level="info")
    try:
        secret = "sekret-in-the-url-93c1"
        with httpx.Client(timeout=10) as http:
            r = http.get(f"{srv.url}/v1/info?token={secret}&frame=3")
            assert r.status_code == 401
            for _ in range(50):
                assert http.get(f"{srv.url}/v1/info", headers={"Authorization": "Bearer nope"}).status_code == 401
            ok = http.get(f"{srv.url}/v1/health?probe=lb-7")
            assert ok.status_code == 200
        assert srv.state.stats["unauthorized"] == 51
    finally:
        srv.stop()
    out, err = capfd.readouterr()
    text = "\n".join(line for line in logged if line.startswith(("uvicorn", "medsam2"))) + out + err
    assert '"GET /v1/info?... HTTP/1.1" 401' in text, "the access log must show the refused request itself"
    assert secret not in text
    warnings = [line for line in logged if "missing or wrong token" in line]
    assert len(warnings) == 1, warnings
