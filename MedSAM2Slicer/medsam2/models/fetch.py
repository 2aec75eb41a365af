"""Fetching a checkpoint: the HTTP transfer (resumed with Range requests, restarted when a server
ignores them), one download of a file at a time across processes (an OS file lock), and the
checks before a verified file is published under its final name. checkpoints.py is the public face."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import sys
import time
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from ..errors import CheckpointError
from .checkpoints import (CheckpointUnavailable, DownloadCancelled, _write_pin, cache_dir, pinned_sha256, sha256_file,
                          verify_file)

log = logging.getLogger("medsam2.models.checkpoints")


class _Interrupted(Exception):
    """The transfer stopped before the end; the .part file holds what arrived."""


def _content_range(value):
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); else (None, None)."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _int_header(headers, key):
    try:
        return int(headers.get(key))
    except (TypeError, ValueError):
        return None


def _open(url, offset, timeout):
    req = Request(url, headers={"User-Agent": "medsam2-slicer", "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    return urlopen(req, timeout=timeout)


def _fetch(spec, url, part: Path, *, progress, cancel, on_progress, chunk_size, timeout):
    """Append the rest of `url` to `part` (or restart it if the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    if spec.size is not None and offset > spec.size:
        part.unlink()
        offset = 0
    if spec.size is not None and offset == spec.size and offset:
        return  # finished earlier, but not yet verified and moved
    try:
        resp = _open(url, offset, timeout)
    except HTTPError as exc:
        if exc.code == 416 and offset:
            # Range past the end: the .part is complete, or it belongs to another file.
            _, total = _content_range(exc.headers.get("Content-Range"))
            if total == offset:
                return
            part.unlink()
            return _fetch(spec, url, part, progress=progress, cancel=cancel,
                          on_progress=on_progress, chunk_size=chunk_size, timeout=timeout)
        raise CheckpointUnavailable(
            f"downloading {spec.name} from {url} failed: HTTP {exc.code} {exc.reason}. Try again later, "
            "or download the file yourself and pass it with {way}", spec.name
        ) from exc
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointUnavailable(
            f"cannot reach {url} to download {spec.name} ({reason}). Check the network, or "
            "download the file yourself and pass it with {way}", spec.name
        ) from exc

    with resp:
        status = getattr(resp, "status", 200)
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                resp.close()
                part.unlink()
                return _fetch(spec, url, part, progress=progress, cancel=cancel,
                              on_progress=on_progress, chunk_size=chunk_size, timeout=timeout)
            mode = "ab"
        else:
            if offset:
                log.info("%s ignored the Range request; restarting %s from the start",
                         url, spec.filename)
            offset, mode = 0, "wb"
            total = _int_header(resp.headers, "Content-Length")
        if total is None:
            total = spec.size
        if spec.size is not None and total is not None and total != spec.size:
            raise CheckpointError(
                f"{url} serves {total} bytes but {spec.name} ({spec.filename}) is {spec.size} "
                "bytes; this is not the expected file (check --url)"
            )

        _copy_body(resp, part, mode, offset, total, spec, progress, cancel, on_progress, chunk_size)




def _copy_body(resp, part: Path, mode: str, offset: int, total, spec, progress, cancel, on_progress, chunk_size):
    """Stream the response into `part` from `offset`, honouring cancel, reporting progress."""
    done = offset
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                   unit_divisor=1024, desc=spec.filename, file=sys.stderr, leave=True)
    try:
        with open(part, mode) as f:
            while True:
                if cancel is not None and cancel.is_set():
                    raise DownloadCancelled(
                        f"download cancelled: {done} of {total or '?'} bytes of "
                        f"{spec.filename} kept in {part}; download again to resume"
                    )
                try:
                    block = resp.read(chunk_size)
                except (http.client.HTTPException, OSError) as exc:
                    raise _Interrupted(f"{done} of {total or '?'} bytes: {exc}") from exc
                if not block:
                    break
                f.write(block)
                done += len(block)
                if bar is not None:
                    bar.update(len(block))
                if on_progress is not None:
                    on_progress(done, total)
    finally:
        if bar is not None:
            bar.close()
    if total is not None and done < total:
        raise _Interrupted(f"connection closed after {done} of {total} bytes")


def lock_path(dest: Path) -> Path:
    """Lock files live in the cache's own folder (never beside the user's checkpoints), one per
    destination path."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(dest.resolve()).encode()).hexdigest()[:16]
    return locks / f"{dest.name}.{key}.lock"


@contextlib.contextmanager
def exclusive(lock_path: Path, cancel, what):
    """Hold an OS lock on `lock_path` (flock on POSIX, msvcrt on Windows); waiting honours cancel."""
    with open(lock_path, "a+b") as handle:
        told = False
        while not _try_lock(handle):
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("download cancelled")
            if not told:
                log.warning("another process is downloading %s; waiting for it", what)
                told = True
            time.sleep(0.2)
        try:
            yield
        finally:
            _unlock(handle)


def _try_lock(handle) -> bool:
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(handle) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def download_locked(spec, src, folder, progress, cancel, on_progress, force, retries, chunk_size, timeout):
    dest = folder / spec.filename
    part = folder / (spec.filename + ".part")

    if force:
        part.unlink(missing_ok=True)
    elif dest.is_file():
        try:
            verify_file(spec, dest)
            return dest
        except CheckpointError as exc:
            log.warning("%s; downloading it again", exc)

    expected, origin = (spec.sha256.lower(), "published") if spec.sha256 else (None, "")
    if expected is None and not force:
        expected = pinned_sha256(spec)
        origin = "pinned on first download" if expected else ""

    attempt = 0
    while True:
        try:
            _fetch(spec, src, part, progress=progress, cancel=cancel, on_progress=on_progress,
                   chunk_size=chunk_size, timeout=timeout)
            break
        except _Interrupted as exc:
            attempt += 1
            if attempt > retries:
                raise CheckpointError(
                    f"download of {spec.filename} from {src} was interrupted ({exc}); the "
                    f"partial file {part} is kept: run the download again to resume it"
                ) from exc
            log.warning("download of %s interrupted (%s); resuming (try %d of %d)",
                        spec.filename, exc, attempt, retries)
            time.sleep(min(2.0 ** (attempt - 1), 10.0) * 0.5)

    size = part.stat().st_size
    if spec.size is not None and size != spec.size:
        part.unlink()
        raise CheckpointError(
            f"downloaded {size} bytes from {src} but {spec.name} is {spec.size} bytes; the "
            "download was deleted. Check --url and try again"
        )
    actual = sha256_file(part)
    if expected is not None and actual != expected:
        part.unlink()
        raise CheckpointError(
            f"the file downloaded from {src} does not match {spec.name}: sha256 {actual}, "
            f"expected {expected} ({origin}). The download was deleted. Check --url; "
            + ("if the upstream file was deliberately updated, `medsam2 download "
               f"{spec.name} --force` re-pins it." if origin.startswith("pinned") else
               "if this repeats, the server is not serving the official file.")
        )
    with open(part, "rb+") as f:  # make the data durable before the rename publishes it
        os.fsync(f.fileno())
    if expected is None:
        _write_pin(spec, actual, src, size)
    os.replace(part, dest)
    return dest
