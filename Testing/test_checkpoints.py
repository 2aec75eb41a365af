"""Model registry and checkpoint handling, against a real HTTP server on 127.0.0.1.

The server supports Range requests and can drop the connection mid-file or ignore Range, so
resume, restart, verification, pinning and atomic publication run through real sockets and files.
"""

import dataclasses
import hashlib
import json
import logging
import re
import socket
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
import torch

from medsam2.models import checkpoints, registry
from medsam2.cli import main
from medsam2.errors import CheckpointError, InputError


# ------------------------------------------------------------------------------ loopback server

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        st = self.server.state
        rng = self.headers.get("Range")
        st.requests.append((self.path, rng))
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not st.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = st.drop_after.pop(self.path, None)
        if cut is not None and cut < len(body):
            # announce the whole body, send part of it, then hang up
            self.wfile.write(body[:cut])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    state = types.SimpleNamespace(files={}, requests=[], drop_after={}, ignore_range=False)
    state.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    httpd.state = state
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("MEDSAM2_CACHE_DIR", str(path))
    return path


def _torch_bytes(tmp_path, seed=0, n=80_000):
    """A real official-format checkpoint file (~320 kB), as bytes."""
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"src{seed}.pt"
    torch.save({"model": {"w": torch.randn(n, generator=g), "b": torch.zeros(3)}}, path)
    return path.read_bytes()


def _spec(url, data=None, **kw):
    """A registry-shaped entry for a test file; sha256/size published when `data` is given."""
    base = dict(name="test_model", filename="test_model.pt", url=url, sha256=None, size=None,
                sha256_source="")
    if data is not None:
        base.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                    sha256_source="test payload")
    base.update(kw)
    return dataclasses.replace(registry.get_spec("medsam2_latest"), **base)


# ------------------------------------------------------------------------------------ download

