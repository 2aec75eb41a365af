"""Frames: a volume's slices turned, one at a time, into the normalised square images SAM2 expects.

Frames are built lazily (never the whole volume at the model's resolution at once): a 300-slice CT
at 1024 px would otherwise hold 3.6 GB of float32 frames.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

# SAM2 was trained on ImageNet-normalised RGB; a grey slice is repeated into the 3 channels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Percentiles of the robust default window: clips metal and air outliers without a CT preset.
DEFAULT_WINDOW_PERCENTILES = (0.5, 99.5)


def check_numeric(array: np.ndarray, what: str) -> np.ndarray:
    """int or float pixels (bool viewed as uint8, never copied), else InputError naming `what`."""
    if array.dtype == bool:
        array = array.view(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{what} dtype {array.dtype} is not numeric; convert it to an int or float array")
    return array


def check_pixels(array: np.ndarray, what: str, unit: str = "voxels") -> np.ndarray:
    """The one check of image content: non-empty, numeric, finite. Returns the array (bool viewed as
    uint8, never copied). `what` names it in messages ("volume", "image 3:"); `unit` its elements."""
    if min(array.shape, default=0) == 0:
        raise InputError(f"{what} is empty (shape {array.shape})")
    array = check_numeric(array, what)
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            first = tuple(int(v) for v in np.argwhere(bad)[0])
            kind = "NaN" if np.isnan(array[first]) else "infinite"
            where = ", ".join(f"{name} {v}" for name, v in zip(("slice", "row", "col")[-len(first):], first))
            raise InputError(f"{what} has {int(bad.sum())} NaN/infinite {unit} (first {kind} at {where}); "
                             "fill them (e.g. numpy.nan_to_num) before segmenting")
    return array


def check_volume(volume) -> np.ndarray:
    """Validate a (slices, rows, cols) numeric array; returns it as a numpy array without copying."""
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise InputError(
            f"volume must be 3-D (slices, rows, cols); got shape {volume.shape}. "
            "For a single 2-D image add a slice axis, e.g. image[None]."
        )
    return check_pixels(volume, "volume")


def default_window(volume: np.ndarray) -> tuple[float, float]:
    """Robust intensity window: the 0.5-99.5 percentiles of (a sample of) the volume."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // 2_000_000)  # a strided sample is plenty for percentiles
    low, high = np.percentile(flat[::step].astype(np.float64), DEFAULT_WINDOW_PERCENTILES)
    if high <= low:  # nearly constant: fall back to the full range
        low, high = float(flat.min()), float(flat.max())
    if high <= low:  # constant volume: any window maps it to 0; keep the width non-zero
        high = low + 1.0
    return float(low), float(high)


def check_window(window) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be a pair (low, high); got {window!r}") from None
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        raise InputError(f"window must satisfy low < high with finite values; got ({low}, {high})")
    return low, high


class FrameSource:
    """The volume seen as a sequence of model-ready frames.

    `source[i]` is frame i as a float32 tensor (3, S, S): windowed to [0, 1], resized to the model's
    square input and ImageNet-normalised. Masks come back at the volume's own (rows, cols); the
    engine never resamples anisotropic pixels because SAM2 only ever sees the square frame.
    """

    def __init__(self, volume, image_size: int, window=None):
        self.volume = check_volume(volume)
        self.image_size = int(image_size)
        self.window = check_window(window) if window is not None else default_window(self.volume)
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
        self._fingerprint = None

    def __len__(self) -> int:
        return self.volume.shape[0]

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(self.volume.shape[1:])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.frame(index)

    def scaled(self, index: int) -> np.ndarray:
        """Frame `index` windowed to [0, 1] at its own resolution (what a viewer would show)."""
        low, high = self.window
        frame = self.volume[int(index)].astype(np.float32)
        return np.clip((frame - low) / (high - low), 0.0, 1.0)

    def frame(self, index: int) -> torch.Tensor:
        if not 0 <= int(index) < len(self):
            raise InputError(f"frame {index} is outside the volume (frames 0..{len(self) - 1})")
        image = torch.from_numpy(self.scaled(index))[None, None]
        size = self.image_size
        if image.shape[-2:] != (size, size):
            shrinking = image.shape[-2] > size or image.shape[-1] > size
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=shrinking)
        image = image[0].expand(3, -1, -1)
        return (image - self._mean) / self._std

    def fingerprint(self) -> str:
        """Content hash of the volume, window and size: sessions on the same frames share features."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(str((self.volume.shape, str(self.volume.dtype), self.window, self.image_size)).encode())
            for k in range(self.volume.shape[0]):  # slice by slice: a transposed view is never copied whole
                h.update(np.ascontiguousarray(self.volume[k]).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint
