#!/usr/bin/env python3
"""Memory and responsiveness of `medsam2 serve` under the attack cases of issue 16; prints a table.

    PYTHONPATH=MedSAM2Slicer python scripts/remote_attack_bench.py [--image-size 256] [--device cpu]

Starts `medsam2 serve` (random test weights, so nothing is downloaded; --max-upload-mb 128, other
limits as shipped) on a free loopback port, attacks it, and reads its memory from /proc (Linux).
docs/remote.md
quotes this table. Each row: the server's RSS before the case, at its peak during it, and after;
the worst /v1/health answer while it ran (polled every 10 ms from another process); what the
attacker got back.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))

from medsam2.remote import wire  # noqa: E402
from medsam2.testing import write_random_checkpoint  # noqa: E402

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIB = 1 << 20


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class Served:
    def __init__(self, tmp: Path, image_size: int, device: str, max_upload_mb: float):
        self.max_upload_mb = max_upload_mb
        ckpt = write_random_checkpoint(tmp / "random.pt", "sam2.1_hiera_tiny", seed=0, image_size=image_size)
        (tmp / "token").write_text(TOKEN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "MedSAM2Slicer")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medsam2.cli", "serve", "--model", "sam2.1_hiera_tiny", "--checkpoint", str(ckpt),
             "--image-size", str(image_size), "--device", device, "--port", str(self.port), "--token-file",
             str(tmp / "token"), "--max-upload-mb", str(max_upload_mb), "--log-level", "error"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("medsam2 serve did not start")
                time.sleep(0.2)

    def rss(self):
        return status_kb(self.proc.pid, "VmRSS") / 1024

    def peak(self):
        return status_kb(self.proc.pid, "VmHWM") / 1024

    def reset_peak(self):
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(30)


def _poll_health(url, worst, stop):
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            http.get(f"{url}/v1/health")
            worst.value = max(worst.value, time.perf_counter() - t0)
            time.sleep(0.01)


class HealthWatch:
    """Polls /v1/health every 10 ms from another process (the attacker's own work must not delay
    it); .worst is the slowest answer (s)."""

    def __init__(self, url):
        self._worst, self._stop = multiprocessing.Value("d", 0.0), multiprocessing.Event()
        self._proc = multiprocessing.Process(target=_poll_health, args=(url, self._worst, self._stop), daemon=True)

    @property
    def worst(self):
        return self._worst.value

    def __enter__(self):
        self._proc.start()
        time.sleep(0.5)
        self._worst.value = 0.0
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._proc.join(30)


def put(url, digest, body, headers, timeout=300):
    return httpx.put(f"{url}/v1/volumes/{digest}", content=body, headers={**AUTH, **headers}, timeout=timeout)


def open_session(srv, vol):
    headers, body = wire.encode_array(vol)
    digest = wire.volume_digest(vol)
    put(srv.url, digest, body, headers)
    return httpx.post(f"{srv.url}/v1/sessions", json={"volume": digest}, headers=AUTH, timeout=60).json()["session"]


# Each case prepares its payload, then returns the attack (run while health is watched).
def case_uploads(srv):
    bodies = []
    for i in range(40):
        vol = np.full((64, 256, 256), float(i), np.float32)  # 16 MiB each, a few KiB compressed
        bodies.append((wire.volume_digest(vol), *wire.encode_array(vol)[::-1]))

    def attack():
        codes = {put(srv.url, digest, body, headers).status_code for digest, body, headers in bodies}
        kept = httpx.get(f"{srv.url}/v1/info", headers=AUTH, timeout=10).json()["volumes"]
        return f"40 uploads of 16 MiB ({kept} kept, unused): {'/'.join(map(str, sorted(codes)))}"
    return attack


def case_mask_prompt(srv):
    sid = open_session(srv, np.zeros((4, 64, 64), np.int16))
    bits = base64.b64encode(zstandard.ZstdCompressor().compress(bytes(20000 * 20000 // 8))).decode()
    body = json.dumps({"frame": 1, "mask": {"shape": [20000, 20000], "bits": bits}}).encode()

    def attack():
        r = httpx.post(f"{srv.url}/v1/sessions/{sid}/prompts", headers={**AUTH, "Content-Type": "application/json"},
                       content=body, timeout=120)
        return f"mask prompt declaring 20000 x 20000 ({len(body)} B): {r.status_code}"
    return attack


def case_stalled_uploads(srv, count=5):
    slices = int(srv.max_upload_mb) // 4  # float32 slices of 1024 x 1024: the limit's size

    def attack():
        socks, answers = [], []
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.sendall((f"PUT /v1/volumes/{i:064x} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                          f"X-MedSAM2-Dtype: <f4\r\nX-MedSAM2-Shape: {slices},1024,1024\r\nX-MedSAM2-Codec: raw\r\n"
                          f"Content-Length: {slices << 22}\r\n\r\n").encode() + bytes(MIB))
            socks.append(sock)
            time.sleep(0.2)
        time.sleep(0.5)
        for sock in socks:
            sock.setblocking(False)
            try:
                answers.append(sock.recv(12).decode()[9:12] or "-")
            except BlockingIOError:
                answers.append("-")
        held = srv.rss()
        for sock in socks:
            sock.close()
        time.sleep(1.0)
        return (f"{count} uploads declaring {slices * 4} MiB send 1 MiB, stall (RSS {held:.0f}), close: "
                f"{'/'.join(answers)}")
    return attack


def case_nan_volume(srv):
    vol = np.full((128, 512, 512), np.nan, np.float32)
    headers, body = wire.encode_array(vol)
    digest = wire.volume_digest(vol)
    del vol

    def attack():
        r = put(srv.url, digest, body, headers)
        return f"128 MiB all-NaN upload ({len(body)} B sent): {r.status_code}"
    return attack


def case_points(srv):
    sid = open_session(srv, np.zeros((4, 64, 64), np.int16))
    body = json.dumps({"frame": 1, "points": [[30.0, 30.0]] * 100_000, "labels": [1] * 100_000}).encode()

    def attack():
        t0 = time.perf_counter()
        r = httpx.post(f"{srv.url}/v1/sessions/{sid}/prompts", headers={**AUTH, "Content-Type": "application/json"},
                       content=body, timeout=600)
        return f"100,000-point prompt ({len(body) / MIB:.1f} MiB): {r.status_code} in {time.perf_counter() - t0:.2f} s"
    return attack


def case_geometry(srv):
    def attack():
        r = put(srv.url, "ab" * 32, b"", {"X-MedSAM2-Dtype": "|u1", "X-MedSAM2-Shape": "1,1,67108864",
                                          "X-MedSAM2-Codec": "raw"})
        return f"1 x 1 x 2^26 volume: {r.status_code}"
    return attack


def client_decode():
    """The client's side of a long propagation: 2000 received 512 x 512 masks, decoded."""
    encoded = wire.encode_mask(np.random.default_rng(0).random((512, 512)) > 0.5)
    before = status_kb("self", "VmRSS") / 1024
    for _ in range(2000):
        wire.decode_mask(encoded, (512, 512))
    return before, status_kb("self", "VmRSS") / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-upload-mb", type=float, default=128,
                   help="the server's limit (default 128: unused volumes are kept up to twice that)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        srv = Served(Path(tmp), args.image_size, args.device, args.max_upload_mb)
        try:
            for case in (case_uploads, case_mask_prompt, case_stalled_uploads, case_nan_volume, case_points,
                         case_geometry):
                attack = case(srv)
                before = srv.rss()
                srv.reset_peak()
                with HealthWatch(srv.url) as watch:
                    what = attack()
                time.sleep(0.5)
                rows.append((what, before, srv.peak(), srv.rss(), watch.worst * 1000))
        finally:
            srv.stop()
    print(f"medsam2 serve --max-upload-mb {args.max_upload_mb:g} (other limits default), random weights at "
          f"{args.image_size} px on {args.device}; RSS in MiB")
    print(f"| {'case: answer':<88} | before | peak | after | health, worst |")
    print(f"|{'-' * 90}|-------:|-----:|------:|--------------:|")
    for what, before, peak, after, worst in rows:
        print(f"| {what:<88} | {before:6.0f} | {peak:4.0f} | {after:5.0f} | {worst:10.0f} ms |")
    before, after = client_decode()
    print(f"client: 2000 decoded 512 x 512 frames: RSS {before:.0f} -> {after:.0f} MiB")


if __name__ == "__main__":
    main()
