"""What a newcomer meets first: the demo and its prompts, and a first run without the network.

"Offline" is a real one: the processes run with their HTTPS proxy set to a loopback port that
refuses connections, or to a loopback proxy that answers 503, so the registry download fails the
way it does behind a dead proxy or without a network (and no test ever reaches the internet).
Each check runs in a fresh process, as a user's command does (urllib reads the proxy settings once
per process).
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_PROMPTS = ROOT / "Resources" / "demo" / "chest_prompts.json"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


class _FailingProxy(BaseHTTPRequestHandler):
    """A proxy that is up but cannot get through: 503 to every tunnel and request."""

    def do_CONNECT(self):
        self.server.seen.append(self.path)
        self.send_error(503, "upstream unreachable")

    do_GET = do_CONNECT

    def log_message(self, *args):
        pass


@pytest.fixture(params=["refused", "failing"])
def dead_proxy(request):
    """(proxy URL, what it saw): a loopback port nobody listens on, or a proxy answering 503."""
    if request.param == "refused":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield f"http://127.0.0.1:{port}", None
        return
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FailingProxy)
    httpd.daemon_threads = True
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.seen
    httpd.shutdown()
    httpd.server_close()


def _offline_env(tmp_path, proxy):
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}
    for var in ("http_proxy", "https_proxy"):
        env[var] = env[var.upper()] = proxy
    env["MEDSAM2_CACHE_DIR"] = str(tmp_path / "empty-cache")  # nothing downloaded yet
    env["PYTHONPATH"] = str(ROOT / "MedSAM2Slicer")  # this checkout's engine
    return env


def _run(args, env, timeout=300):
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_offline_load_model_names_the_checkpoint_argument_and_the_cli_names_the_flag(tmp_path, dead_proxy, ct_path):
    proxy, seen = dead_proxy
    env = _offline_env(tmp_path, proxy)
    python = _run([sys.executable, "-c", (
        "import medsam2\n"
        "try:\n"
        "    medsam2.load_model('medsam2_latest', device='cpu')\n"
        "except medsam2.CheckpointError as exc:\n"
        "    print(exc)\n")], env)
    assert python.returncode == 0, python.stderr
    message = python.stdout
    assert "cannot reach https://huggingface.co/" in message and "MedSAM2_latest.pt" in message
    assert 'checkpoint=FILE (medsam2.load_model("medsam2_latest", checkpoint=' in message
    assert "--checkpoint" not in message  # a CLI flag means nothing to a Python user
    if seen is not None:  # it went through the proxy, which said why it failed
        assert "503" in message and seen == ["huggingface.co:443"]

    cli = _run([sys.executable, "-m", "medsam2.cli", "segment", str(ct_path), "--prompts", str(DEMO_PROMPTS),
                "--output", str(tmp_path / "lungs.seg.nrrd"), "--device", "cpu"], env)
    assert cli.returncode == 1
    assert "medsam2 segment: error: cannot reach https://huggingface.co/" in cli.stderr
    assert "pass it with --checkpoint FILE" in cli.stderr and "checkpoint=FILE (" not in cli.stderr
    assert not (tmp_path / "lungs.seg.nrrd").exists()


def test_demo_offline_says_both_ways_on(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _offline_env(tmp_path, f"http://127.0.0.1:{port}")
    env.update(MEDSAM2_PYTHON=sys.executable, OUT=str(tmp_path / "demo" / "lungs.seg.nrrd"))
    demo = _run(["bash", "scripts/demo.sh"], env)
    assert demo.returncode == 1
    assert "MedSAM2 is installed in" in demo.stdout  # this checkout is importable: no install attempted
    assert "cannot reach https://huggingface.co/" in demo.stderr  # the download's own reason
    tail = demo.stderr[demo.stderr.index("Two ways on"):]
    assert "bash scripts/demo.sh --random-weights" in tail and "offline" in tail
    assert "bash scripts/demo.sh --checkpoint FILE" in tail and "MedSAM2_latest.pt" in tail
    assert not (tmp_path / "demo" / "lungs.seg.nrrd").exists()


def test_demo_takes_a_checkpoint_file_and_hands_it_to_segment(tmp_path):
    env = _offline_env(tmp_path, "http://127.0.0.1:9")
    env.update(MEDSAM2_PYTHON=sys.executable, OUT=str(tmp_path / "lungs.seg.nrrd"))
    missing = tmp_path / "MedSAM2_latest.pt"
    for args in (["--checkpoint", str(missing)], [f"--checkpoint={missing}"]):
        demo = _run(["bash", "scripts/demo.sh", *args], env)
        # segment got the file (no download was tried) and checked it before loading anything
        assert demo.returncode == 1, demo.stderr
        assert f"--checkpoint {missing}: no such file" in demo.stderr and "huggingface" not in demo.stderr
    both = _run(["bash", "scripts/demo.sh", "--random-weights", "--checkpoint", str(missing)], env)
    assert both.returncode == 2 and "not both" in both.stderr
    typo = _run(["bash", "scripts/demo.sh", "--checkpiont", str(missing)], env)
    assert typo.returncode == 2 and "unknown argument '--checkpiont'" in typo.stderr and "--checkpoint FILE" in typo.stderr


# --- the demo's prompts and the documented example point at the structures they name -------------

def _docs_example(tmp_path):
    text = (ROOT / "docs" / "cli.md").read_text()
    block = re.search(r"### Prompts JSON\s+```json\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "docs_example.json"
    path.write_text(block)
    return path


@pytest.mark.parametrize("source", ["demo", "docs/cli.md"])
def test_each_prompt_lies_in_the_segment_of_its_name(tmp_path, source, ct_path, ct_segmentation_path):
    import slicerio

    from medsam2.io import prompts_io, volume_io

    path = DEMO_PROMPTS if source == "demo" else _docs_example(tmp_path)
    volume = volume_io.read_volume(ct_path)
    objects = prompts_io.read_prompts([path])
    names = {obj.id: obj.name for obj in objects}
    reference = slicerio.read_segmentation(str(ct_segmentation_path))
    segment_of_label = {s["labelValue"]: s["name"] for s in reference["segments"]}
    lps_to_reference = np.linalg.inv(np.asarray(reference["ijkToLPS"], float))

    checked = []
    for fp in prompts_io.to_frame_prompts(objects, volume, 0):
        for (x, y), label in zip(fp.points, fp.labels):
            lps = volume.index_to_physical([x, y, fp.frame])[0]  # frames along k: pixel x = i, y = j
            i, j, k = np.round(lps_to_reference[:3, :3] @ lps + lps_to_reference[:3, 3]).astype(int)
            found = segment_of_label.get(int(reference["voxels"][i, j, k]), "background")
            name = names[fp.obj_id]
            if label == 1:
                assert found == name, f"{source}: an include point of {name!r} lies in {found!r}"
            else:
                assert found != name, f"{source}: an exclude point of {name!r} lies inside it"
            checked.append((name, label))
    assert {"right lung", "left lung"} <= {name for name, label in checked if label == 1}
    if source == "demo":
        assert json.loads(DEMO_PROMPTS.read_text())["coordinates"] == "ijk"
