"""Masks stored and sent compactly: one bit per pixel (numpy only, no torch).

The one place masks are bit-packed: the session's results, undo records in Slicer, the wire format.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def pack_mask(mask) -> np.ndarray:
    """bool array of any shape -> its bits, flattened in C order (uint8, 8 pixels a byte)."""
    return np.packbits(np.asarray(mask, dtype=bool), axis=None)


def unpack_mask(bits, shape) -> np.ndarray:
    """The inverse of pack_mask: packed bits (array or bytes) and the mask's shape -> bool array."""
    shape = tuple(int(s) for s in shape)
    data = np.frombuffer(bits, dtype=np.uint8) if isinstance(bits, (bytes, bytearray, memoryview)) else bits
    return np.unpackbits(data, count=int(np.prod(shape))).reshape(shape).astype(bool)


def mask_shape_error(got, shape, place: str = "the frame") -> InputError:
    """The one wording for a mask prompt of the wrong size (engine, server and client alike)."""
    return InputError(f"mask shape {tuple(got)} does not match {place}'s (rows, cols) {tuple(shape)}")
