"""Checkpoint cache: download (resumable, verified, atomic), pinning, reading and strict loading.

Layout of the cache (`cache_dir()`, or `$MEDSAM2_CACHE_DIR`):

    checkpoints/<file>        verified registry files
    checkpoints/<file>.part   an unfinished download, resumed with an HTTP Range request
    pins.json                 sha256 recorded on first download of files with no published checksum

Downloading needs only the standard library (urllib) and tqdm, and torch is imported only to read
a checkpoint, so the Slicer module can fetch weights before torch is installed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import Cancelled, CheckpointError, InputError
from ..io.files import atomic_output
from .registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
PINS_FILE = "pins.json"
_ENV = "MEDSAM2_CACHE_DIR"


class DownloadCancelled(Cancelled, CheckpointError):
    """The user cancelled a download (the part already fetched is kept to resume)."""


class CheckpointUnavailable(CheckpointError):
    """No usable checkpoint (a download that failed, a file not downloaded yet, a bad file), with the
    way on that a user can take: give a local file. How to give it depends on who asks: from Python
    (`str(error)`), the `checkpoint=` argument of `medsam2.load_model`; on the command line
    (`error.for_cli()`), `--checkpoint FILE`; another front end passes its own words to `text()`."""

    CLI_WAY = "--checkpoint FILE"

    def __init__(self, template: str, model: str | None = None):
        self.template = template  # "{way}" marks where the way to give a file goes
        self.model = model
        super().__init__(self.text())

    def text(self, way: str | None = None) -> str:
        if way is None:
            way = (f'checkpoint=FILE (medsam2.load_model("{self.model}", checkpoint="path/to/file.pt"))'
                   if self.model else "the checkpoint= argument of medsam2.load_model")
        return self.template.replace("{way}", way)

    def for_cli(self) -> str:
        return self.text(self.CLI_WAY)

    def __reduce__(self):  # across processes (Slicer's engine process) keep both wordings
        return type(self), (self.template, self.model)


# --------------------------------------------------------------------------------------- paths

def cache_dir() -> Path:
    """`$MEDSAM2_CACHE_DIR` if set, else the user cache dir for "medsam2" (not created here)."""
    env = os.environ.get(_ENV)
    if env:
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:  # a bare Slicer Python before install; same place platformdirs uses on Linux
        return Path.home() / ".cache" / "medsam2"
    return Path(user_cache_dir("medsam2", appauthor=False))


def checkpoints_dir() -> Path:
    return cache_dir() / "checkpoints"


def cached_path(name) -> Path:
    """Where the registry file for `name` lives in the cache (it may not exist yet)."""
    return checkpoints_dir() / get_spec(name).filename


def sha256_file(path, chunk_size: int = CHUNK_SIZE) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------- pins

def _pins_path() -> Path:
    return cache_dir() / PINS_FILE


def read_pins() -> dict:
    """{name: {"sha256", "size", "url", "filename", "pinned"}} for files pinned on first download."""
    path = _pins_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pins = data.get("pins", {})
        if not isinstance(pins, dict):
            raise ValueError("'pins' is not an object")
        return pins
    except (OSError, ValueError) as exc:
        # An unreadable pin file must not silently disable verification.
        raise CheckpointError(
            f"cannot read the checksum pins in {path} ({exc}); fix or delete that file "
            "(deleting it re-pins each cached file on its next use)"
        ) from exc


def pinned_sha256(name) -> str | None:
    pin = read_pins().get(get_spec(name).name)
    return pin.get("sha256") if pin else None


def _write_pin(spec: ModelSpec, sha256: str, url: str, size: int) -> None:
    pins = read_pins()
    pins[spec.name] = {
        "sha256": sha256,
        "size": size,
        "url": url,
        "filename": spec.filename,
        "pinned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = _pins_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:  # a crash never leaves a half-written pin file
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "pins": pins}, f, indent=2, sort_keys=True)
            f.write("\n")
    log.warning(
        "%s has no published sha256; pinned it on first download: sha256 %s (%d bytes, from %s). "
        "Every later load checks this hash (pins in %s).", spec.filename, sha256, size, url, path,
    )


def expected_sha256(name) -> tuple[str | None, str]:
    """(sha256, where it comes from): the registry's published hash, else the pin, else None."""
    spec = get_spec(name)
    if spec.sha256:
        return spec.sha256.lower(), f"published ({spec.sha256_source or 'registry'})"
    pinned = pinned_sha256(spec)
    if pinned:
        return pinned, f"pinned on first download in {_pins_path()}"
    return None, "unknown"