def test_download_verifies_and_publishes_only_the_finished_file(server, cache, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    spec = _spec(server.url("/m.pt"), data)
    dest = cache / "checkpoints" / "test_model.pt"
    part = cache / "checkpoints" / "test_model.pt.part"
    seen = []

    def on_progress(done, total):
        # while bytes arrive, only the .part exists; the final name appears after verification
        seen.append((done, total, dest.exists(), part.exists()))

    path = checkpoints.download(spec, progress=False, on_progress=on_progress, chunk_size=16384)

    assert path == dest and path.read_bytes() == data
    assert not part.exists()
    assert len(seen) > 5
    assert [s[0] for s in seen] == sorted(s[0] for s in seen)
    assert seen[-1][:2] == (len(data), len(data))
    assert not any(s[2] for s in seen) and all(s[3] for s in seen)
    ckpt = checkpoints.read_checkpoint(path)
    assert torch.equal(ckpt.state_dict["w"], torch.load(path, weights_only=True)["model"]["w"])
    assert ckpt.random_weights is False

    # a second call finds the verified file and does not download again
    n = len(server.requests)
    assert checkpoints.download(spec, progress=False) == dest
    assert len(server.requests) == n


def test_concurrent_downloads_of_one_file_fetch_it_once(server, cache, tmp_path):
    """Two downloads of the same file at once (two Slicer windows, a server and the CLI): one
    transfers, the other waits for its lock and gets the verified file."""
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    spec = _spec(server.url("/m.pt"), data)
    results, errors = [], []

    def fetch():
        try:
            results.append(checkpoints.download(spec, progress=False, chunk_size=4096))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == data
    assert [r for r in server.requests if r[0] == "/m.pt"] == [("/m.pt", None)]  # transferred once


def test_interrupted_download_keeps_part_and_resumes_with_range(server, cache, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    server.drop_after["/m.pt"] = 100_000
    spec = _spec(server.url("/m.pt"), data)
    dest = cache / "checkpoints" / "test_model.pt"
    part = cache / "checkpoints" / "test_model.pt.part"

    with pytest.raises(CheckpointError, match="interrupted.*run the download again to resume"):
        checkpoints.download(spec, progress=False, retries=0, chunk_size=8192)
    assert not dest.exists()
    assert part.stat().st_size == 100_000

    path = checkpoints.download(spec, progress=False, retries=0, chunk_size=8192)
    assert path.read_bytes() == data and not part.exists()
    assert server.requests == [("/m.pt", None), ("/m.pt", "bytes=100000-")]


def test_interrupted_download_resumes_by_itself(server, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    server.drop_after["/m.pt"] = 50_000
    path = checkpoints.download(_spec(server.url("/m.pt"), data), progress=False, chunk_size=8192)
    assert path.read_bytes() == data
    assert server.requests == [("/m.pt", None), ("/m.pt", "bytes=50000-")]


def test_server_ignoring_range_restarts_from_zero(server, cache, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    server.drop_after["/m.pt"] = 70_000
    spec = _spec(server.url("/m.pt"), data)
    with pytest.raises(CheckpointError):
        checkpoints.download(spec, progress=False, retries=0, chunk_size=8192)
    server.ignore_range = True  # answers 200 with the whole file: appending would corrupt it
    path = checkpoints.download(spec, progress=False, retries=0, chunk_size=8192)
    assert path.read_bytes() == data
    assert server.requests[-1] == ("/m.pt", "bytes=70000-")


def test_wrong_sha256_deletes_the_download(server, cache, tmp_path):
    good, bad = _torch_bytes(tmp_path, seed=0), _torch_bytes(tmp_path, seed=1)
    assert len(good) == len(bad)
    server.files["/m.pt"] = bad
    spec = _spec(server.url("/m.pt"), good)
    with pytest.raises(CheckpointError) as err:
        checkpoints.download(spec, progress=False)
    msg = str(err.value)
    assert spec.sha256 in msg and hashlib.sha256(bad).hexdigest() in msg and "deleted" in msg
    assert list((cache / "checkpoints").iterdir()) == []


def test_wrong_size_is_refused_before_downloading(server, cache, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    spec = dataclasses.replace(_spec(server.url("/m.pt"), data), size=len(data) + 1)
    with pytest.raises(CheckpointError, match=f"serves {len(data)} bytes"):
        checkpoints.download(spec, progress=False)
    assert not (cache / "checkpoints" / "test_model.pt").exists()


def test_cancel_keeps_part_and_next_download_resumes(server, cache, tmp_path):
    data = _torch_bytes(tmp_path)
    server.files["/m.pt"] = data
    spec = _spec(server.url("/m.pt"), data)
    cancel = threading.Event()
    part = cache / "checkpoints" / "test_model.pt.part"

    def on_progress(done, total):
        if done >= 3 * 8192:
            cancel.set()

    with pytest.raises(CheckpointError, match="download cancelled"):
        checkpoints.download(spec, progress=False, cancel=cancel, on_progress=on_progress,
                             chunk_size=8192)
    kept = part.stat().st_size
    assert kept == 3 * 8192 and not (cache / "checkpoints" / "test_model.pt").exists()

    path = checkpoints.download(spec, progress=False, chunk_size=8192)
    assert path.read_bytes() == data
    assert server.requests[-1] == ("/m.pt", f"bytes={kept}-")


def test_unreachable_server_gives_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _spec(f"http://127.0.0.1:{port}/m.pt")
    with pytest.raises(CheckpointError, match="cannot reach .*Connection refused.*checkpoint=FILE") as err:
        checkpoints.download(spec, progress=False, timeout=5)
    assert err.value.for_cli().endswith("pass it with --checkpoint FILE")


def test_http_error_says_how_to_go_on_in_python_and_cli_words(server, tmp_path):
    spec = _spec(server.url("/gone.pt"))  # the loopback server answers 404
    with pytest.raises(checkpoints.CheckpointUnavailable, match="HTTP 404") as err:
        checkpoints.download(spec, progress=False)
    assert 'checkpoint=FILE (medsam2.load_model("test_model", checkpoint=' in str(err.value)
    assert "--checkpoint" not in str(err.value)
    assert err.value.for_cli().endswith("download the file yourself and pass it with --checkpoint FILE")
    assert not (tmp_path / "cache" / "checkpoints" / "test_model.pt").exists()
    import pickle  # as it crosses to Slicer's process: both wordings survive

    again = pickle.loads(pickle.dumps(err.value))
    assert str(again) == str(err.value) and again.for_cli() == err.value.for_cli()
    assert again.text('the "checkpoint file" setting').endswith('pass it with the "checkpoint file" setting')


# ------------------------------------------------------------------------------------- pinning

def test_pin_on_first_download_then_tampered_file_is_rejected(server, cache, tmp_path, caplog):
    data = _torch_bytes(tmp_path)
    server.files["/MedSAM2_latest.pt"] = data
    sha = hashlib.sha256(data).hexdigest()
    assert registry.get_spec("medsam2_latest").sha256 is None  # no published checksum

    with caplog.at_level(logging.WARNING, logger="medsam2.models.checkpoints"):
        path = checkpoints.download("medsam2_latest", url=server.url("/MedSAM2_latest.pt"),
                                    progress=False)
    assert sha in caplog.text  # the user is told the pinned hash
    pins = json.loads((cache / "pins.json").read_text())["pins"]
    assert pins["medsam2_latest"]["sha256"] == sha and pins["medsam2_latest"]["size"] == len(data)
    assert checkpoints.resolve("medsam2_latest", download_if_missing=False) == path

    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"expected {sha} \\(pinned"):
        checkpoints.resolve("medsam2_latest")

    # an explicit download replaces the tampered copy with one that matches the pin
    checkpoints.download("medsam2_latest", url=server.url("/MedSAM2_latest.pt"), progress=False)
    assert checkpoints.sha256_file(path) == sha
    checkpoints.resolve("medsam2_latest", download_if_missing=False)


def test_pinned_hash_is_checked_on_later_downloads(server, cache, tmp_path):
    first, other = _torch_bytes(tmp_path, 0), _torch_bytes(tmp_path, 1)
    server.files["/x.pt"] = first
    url = server.url("/x.pt")
    path = checkpoints.download("medsam2_2411", url=url, progress=False)
    path.unlink()
    server.files["/x.pt"] = other  # the server now hands out a different file
    with pytest.raises(CheckpointError, match="pinned on first download.*--force"):
        checkpoints.download("medsam2_2411", url=url, progress=False)
    assert not path.exists()
    # deliberately accepting the new file re-pins it
    checkpoints.download("medsam2_2411", url=url, progress=False, force=True)
    assert checkpoints.pinned_sha256("medsam2_2411") == hashlib.sha256(other).hexdigest()


# ------------------------------------------------------------------------------------- resolve

def test_resolve_explicit_file_and_missing_cache(tmp_path):
    with pytest.raises(InputError, match="does not exist") as err:
        checkpoints.resolve("sam2.1_hiera_tiny", tmp_path / "nope.pt")
    assert isinstance(err.value, ValueError)
    mine = tmp_path / "mine.pt"
    mine.write_bytes(_torch_bytes(tmp_path))
    assert checkpoints.resolve("sam2.1_hiera_tiny", mine) == mine.resolve()
    with pytest.raises(CheckpointError, match="medsam2 download sam2.1_hiera_tiny"):
        checkpoints.resolve("sam2.1_hiera_tiny", download_if_missing=False)


def test_cached_file_with_published_hash_is_verified(cache):
    """A file placed in the cache under a published name must match the published sha256."""
    spec = registry.get_spec("sam2.1_hiera_tiny")
    dest = checkpoints.cached_path(spec)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * 1000)
    with pytest.raises(CheckpointError, match="1000 bytes but sam2.1_hiera_tiny is 156008466"):
        checkpoints.resolve(spec.name)


# ---------------------------------------------------------------------------------------- read

def test_read_checkpoint_rejects_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    good.write_bytes(_torch_bytes(tmp_path))
    raw = good.read_bytes()
    cases = {
        "truncated.pt": raw[: len(raw) // 2],
        "random.pt": bytes(range(256)) * 8,
        "empty.pt": b"",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="truncated, corrupt or not a PyTorch") as err:
            checkpoints.read_checkpoint(tmp_path / name)
        assert name in str(err.value) and "download it again" in str(err.value)

    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match="not a SAM2 checkpoint.*state_dict"):
        checkpoints.read_checkpoint(tmp_path / "nomodel.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="torch.save\\({'model'"):
        checkpoints.read_checkpoint(tmp_path / "bare.pt")
    torch.save({"model": {"w": torch.zeros(2), "step": 3}}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries: step"):
        checkpoints.read_checkpoint(tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.read_checkpoint(tmp_path / "missing.pt")


def test_read_checkpoint_reports_random_weights(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "medsam2_random_weights": True}, tmp_path / "r.pt")
    ckpt = checkpoints.read_checkpoint(tmp_path / "r.pt")
    assert ckpt.random_weights is True and ckpt.path == tmp_path / "r.pt"
    assert torch.equal(ckpt.state_dict["w"], torch.ones(2))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.head = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(1))


def test_load_state_dict_strict_refuses_mismatches_and_leaves_model_untouched():
    torch.manual_seed(0)
    model, donor = _Tiny(), _Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = donor.state_dict()

    missing = {k: v for k, v in good.items() if k != "head.bias"}
    with pytest.raises(CheckpointError, match="1 missing keys: head.bias") as err:
        checkpoints.load_state_dict_strict(model, missing, "tiny.pt")
    assert "tiny.pt does not fit _Tiny" in str(err.value)

    extra = {**good, **{f"extra.{i}": torch.zeros(1) for i in range(12)}}
    with pytest.raises(CheckpointError, match=r"12 unexpected keys: extra\.0.*\(2 more\)"):
        checkpoints.load_state_dict_strict(model, extra, "tiny.pt")

    wrong = {**good, "head.weight": torch.zeros(5, 4)}
    with pytest.raises(CheckpointError, match=r"head\.weight \(5, 4\) vs \(3, 4\)"):
        checkpoints.load_state_dict_strict(model, wrong, "tiny.pt")

    # the three failures copied nothing in
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    checkpoints.load_state_dict_strict(model, good, "tiny.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in good.items())


# ------------------------------------------------------------------------------------ registry

def test_registry_entries_are_complete_and_checksums_are_not_made_up():
    names = {s.name for s in registry.list_models()}
    assert {"sam2.1_hiera_tiny", "sam2.1_hiera_small", "sam2.1_hiera_base_plus",
            "sam2.1_hiera_large", "medsam2_latest", "medsam2_2411", "medsam2_us_heart",
            "medsam2_mri_liverlesion", "medsam2_ctlesion", "medsam2_pretrain"} == names
    assert registry.DEFAULT_MODEL in names
    for spec in registry.list_models():
        assert urlparse(spec.url).scheme == "https" and spec.url.endswith("/" + spec.filename)
        assert isinstance(spec.image_size, int) and spec.image_size % 16 == 0
        assert spec.family in ("sam2.1", "medsam2", "medsam2_pretrain")
        assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
        # a checksum is only there with the public page that states it
        assert (spec.sha256 is None) == (not spec.sha256_source)
        assert spec.sha256 is None or urlparse(spec.sha256_source).scheme == "https"
        assert spec.size is None or spec.size > 1_000_000
        assert spec["name"] == spec.name and spec.as_dict()["url"] == spec.url
    assert len({s.sha256 for s in registry.list_models() if s.sha256}) == 5
    for spec in registry.list_models():
        if spec.family == "medsam2":
            assert spec.image_size == 512 and spec.config.endswith("sam2.1_hiera_t.yaml")
            url = urlparse(spec.url)  # bowang-lab's files on the wanglab/MedSAM2 model page
            assert (url.scheme, url.netloc) == ("https", "huggingface.co")
            assert url.path.startswith("/wanglab/MedSAM2/resolve/main/")


def test_registry_configs_exist_in_sam2_and_overrides_compose():
    import sam2  # noqa: F401  (initialises hydra with sam2's config module)
    from hydra import compose

    for spec in registry.list_models():
        cfg = compose(config_name=spec.config,
                      overrides=[f"++model.image_size={spec.image_size}", *spec.hydra_overrides])
        attn = cfg.model.memory_attention.layer
        grid = spec.image_size // 16
        assert cfg.model.image_size == spec.image_size
        assert list(attn.self_attention.feat_sizes) == [grid, grid], spec.name
        assert list(attn.cross_attention.feat_sizes) == [grid, grid], spec.name
    # a smaller image size (as the tests use) scales the RoPE grid with it
    cfg = compose(config_name=registry.get_spec("medsam2_latest").config,
                  overrides=registry.hydra_overrides_for("medsam2_latest", 256))
    assert cfg.model.image_size == 256
    assert list(cfg.model.memory_attention.layer.cross_attention.feat_sizes) == [16, 16]


def test_get_spec_lookup_and_unknown_name():
    assert registry.get_spec("MedSAM2_latest.pt").name == "medsam2_latest"
    assert registry.get_spec("SAM2.1_HIERA_TINY").name == "sam2.1_hiera_tiny"
    with pytest.raises(InputError, match="unknown model 'sam3'.*medsam2_latest"):
        registry.get_spec("sam3")
    with pytest.raises(InputError, match="multiple of 16"):
        registry.hydra_overrides_for("medsam2_latest", 500)


def test_cache_dir_follows_env_and_defaults_to_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSAM2_CACHE_DIR", str(tmp_path / "c"))
    assert checkpoints.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MEDSAM2_CACHE_DIR")
    from platformdirs import user_cache_dir

    assert checkpoints.cache_dir() == type(tmp_path)(user_cache_dir("medsam2", appauthor=False))


# ----------------------------------------------------------------------------------------- CLI

def test_cli_download_and_models(server, cache, tmp_path, capsys):
    data = _torch_bytes(tmp_path)
    server.files["/MedSAM2_latest.pt"] = data
    sha = hashlib.sha256(data).hexdigest()

    assert main(["download", "medsam2_latest", "--url", server.url("/MedSAM2_latest.pt")]) == 0
    out, err = capsys.readouterr()
    dest = cache / "checkpoints" / "MedSAM2_latest.pt"
    assert str(dest) in out and f"sha256 {sha}" in out
    assert "MedSAM2_latest.pt" in err  # the progress bar

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("medsam2_latest "))
    assert "512 px" in line and "pinned" in line and str(dest) in line
    tiny = next(ln for ln in out.splitlines() if ln.startswith("sam2.1_hiera_tiny "))
    assert "published" in tiny and tiny.rstrip().endswith("no")

    assert main(["models", "--json", "--verify"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["medsam2_latest"]["verified"] == "ok"
    assert rows["medsam2_latest"]["sha256_expected"] == sha

    # the served file is not the official SAM 2.1 tiny: refused, nothing cached
    assert main(["download", "sam2.1_hiera_tiny", "--quiet", "--url",
                 server.url("/MedSAM2_latest.pt")]) == 1
    assert "is 156008466 bytes" in capsys.readouterr().err
    assert not (cache / "checkpoints" / "sam2.1_hiera_tiny.pt").exists()

    assert main(["download", "no_such_model"]) == 1
    assert "valid names" in capsys.readouterr().err


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    import argparse

    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, tmp_path / "o.pt")
    with pytest.raises(CheckpointError, match="Python objects besides tensors .*Namespace"):
        checkpoints.read_checkpoint(tmp_path / "o.pt")
