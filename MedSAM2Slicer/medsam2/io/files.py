"""Files the engine writes and image files it reads, each done one way.

- `atomic_output`: every output (segmentations, label maps, mask PNGs, CSV, JSON, the checksum pins)
  is written to a temporary name beside its target and renamed into place, so an interrupted run
  never leaves half a file. The temporary file is created the way `open()` creates a file, with
  mode 0666 less the process's umask, so outputs get the permissions every other tool gives them
  (`tempfile.mkstemp` would make them 0600: unreadable to a colleague).
- `read_sitk_image`: SimpleITK's reader, whose RuntimeError becomes an InputError naming the file.

Standard library only at import: `checkpoints` uses this before torch or SimpleITK is installed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator

from ..errors import InputError


def _new_file(folder: str, prefix: str, suffix: str) -> str:
    """Create an empty file with a fresh name in `folder`, with the umask's permissions."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            os.close(os.open(path, flags, 0o666))  # the kernel applies the umask to 0666, as open() does
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_output(path, *, suffix: str | None = None, overwrite: bool = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; after the block, rename it onto `path` (atomic).

    suffix: the temporary file's ending, so writers that choose the format by extension (SimpleITK,
        slicerio, PIL) write the right one; default: everything after the first dot of the name.
    overwrite: False refuses to replace a `path` that appeared while the block ran (FileExistsError).
    On any error the temporary file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if suffix is None:
        dot = base.find(".", 1)
        suffix = base[dot:] if dot > 0 else ""
    stem = base[:len(base) - len(suffix)] if suffix and base.endswith(suffix) else base
    tmp = _new_file(folder, f".{stem}.", suffix)
    try:
        yield tmp
        if not overwrite and os.path.exists(path):
            raise FileExistsError(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def leftover_temporaries(path, suffix: str) -> list:
    """Temporary files atomic_output(path, suffix=suffix) left beside `path` when its process was
    killed (SIGKILL runs no cleanup): `.<stem>.<12 hex digits><suffix>`, this target's and no other's."""
    import re

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    stem = base[:len(base) - len(suffix)] if suffix and base.endswith(suffix) else base
    pattern = re.compile(rf"\.{re.escape(stem)}\.[0-9a-f]{{12}}{re.escape(suffix)}")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [os.path.join(folder, n) for n in names if pattern.fullmatch(n)]


def read_sitk_image(path, what: str = "", hint: str = ""):
    """SimpleITK's image of a file; a file it cannot read raises InputError.

    what: how the user named the file (e.g. "LABEL"), put before the path in the message.
    hint: what the file should be, appended to the message (e.g. the formats a verb accepts).
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        reason = f" ({lines[-1].strip()})" if lines else ""
        name = f"{what} {path}" if what else path
        raise InputError(f"{name}: SimpleITK cannot read this file{reason}{'. ' + hint if hint else ''}") from None