# ---------------------------------------------------------------------------------- verification

def verify_file(name, path, *, pin_if_unknown: bool = True) -> str:
    """Check `path` against `name`'s size and sha256 (published or pinned); return its sha256.

    A file with no known hash is pinned now (when `pin_if_unknown`). Raises CheckpointError on a
    mismatch, naming the file, both hashes and the command that replaces it.
    """
    spec = get_spec(name)
    path = Path(path)
    fix = f"delete it and download it again: `medsam2 download {spec.name} --force`"
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        raise CheckpointError(
            f"{path} is {size} bytes but {spec.name} is {spec.size} bytes: the file is truncated "
            f"or not {spec.filename}; {fix}"
        )
    actual = sha256_file(path)
    expected, origin = expected_sha256(spec)
    if expected is None:
        if pin_if_unknown:
            _write_pin(spec, actual, spec.url, size)
        return actual
    if actual != expected:
        hint = ""
        if origin.startswith("pinned"):
            hint = (" If the upstream file was deliberately updated, `--force` downloads it again "
                    "and re-pins it.")
        raise CheckpointError(
            f"{path} does not match {spec.name}: sha256 {actual}, expected {expected} "
            f"({origin}). The file is corrupt or was changed; {fix}.{hint}"
        )
    return actual


# ------------------------------------------------------------------------------------- download

def download(name_or_spec, url=None, dest_dir=None, progress=True, cancel=None, on_progress=None,
             *, force=False, retries=3, chunk_size=CHUNK_SIZE, timeout=60.0) -> Path:
    """Download a registry checkpoint into the cache, verify it, and return its path.

    name_or_spec: registry name (or file name) or a ModelSpec.
    url: overrides the registry URL (a mirror, or a loopback server in tests).
    dest_dir: folder for the file (default `cache_dir()/checkpoints`).
    progress: show a tqdm bar on stderr.
    cancel: a threading.Event checked before every chunk; when set, raises CheckpointError
        ("download cancelled") and keeps `<file>.part`, so the next call resumes.
    on_progress(done_bytes, total_bytes): called after every chunk; total_bytes is None when
        neither the server nor the registry states the size.
    force: download again even if a verified file is there, and re-pin a file with no
        published checksum.
    retries: how many times an interrupted transfer is resumed before giving up.

    The data streams into `<file>.part` (resumed with an HTTP Range request when it exists;
    restarted if the server ignores Range), then its size and sha256 are checked against the
    registry, or against the pin recorded on the first download; a file with neither is pinned
    now. Only a verified file is moved (os.replace, atomic) to its final name, so a partial or
    wrong file never appears there. A wrong hash deletes the download and raises CheckpointError.
    """
    spec = get_spec(name_or_spec)
    folder = Path(dest_dir) if dest_dir is not None else checkpoints_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # one download of a file at a time, across processes (two Slicer windows, a server and the
    # CLI): the second waits, then finds the verified file the first one published
    from .fetch import download_locked, exclusive, lock_path  # the transfer itself: fetch.py

    with exclusive(lock_path(folder / spec.filename), cancel, spec.filename):
        return download_locked(spec, url or spec.url, folder, progress, cancel, on_progress, force,
                                retries, chunk_size, timeout)


# -------------------------------------------------------------------------------------- resolve

def resolve(name, checkpoint=None, download_if_missing=True, **download_kw) -> Path:
    """The checkpoint file to load for `name`.

    checkpoint: an explicit local file (a fine-tune, an offline copy); it must exist and is used
        as is (InputError otherwise).
    Otherwise the cached registry file, verified against its published or pinned sha256 (a
    mismatch raises CheckpointError), or, when missing and `download_if_missing`, a download.
    """
    if checkpoint is not None and str(checkpoint) != "":
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise InputError(
                f"checkpoint file {path} does not exist or is not a file; pass an existing "
                f".pt/.pth file, or leave the checkpoint out to use the registry's {name}"
            )
        return path.resolve()
    spec = get_spec(name)
    dest = Path(download_kw["dest_dir"]) / spec.filename if download_kw.get("dest_dir") \
        else checkpoints_dir() / spec.filename
    if dest.is_file():
        verify_file(spec, dest)
        return dest
    if not download_if_missing:
        raise CheckpointUnavailable(
            f"{spec.name} is not downloaded yet ({dest} is missing): run "
            f"`medsam2 download {spec.name}` or pass a local file with {{way}}", spec.name
        )
    return download(spec, **download_kw)


