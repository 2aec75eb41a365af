"""Image-feature cache: every frame is encoded once per (volume, window, image size).

The image encoder is ~90% of SAM2's cost, and it does not depend on prompts or memory, so clicks on
a seen slice, corrections and re-propagation reuse cached features. To keep memory flat in the
number of slices, only a bounded number of bytes stay in RAM (most recently used first); the rest
spill losslessly to a session-scoped file on disk and are read back with plain file I/O (page cache,
not process memory). Position encodings are identical for every frame, so one copy is kept.
Every tensor is stored in the dtype the encoder produced (float32, or bfloat16 for the levels
that autocast leaves in bfloat16) and handed back in it: a cached frame is exactly a fresh one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import tempfile
import threading
from collections import OrderedDict

import numpy as np
import torch

# Reading a spilled frame back from the page cache takes about a millisecond, against a few
# hundred for encoding it, so RAM holds only the most recent frames.
DEFAULT_RAM_MB = float(os.environ.get("MEDSAM2_FEATURE_RAM_MB", "32"))

_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


class FeatureCache:
    """Per-frame backbone outputs of one frame source, lossless."""

    def __init__(self, ram_mb: float | None = None, spill_dir=None):
        self.ram_bytes = int((DEFAULT_RAM_MB if ram_mb is None else ram_mb) * 2**20)
        self._spill_dir = spill_dir
        self._ram: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._ram_used = 0
        self._on_disk: dict[int, int] = {}  # frame -> slot in the spill file
        self._file = None
        self._layout = None  # (shape, dtype) of each per-frame tensor (the same for every frame)
        self._record_bytes = 0
        self._pos_enc = None  # shared vision position encodings
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    # -- public -----------------------------------------------------------------------------
    def __contains__(self, frame: int) -> bool:
        return frame in self._ram or frame in self._on_disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._on_disk)

    def get(self, frame: int, device) -> dict | None:
        """The backbone output of `frame` on `device`, or None if not cached."""
        with self._lock:
            if frame in self._ram:
                self._ram.move_to_end(frame)
                tensors = self._ram[frame]
            elif frame in self._on_disk:
                tensors = self._read_slot(self._on_disk[frame])
            else:
                self.misses += 1
                return None
            self.hits += 1
            pos = self._pos_enc
        fpn = [t.to(device) for t in tensors]
        return {"backbone_fpn": fpn, "vision_pos_enc": [p.to(device) for p in pos]}

    def put(self, frame: int, backbone_out: dict) -> None:
        fpn = [t.detach() for t in backbone_out["backbone_fpn"]]
        if fpn[0].shape[0] != 1:
            raise ValueError("cache one frame at a time (batch size 1)")
        with self._lock:
            if self._pos_enc is None:
                self._pos_enc = [p.detach()[:1].clone() for p in backbone_out["vision_pos_enc"]]
                self._layout = [(tuple(t.shape), t.dtype) for t in fpn]
                self._record_bytes = sum(int(np.prod(shape)) * _itemsize(dtype) for shape, dtype in self._layout)
            elif [(tuple(t.shape), t.dtype) for t in fpn] != self._layout:
                raise ValueError("every frame of a cache must have the same feature shapes and dtypes")
            stored = [t.to("cpu", copy=True) for t in fpn]
            self._drop(frame)
            self._ram[frame] = stored
            self._ram_used += self._record_bytes
            while self._ram_used > self.ram_bytes and len(self._ram) > 1:
                old, tensors = self._ram.popitem(last=False)
                self._ram_used -= self._record_bytes
                self._write_slot(old, tensors)

    def keep_in_ram(self, frame: int) -> None:
        """Bring a spilled frame back into RAM as the most recently used (a prepared click there
        then reads no file); nothing for a frame in RAM already, or not cached."""
        with self._lock:
            if frame in self._ram:
                self._ram.move_to_end(frame)
                return
            if frame not in self._on_disk:
                return
            tensors = self._read_slot(self._on_disk[frame])
        self.put(frame, {"backbone_fpn": tensors, "vision_pos_enc": self._pos_enc})

    def stats(self) -> dict:
        return {"frames": len(self), "in_ram": len(self._ram), "on_disk": len(self._on_disk),
                "ram_bytes": self._ram_used, "hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._ram.clear()
            self._on_disk.clear()
            self._ram_used = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- internals --------------------------------------------------------------------------
    def _drop(self, frame: int) -> None:
        if self._ram.pop(frame, None) is not None:
            self._ram_used -= self._record_bytes
        self._on_disk.pop(frame, None)  # its slot is simply reused later

    def _write_slot(self, frame: int, tensors: list[torch.Tensor]) -> None:
        if self._file is None:
            # an unlinked temporary file: the OS frees it even if the process dies
            self._file = tempfile.TemporaryFile(dir=self._spill_dir, prefix="medsam2-features-")
        used = set(self._on_disk.values())
        slot = next(i for i in range(len(used) + 1) if i not in used)
        raw = b"".join(_as_bytes(t) for t in tensors)
        os.pwrite(self._file.fileno(), raw, slot * self._record_bytes)
        self._on_disk[frame] = slot

    def _read_slot(self, slot: int) -> list[torch.Tensor]:
        raw = os.pread(self._file.fileno(), self._record_bytes, slot * self._record_bytes)
        out, offset = [], 0
        for shape, dtype in self._layout:
            nbytes = int(np.prod(shape)) * _itemsize(dtype)
            out.append(_from_bytes(raw[offset:offset + nbytes], shape, dtype))
            offset += nbytes
        return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _as_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the raw 16-bit words
        return t.contiguous().view(torch.int16).numpy().tobytes()
    return t.contiguous().numpy().tobytes()


def _from_bytes(raw: bytes, shape, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.frombuffer(raw, np.int16).copy()).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.frombuffer(raw, _TORCH_TO_NUMPY[dtype]).copy()).reshape(shape)


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc). The encoder's large activations are freed
    every frame but stay in the process's heap, fragmented, unless returned: without this the
    resident size creeps up with the number of slices although nothing is kept."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
