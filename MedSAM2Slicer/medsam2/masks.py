"""Masks stored and sent compactly: one bit per pixel (numpy only, no torch).

The one place masks are bit-packed: the session's results, undo records in Slicer, the wire format,
and the one JSON form of a mask (`encode_mask`: base64 of zstd-compressed packed bits; zstandard is
imported only when a mask is encoded or decoded).
"""

from __future__ import annotations

import base64
import hashlib
import io

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


class PackedMask:
    """One mask kept as its packed bits until someone needs its pixels: it crosses a process or
    network boundary packed, and is unpacked once, where it is used (`unpack()`, np.asarray)."""

    __slots__ = ("shape", "bits")

    def __init__(self, shape, bits: bytes):
        self.shape = tuple(int(s) for s in shape)
        self.bits = bytes(bits)
        if len(self.bits) != (int(np.prod(self.shape)) + 7) // 8:
            raise InputError(f"{len(self.bits)} bytes of packed bits do not hold a mask of shape {self.shape}")

    @classmethod
    def of(cls, mask) -> "PackedMask":
        mask = np.asarray(mask, dtype=bool)
        return cls(mask.shape, pack_mask(mask).tobytes())

    def unpack(self) -> np.ndarray:
        return unpack_mask(self.bits, self.shape)

    def __array__(self, dtype=None, copy=None):
        mask = self.unpack()
        return mask if dtype is None else mask.astype(dtype)

    def __repr__(self):
        return f"PackedMask(shape={self.shape}, {len(self.bits)} bytes)"


_ZSTD_LEVEL = 3  # fast; masks compress well already at low levels


def mask_digest(packed_bytes: bytes) -> str:
    """Short digest of a mask's packed bits: lets the server say "unchanged" instead of resending."""
    return hashlib.blake2b(packed_bytes, digest_size=8).hexdigest()


def mask_bits(mask) -> tuple[bytes, str]:
    """bool (rows, cols) or PackedMask -> (packed bits as bytes, their digest)."""
    packed = mask.bits if isinstance(mask, PackedMask) else pack_mask(mask).tobytes()
    return packed, mask_digest(packed)


def encode_mask(mask, packed: bytes | None = None) -> dict:
    """bool 2D mask (or a PackedMask) -> JSON-able dict {shape, bits (base64 of zstd packed bits), digest}."""
    import zstandard

    shape = mask.shape if isinstance(mask, PackedMask) else np.shape(mask)
    if packed is None:
        packed, digest = mask_bits(mask)
    else:
        digest = mask_digest(packed)
    bits = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(packed)
    return {"shape": list(shape), "bits": base64.b64encode(bits).decode("ascii"), "digest": digest}


def decode_mask(obj, shape=None) -> np.ndarray:
    """Inverse of `encode_mask`, unpacked (see decode_packed)."""
    return decode_packed(obj, shape).unpack()


def decode_packed(obj, shape=None) -> PackedMask:
    """Inverse of `encode_mask`, still packed (whoever uses the pixels unpacks them). `shape` (if
    given) is the shape the caller expects: a mask that declares another one is refused before
    anything is decoded, and the bits may not expand past what that shape holds."""
    import zstandard

    if not isinstance(obj, dict) or "shape" not in obj or "bits" not in obj:
        raise InputError("mask must be an object with 'shape' and 'bits' (as made by medsam2.masks.encode_mask)")
    try:
        got_shape = tuple(int(v) for v in obj["shape"])
    except (TypeError, ValueError, OverflowError):
        raise InputError("mask 'shape' must be two integers (rows, cols)") from None
    if len(got_shape) != 2 or min(got_shape) <= 0:
        raise InputError(f"mask shape {list(got_shape)[:4]} is not a 2D (rows, cols) shape")
    if shape is not None and tuple(shape) != got_shape:
        raise mask_shape_error(got_shape, shape)  # the engine's wording: a remote caller reads what a local one would
    try:
        compressed = base64.b64decode(obj["bits"], validate=True)
    except (TypeError, ValueError):
        raise InputError("mask 'bits' must be base64") from None
    expected = (got_shape[0] * got_shape[1] + 7) // 8
    try:  # bounded: a small body may not expand past the declared mask
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed)) as reader:
            bits = reader.read(expected + 1)
    except zstandard.ZstdError as exc:
        raise InputError(f"mask 'bits' are not valid zstd data: {exc}") from None
    if len(bits) != expected:
        raise InputError(f"mask bits hold {len(bits)} bytes; a {got_shape[0]} x {got_shape[1]} mask needs {expected}")
    return PackedMask(got_shape, bits)