# ---------------------------------------------------------------------------------------- read

@dataclass
class Checkpoint:
    state_dict: dict
    random_weights: bool
    path: Path
    sha256: str | None = None


def read_checkpoint(path, sha256=None, users_file: bool = False) -> Checkpoint:
    """Read an official-format checkpoint `{"model": state_dict}` on the CPU.

    users_file: the file is one the user gave (not the cache's download), so a bad one is said to
    be the wrong file, not a download to repeat.

    Uses `torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary
    pickled code. A truncated, corrupt or non-PyTorch file, or one without a "model" state dict,
    raises CheckpointError naming the file and what to do. Files written by
    `medsam2.testing.write_random_checkpoint` carry `"medsam2_random_weights": True`.
    """
    import torch

    path = Path(path)
    fix = ("delete it and download it again (`medsam2 download NAME --force`), or pass a good "
           "file with {way}")
    if users_file:
        fix = "give the model's checkpoint file (e.g. MedSAM2_latest.pt as downloaded) with {way}"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle, EOF and key errors all mean "not a good file"
        text = str(exc)
        detail = (text.strip().splitlines() or [""])[0][:200]
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:  # a real pickle, but with Python objects we refuse to unpickle
            raise CheckpointError(
                f"{path} holds Python objects besides tensors ({found.group(1)}), which are not "
                "loaded for safety. Re-save only the weights: "
                "torch.save({'model': state_dict}, path)"
            ) from exc
        if users_file:  # the unpickler's reason ("KeyError: 101") means nothing to whoever chose the file
            raise CheckpointUnavailable(
                f"{path} is not a PyTorch checkpoint: torch.load cannot read it (a checkpoint saved with "
                f"torch.save is a zip archive; this file is truncated, damaged or of another kind); {fix}"
            ) from exc
        if "WeightsUnpickler error:" in text:  # the unpickler's reason, not its long preamble
            detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0][:200]
        raise CheckpointUnavailable(
            f"cannot read checkpoint {path}: it is truncated, corrupt or not a PyTorch file "
            f"({type(exc).__name__}: {detail}); {fix}"
        ) from exc
    if not isinstance(obj, dict) or "model" not in obj:
        what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) \
            else f"a {type(obj).__name__}"
        raise CheckpointError(
            f"{path} is {what}, not a SAM2 checkpoint {{'model': state_dict}}. If it is a bare "
            "state dict, re-save it with torch.save({'model': state_dict}, path)"
        )
    state = obj["model"]
    bad = [] if isinstance(state, dict) else [type(state).__name__]
    if not bad:
        bad = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)][:5]
    if bad or not state:
        raise CheckpointUnavailable(
            f"{path}: 'model' is not a state dict of tensors"
            + (f" (non-tensor entries: {', '.join(bad)})" if bad else " (it is empty)")
            + f"; {fix}"
        )
    return Checkpoint(
        state_dict=dict(state),
        random_weights=bool(obj.get("medsam2_random_weights", False)),
        path=path,
        sha256=sha256,
    )


def load_state_dict_strict(module, state_dict, source) -> None:
    """Load `state_dict` into `module`; any missing, unexpected or mis-shaped key is an error.

    Keys and shapes are compared before anything is copied, so a mismatch leaves `module`
    untouched. The CheckpointError lists up to 10 keys of each kind with the counts.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and hasattr(state_dict[k], "shape")
        and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mis_shaped):
        result = module.load_state_dict(state_dict, strict=False)
        # Modules with load hooks can still report keys; those are errors too.
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
        if not (missing or unexpected):
            return
    model = type(module).__name__

    def part(label, keys):
        if not keys:
            return ""
        more = f", ... ({len(keys) - 10} more)" if len(keys) > 10 else ""
        return f"\n  {len(keys)} {label}: {', '.join(keys[:10])}{more}"

    raise CheckpointError(
        f"{source} does not fit {model}:"
        + part("missing keys", missing)
        + part("unexpected keys", unexpected)
        + part("shape mismatches (checkpoint vs model)", mis_shaped)
        + "\nIs it a checkpoint of this model and size (e.g. a SAM 2.1 tiny file needs "
        "--model sam2.1_hiera_tiny, MedSAM2 files need a medsam2_* model)?"
    )
