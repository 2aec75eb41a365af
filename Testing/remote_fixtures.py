"""Shared pieces of the remote server/client tests: real uvicorn servers on 127.0.0.1 (in a thread,
or `medsam2 serve` in its own process), volumes, comparisons, raw sockets, memory readings.

The engine is the real one (random checkpoint at 256 px, the `model` fixture). Test modules
import the fixtures they use from here.
"""

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn

import medsam2
from medsam2.remote import wire
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
        # log_config=None: uvicorn's loggers propagate to the root logger (no handler of its own
        # bound to whatever stdout the test that started it had)
        config = uvicorn.Config(app, log_level=log_level, log_config=None, timeout_graceful_shutdown=2,
                                lifespan="on")
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`medsam2 serve` in its own process on 127.0.0.1, as a user starts it (output to a file)."""

    def __init__(self, checkpoint, tmp_path, port=None, args=(), name="serve", wait=True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.instance = None  # its /v1/info "instance", once someone asks
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        self.log_path = tmp_path / f"{name}-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(Path(medsam2.__file__).parents[1])}
        env.pop("MEDSAM2_TOKEN", None)
        self.command = [sys.executable, "-m", "medsam2.cli", "serve", "--model", "sam2.1_hiera_tiny",
                        "--checkpoint", str(checkpoint), "--image-size", "256", "--device", "cpu",
                        "--port", str(self.port), "--token-file", str(token_file), *args]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout=120):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"medsam2 serve exited: {self.output()}"
            assert time.monotonic() < deadline, f"medsam2 serve did not come up: {self.output()}"
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def output(self):
        return self.log_path.read_text(errors="replace")

    def rss_mb(self):
        return rss_mb(self.proc.pid)

    def kill(self):
        """SIGKILL: no cleanup, no goodbye (a crash, or the OOM killer)."""
        self.proc.kill()
        self.proc.wait(30)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.output()


def rss_mb(pid="self"):
    """Resident memory of a process in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def assert_healthy(url):
    r = httpx.get(f"{url}/v1/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(POLL_S)


def make_volume(slices=8, seed=0, dtype=np.int16, rows=64, cols=64):
    """A small CT-like volume: noise plus a bright block the prompts land on."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(0, 60, size=(slices, rows, cols))
    vol[:, rows * 18 // 64:rows * 44 // 64, cols * 22 // 64:cols * 46 // 64] += 600
    return vol.astype(dtype)


def same_frames(remote_frames, local_frames):
    assert [f for f, _ in remote_frames] == [f for f, _ in local_frames]
    for (frame, rm), (_, lm) in zip(remote_frames, local_frames):
        assert sorted(rm) == sorted(lm), f"objects differ on frame {frame}"
        for obj in lm:
            assert rm[obj].dtype == np.bool_ and rm[obj].shape == lm[obj].shape
            assert np.array_equal(rm[obj], lm[obj]), f"mask of object {obj} differs on frame {frame}"


def put_volume(url, digest, body, dtype="<i2", shape="8,64,64", codec="zstd", extra=None, timeout=30):
    headers = {**AUTH, wire.DTYPE_HEADER: dtype, wire.SHAPE_HEADER: shape, wire.CODEC_HEADER: codec, **(extra or {})}
    return httpx.put(f"{url}/v1/volumes/{digest}", content=body, headers=headers, timeout=timeout)


def raw_request(port, head, body_chunks=(), chunked=False, limit_s=10.0):
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


def stream_events(url, sid, payload, timeout=120):
    """A propagation's NDJSON lines, read raw."""
    r = httpx.post(f"{url}/v1/sessions/{sid}/propagate", json=payload, headers=AUTH, timeout=timeout)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line]


@pytest.fixture(scope="module")
def server(model):
    srv = ServerThread(create_app(model, token=TOKEN, max_sessions=6, session_ttl=600, max_upload_mb=1))
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with medsam2.connect(server.url, token=TOKEN) as remote:
        yield remote


@pytest.fixture()
def logged():
    """Everything the server's and uvicorn's loggers emit while the test runs."""
    lines = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    names = ["", "uvicorn", "uvicorn.access"]  # the others propagate to one of these: each line once
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield lines
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)
