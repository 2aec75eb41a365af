"""The documented scale-out, for real: Debian's nginx configured by docs/nginx-medsam2.conf (read from
docs, only addresses, ports and certificate paths replaced), TLS on loopback, in front of two
`medsam2 serve` processes."""

import inspect
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

import medsam2
from medsam2.remote.client import SessionReopened
from medsam2.remote.server import Limits
from medsam2.remote.server.propagation_routes import HEARTBEAT_S
from remote_fixtures import AUTH, TOKEN, ServeProcess, free_port, make_volume, same_frames, wait_until

DOC_CONF = Path(__file__).resolve().parents[1] / "docs" / "nginx-medsam2.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
MIB = 1 << 20

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light; "
                                             "scripts/install_system_test_deps.sh installs it)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed for a test certificate"),
]


def directive(conf, name):
    match = re.search(rf"^\s*{name}\s+([^;]+);", conf, re.M)
    assert match, f"{DOC_CONF.name} has no {name} directive"
    return match.group(1).strip()


class Deployment:
    def __init__(self, tmp, backends):
        self.tmp, self.backends = tmp, backends
        self.cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(self.cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        conf = DOC_CONF.read_text()
        for old, new in (("gpu1.example.org:8765", f"127.0.0.1:{backends[0].port}"),
                         ("gpu2.example.org:8765", f"127.0.0.1:{backends[1].port}"),
                         ("listen 443 ssl", f"listen 127.0.0.1:{self.port} ssl"),
                         ("/etc/ssl/medsam2/fullchain.pem", str(self.cert)),
                         ("/etc/ssl/medsam2/privkey.pem", str(key))):
            assert old in conf, f"{DOC_CONF.name} no longer has {old!r}: update this test's substitutions"
            conf = conf.replace(old, new)
        (tmp / "medsam2.conf").write_text(conf)
        temp_paths = "".join(f"    {kind}_temp_path {tmp / kind};\n" for kind in
                             ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read this private folder
        (tmp / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'} info;\n"
            f"events {{ worker_connections 256; }}\n"
            f"http {{\n    access_log {tmp / 'access.log'};\n{temp_paths}    include {tmp / 'medsam2.conf'};\n}}\n")
        self.proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log")],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.tls = ssl.create_default_context(cafile=str(self.cert))
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"nginx exited: {self.proc.stdout.read().decode()} {self.error_log()}"
            assert time.monotonic() < deadline, f"nginx did not come up: {self.error_log()}"
            try:
                if httpx.get(f"{self.url}/v1/health", verify=self.tls, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def error_log(self):
        path = self.tmp / "error.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def connect(self):
        return medsam2.connect(self.url, token=TOKEN, verify=str(self.cert))

    def backend_of(self, remote):
        instance = remote.refresh_info()["instance"]
        return next(b for b in self.backends if b.instance == instance)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


@pytest.fixture(scope="module")
def deployment(random_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nginx")
    backends = [ServeProcess(random_checkpoint, tmp, name=f"gpu{i}", wait=False,
                             args=["--max-upload-mb", "4", "--log-level", "warning"]) for i in (1, 2)]
    try:
        for b in backends:
            b.wait_healthy()
            b.instance = httpx.get(f"{b.url}/v1/info", headers=AUTH, timeout=10).json()["instance"]
        dep = Deployment(tmp, backends)
    except BaseException:
        for b in backends:
            b.stop()
        raise
    yield dep
    dep.stop()
    for b in backends:
        b.stop()


def test_the_documented_limits_match_the_servers(deployment):
    conf = DOC_CONF.read_text()
    size = directive(conf, "client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * MIB >= Limits().max_upload_bytes, \
        "nginx would refuse uploads the server accepts (with its own HTML page)"
    assert directive(conf, "proxy_request_buffering") == "off" and directive(conf, "proxy_buffering") == "off"
    read_timeout = int(directive(conf, "proxy_read_timeout").rstrip("s"))
    client_timeout = inspect.signature(medsam2.connect).parameters["timeout"].default
    assert read_timeout > client_timeout > HEARTBEAT_S, "the client must give up before nginx cuts it off"

    # an upload over the servers' limit reaches the server, which refuses it with its own message
    r = httpx.put(f"{deployment.url}/v1/volumes/{'ef' * 32}", content=b"", verify=deployment.tls, timeout=30,
                  headers={**AUTH, "X-MedSAM2-Dtype": "<f4", "X-MedSAM2-Shape": "20,256,256"})
    assert r.status_code == 413 and "exceeds the server's limit of 4.0 MiB" in r.json()["message"]

    # propagation lines pass nginx as frames finish, not all at once at the end
    with deployment.connect() as remote:
        session = remote.open(make_volume(slices=8, seed=51))
        session.add_prompt(0, points=[[33, 30]], labels=[1])
        arrivals = []
        affinity = {**AUTH, "X-MedSAM2-Client": remote.client_id}  # to the box that holds the session
        with httpx.Client(verify=deployment.tls, headers=affinity, timeout=60) as http:
            with http.stream("POST", f"{deployment.url}/v1/sessions/{session.id}/propagate",
                             json={"direction": "forward"}) as stream:
                assert stream.status_code == 200
                for line in stream.iter_lines():
                    if json.loads(line)["type"] == "frame":
                        arrivals.append(time.monotonic())
        assert len(arrivals) == 8
        assert arrivals[-1] - arrivals[0] > 0.3, "the frames arrived together: nginx buffered the stream"
        session.close()


def test_a_client_sticks_to_one_backend_and_clients_spread_over_both(deployment):
    clients = []
    try:
        first = deployment.connect()
        clients.append(first)
        home = deployment.backend_of(first)
        assert {deployment.backend_of(first).instance for _ in range(5)} == {home.instance}
        session = first.open(make_volume(seed=52))
        session.add_prompt(2, points=[[33, 30]], labels=[1])
        assert [httpx.get(f"{b.url}/v1/sessions/{session.id}", headers=AUTH, timeout=10).status_code
                for b in deployment.backends] == [200 if b is home else 404 for b in deployment.backends]
        seen = {home.instance}
        while len(seen) < 2 and len(clients) < 24:  # each new client id hashes anew
            clients.append(deployment.connect())
            seen.add(deployment.backend_of(clients[-1]).instance)
        assert len(seen) == 2, f"{len(clients)} clients all went to one backend"
    finally:
        for c in clients:
            c.close()


def test_killing_a_clients_backend_reopens_its_session_on_the_other_with_the_same_masks(deployment, model):
    vol = make_volume(seed=53)
    correction = np.zeros((64, 64), bool)
    correction[24:36, 26:40] = True
    local = model.open(vol)
    remote = deployment.connect()
    session = remote.open(vol)
    for s in (local, session):
        s.add_prompt(2, points=[[33, 30]], labels=[1])
        list(s.propagate())
        s.add_prompt(4, mask=correction)
        list(s.propagate(direction="forward", start=4))
    doomed = deployment.backend_of(remote)
    survivor = next(b for b in deployment.backends if b is not doomed)
    doomed.kill()
    with pytest.warns(SessionReopened, match="replayed 2 prompt.* and 2 propagation"):
        got = session.add_prompt(6, points=[[30, 30]], labels=[1])
    assert np.array_equal(got, local.add_prompt(6, points=[[30, 30]], labels=[1]))
    assert deployment.backend_of(remote) is survivor
    assert httpx.get(f"{survivor.url}/v1/sessions/{session.id}", headers=AUTH, timeout=10).status_code == 200
    same_frames(list(session.propagate(direction="forward", start=6)), list(local.propagate(direction="forward", start=6)))
    assert np.array_equal(session.masks(), local.masks()) and local.masks().any()
    remote.close()
