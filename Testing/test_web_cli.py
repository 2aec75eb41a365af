"""`medsam2 web` as a command: found as a plug-in verb, refusing bad arguments before anything
heavy loads, and the layering the project promises (the engine never imports the shells; the web
shell never imports Qt or the Slicer module)."""

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "MedSAM2Slicer"


def run_cli(*args, env=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGES), *(env or {}).pop("EXTRA_PATH", [])]),
           **(env or {})}
    return subprocess.run([sys.executable, "-m", "medsam2.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_web_is_listed_from_a_source_tree_without_loading_trame_or_vtk():
    code = ("import sys; from medsam2.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('trame', 'vtk', 'slicer', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(PACKAGES)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # `medsam2 --help` stays instant
    help_text = run_cli("--help").stdout
    assert "web" in help_text and "segment in a web browser" in help_text


def test_a_verb_from_an_installed_entry_point_runs(tmp_path):
    """Real entry-point discovery: a distribution's metadata on sys.path declares `hello`."""
    (tmp_path / "hello_verb.py").write_text(
        "HELP = 'say hello'\n"
        "def add_arguments(p):\n    p.add_argument('--name', default='world')\n"
        "def run(args):\n    print('hello', args.name)\n    return 3\n")
    dist = tmp_path / "hello_verb-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-verb\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[medsam2.verbs]\nhello = hello_verb\nsegment = hello_verb\n")
    out = run_cli("hello", "--name", "web", env={"EXTRA_PATH": [str(tmp_path)]})
    assert (out.returncode, out.stdout.strip()) == (3, "hello web"), out.stderr
    listed = run_cli("--help", env={"EXTRA_PATH": [str(tmp_path)]}).stdout
    assert "say hello" in listed
    # a plug-in cannot take over a built-in verb
    assert "hello" not in run_cli("segment", "--help", env={"EXTRA_PATH": [str(tmp_path)]}).stdout


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without a page token"),
    (["--host", "192.168.1.20"], "--page-token-file"),
    (["--output", "out.nii.gz"], "name it .seg.nrrd"),
    (["--token-file", "t"], "--token-file is the token of --server URL"),
    (["--port", "0"], "--port 0: must be 1..65535"),
    (["--checkpoint", "missing.pt"], "--checkpoint missing.pt: no such file"),
    (["--server", "http://gpu:8765", "--checkpoint", "VOLUME"], "drop --checkpoint"),
    (["--public-url", "medsam2.example.org"], "give the full address"),
])
def test_bad_arguments_are_refused_before_anything_loads(tmp_path, monkeypatch, capsys, args, message):
    from medsam2 import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDSAM2_WEB_TOKEN", raising=False)
    volume = tmp_path / "ct.nrrd"
    volume.write_bytes(b"")  # never read: the refusal comes first
    args = [str(volume) if a == "VOLUME" else a for a in args]
    assert cli.main(["web", str(volume), *args]) == 1
    assert message in capsys.readouterr().err


def test_an_existing_output_and_a_missing_volume_are_refused(tmp_path, monkeypatch, capsys):
    from medsam2 import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ct.seg.nrrd").write_bytes(b"x")
    (tmp_path / "ct.nrrd").write_bytes(b"")
    assert cli.main(["web", "ct.nrrd"]) == 1  # default output: ct.seg.nrrd here
    assert "ct.seg.nrrd: already exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["web", "nothing.nrrd"]) == 1
    assert "nothing.nrrd: no such file or folder" in capsys.readouterr().err


def test_network_listening_with_a_page_token_passes_the_checks(tmp_path, monkeypatch):
    from MedSAM2Web.cli import check_arguments
    from medsam2.cli.main import build_parser

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    args = build_parser().parse_args(["web", "--host", "0.0.0.0", "--page-token-file", str(token),
                                      "--output", str(tmp_path / "o.seg.nrrd")])
    assert check_arguments(args)[0] == "s3cret"
    monkeypatch.setenv("MEDSAM2_WEB_TOKEN", "from-env")
    args = build_parser().parse_args(["web", "--host", "0.0.0.0", "--output", str(tmp_path / "o.seg.nrrd")])
    assert check_arguments(args)[0] == "from-env"


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_imports_point_down_only():
    for path in (PACKAGES / "medsam2").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("MedSAM2Lib", "MedSAM2Web", "MedSAM2")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for path in (PACKAGES / "MedSAM2Web").rglob("*.py"):
        bad = [m for m in _imports(path) if m.split(".")[0] in ("qt", "ctk", "MedSAM2", "slicer.util")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    # one door to MedSAM2Lib's module logic: only the adapter; the views take Slicer geometry helpers
    users = {p.name: {m for m in _imports(p) if m.split(".")[0] == "MedSAM2Lib"}
             for p in (PACKAGES / "MedSAM2Web").rglob("*.py")}
    users = {name: mods for name, mods in users.items() if mods}
    assert "segmenter.py" in users, users
    for name, mods in users.items():  # elsewhere only the scene and geometry helpers, the shortcut table
        assert name == "segmenter.py" or mods <= {"MedSAM2Lib.geometry", "MedSAM2Lib.volume",  # and the views'
                                                  "MedSAM2Lib.shortcuts", "MedSAM2Lib.view_watch"}, users  # watch


def test_an_unreadable_volume_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "ct.nrrd"
    bad.write_text("not an image")
    start = time.monotonic()
    out = run_cli("web", bad, "--output", tmp_path / "o.seg.nrrd", "--port", "9")  # default model: not cached
    assert out.returncode == 1 and "SimpleITK cannot read this file" in out.stderr, out.stderr
    assert "RANDOM" not in out.stderr and "download" not in out.stderr.lower()
    assert time.monotonic() - start < 60


def test_the_same_origin_guard_on_a_real_aiohttp_server():
    """Cross-site requests and DNS-rebound host names are refused; the page's own requests pass."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from MedSAM2Web.access import SameOriginGuard

    async def page(request):
        return web.Response(text="page")

    async def scenario(guard):
        app = web.Application()
        guard.install(app)
        app.router.add_get("/", page)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            own = f"127.0.0.1:{client.port}"
            codes = {}
            for name, headers in {
                "plain": {}, "own origin": {"Origin": f"http://{own}"},
                "foreign origin": {"Origin": "http://evil.example"},
                "rebound host": {"Host": f"evil.example:{client.port}"},
                "proxied": {"Host": "medsam2.example.org", "Origin": "https://medsam2.example.org"},
            }.items():
                codes[name] = (await client.get("/", headers=headers)).status
            return codes

    loopback = asyncio.run(scenario(SameOriginGuard(loopback_only=True)))
    assert loopback == {"plain": 200, "own origin": 200, "foreign origin": 403, "rebound host": 403, "proxied": 403}
    behind_proxy = asyncio.run(scenario(SameOriginGuard(True, public_url="https://medsam2.example.org/")))
    assert behind_proxy["proxied"] == 200 and behind_proxy["rebound host"] == 403
    anywhere = asyncio.run(scenario(SameOriginGuard(loopback_only=False)))
    assert anywhere["rebound host"] == 200 and anywhere["foreign origin"] == 403
