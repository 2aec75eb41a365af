"""How arrays travel between the remote client and server.

Needs only numpy and zstandard (no torch), so a laptop running Slicer can talk to a GPU box
without installing the model stack.

- A volume is uploaded once as zstd-compressed raw bytes (C order). Its dtype and shape travel
  in HTTP headers; its address is `volume_digest`, a sha256 over dtype, shape and bytes, so the
  receiver can check that the body is exactly what the header says, and a re-open skips the upload.
- A bool array travels as packed bits (1 bit per pixel, `medsam2.masks.pack_mask`), flagged by a
  header; a mask in JSON is base64 of its zstd-compressed packed bits (a 512 x 512 mask is at most
  32 KiB before compression, usually a few hundred bytes).
- Binary responses (whole-volume masks, label maps) use the same headers as uploads. Label maps
  are uint16, so object ids go up to MAX_OBJ_ID.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Mapping

import numpy as np
import zstandard

from ..errors import InputError
from ..masks import (  # noqa: F401  (the mask codec lives in masks.py; its users read it here too)
    PackedMask, decode_mask, decode_packed, encode_mask, mask_bits, mask_digest, pack_mask, unpack_mask)
from ..prompt import MAX_OBJ_ID  # noqa: F401  (the server's schemas read it here)

DTYPE_HEADER = "X-MedSAM2-Dtype"
SHAPE_HEADER = "X-MedSAM2-Shape"
CODEC_HEADER = "X-MedSAM2-Codec"  # "zstd" (default) or "raw"
PACKED_HEADER = "X-MedSAM2-Packed"  # "1": a bool array sent as packed bits
CODECS = ("zstd", "raw")

LABEL_DTYPE = np.uint16  # label maps: value = object id

# Plain numeric dtypes only: object, string or structured arrays have no business on the wire.
_KINDS = {"b", "i", "u", "f"}
_MAX_NDIM = 32
# digits only (no sign, point or exponent), optionally in JSON list brackets: "8,64,64" or "[8, 64, 64]"
_SHAPE_RE = re.compile(r"^\s*\[?\s*(\d{1,12}(?:\s*,\s*\d{1,12})*)\s*\]?\s*$")
_ZSTD_LEVEL = 3  # fast; CT and masks compress well already at low levels
_WRITE_SIZE = 1 << 20


def check_dtype(dtype) -> np.dtype:
    """Return a numpy dtype for `dtype` (a string such as '<i2', or a dtype) or raise InputError."""
    try:
        dt = np.dtype(dtype)
    except Exception as exc:  # numpy raises TypeError, ValueError, SyntaxError... on odd strings
        raise InputError(f"unsupported dtype {str(dtype)[:80]!r}: {type(exc).__name__}") from None
    if dt.kind not in _KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise InputError(f"unsupported dtype {str(dtype)[:80]!r}: only bool, int, uint and float arrays travel")
    return dt


def parse_shape(text: str) -> tuple[int, ...]:
    """'8,64,64' or '[8, 64, 64]' -> (8, 64, 64); raise InputError on anything else."""
    match = _SHAPE_RE.match(text or "")
    if not match:
        raise InputError(f"bad shape header {str(text)[:80]!r}: expected comma-separated positive integers "
                         f"like 8,512,512")
    shape = tuple(int(v) for v in match.group(1).split(","))
    if len(shape) > _MAX_NDIM or any(v <= 0 for v in shape):
        raise InputError(f"bad shape {list(shape)[:_MAX_NDIM]}: every dimension must be a positive integer "
                         f"(at most {_MAX_NDIM} of them)")
    return shape


def parse_packed(text: str | None) -> bool:
    if text in (None, "", "0"):
        return False
    if text == "1":
        return True
    raise InputError(f"bad {PACKED_HEADER} header {str(text)[:20]!r}: use 1 (packed bits) or 0")


def format_shape(shape) -> str:
    return ",".join(str(int(v)) for v in shape)


def nbytes(dtype, shape, packed: bool = False) -> int:
    """Bytes of the raw (uncompressed) payload for this dtype and shape (exact: Python ints)."""
    count = math.prod(int(v) for v in shape)
    if packed:
        return (count + 7) // 8
    return count * check_dtype(dtype).itemsize


def volume_digest(volume) -> str:
    """Content address of a volume: sha256 of dtype, shape and C-order bytes.

    Two uploads of the same array share one copy on the server; the same voxels in another
    dtype are another volume (the engine's window depends on the values it is given).
    """
    arr = np.ascontiguousarray(volume)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{format_shape(arr.shape)}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def encode_array(arr, codec: str = "zstd") -> tuple[dict, bytes]:
    """-> (headers dict, body bytes). Bool arrays travel as packed bits."""
    arr = np.asarray(arr)
    check_dtype(arr.dtype)
    packed = arr.dtype == np.bool_
    raw = pack_mask(arr).tobytes() if packed else np.ascontiguousarray(arr).tobytes()
    body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw) if codec == "zstd" else raw
    headers = {
        DTYPE_HEADER: arr.dtype.str,
        SHAPE_HEADER: format_shape(arr.shape),
        CODEC_HEADER: codec,
        PACKED_HEADER: "1" if packed else "0",
    }
    return headers, body


class ArrayHeader:
    """What the X-MedSAM2-* headers declare about an array body, checked."""

    def __init__(self, dtype, shape, codec: str = "zstd", packed: bool = False):
        if codec not in CODECS:
            raise InputError(f"unknown codec {str(codec)[:20]!r}: use 'zstd' or 'raw'")
        self.dtype = check_dtype(dtype)
        self.shape = tuple(int(v) for v in shape)
        self.codec = codec
        self.packed = bool(packed)
        if self.packed and self.dtype != np.bool_:
            raise InputError("packed bits are only for bool arrays")

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> "ArrayHeader":
        get = {k.lower(): v for k, v in headers.items()}.get
        return cls(get(DTYPE_HEADER.lower(), ""), parse_shape(get(SHAPE_HEADER.lower(), "")),
                   codec=get(CODEC_HEADER.lower(), "zstd"), packed=parse_packed(get(PACKED_HEADER.lower())))

    @property
    def array_bytes(self) -> int:
        """Size of the decoded array in memory."""
        return nbytes(self.dtype, self.shape)

    @property
    def payload_bytes(self) -> int:
        """Size of the uncompressed body."""
        return nbytes(self.dtype, self.shape, self.packed)

    @property
    def wire_limit(self) -> int:
        """The most body bytes an honest sender needs (zstd can grow incompressible data slightly)."""
        raw = self.payload_bytes
        return raw if self.codec == "raw" else raw + (raw >> 7) + (1 << 16)

    def describe(self) -> str:
        return f"dtype {self.dtype.str} shape {format_shape(self.shape)}"


def decode_array(headers: Mapping[str, str], body: bytes) -> np.ndarray:
    """Inverse of `encode_array`: headers (any case-insensitive mapping) + body -> array."""
    decoder = StreamDecoder(ArrayHeader.from_headers(headers))
    decoder.feed(body)
    return decoder.finish()


class _Sink:
    """Where decompressed bytes land: grown as they arrive, never past the declared size.

    Kept apart from the zstd writer's owner on purpose: the writer holds its sink, and a sink that
    held the writer back would make a reference cycle through a C object the garbage collector
    cannot see, leaking the buffer and the decompression context of every body.
    """

    def __init__(self, header: ArrayHeader):
        self.header = header
        self.expected = header.payload_bytes
        self.buffer = bytearray()

    def write(self, data) -> int:
        n = len(data)
        if len(self.buffer) + n > self.expected:
            raise InputError(f"body is longer than its header says: more than {self.expected} bytes for "
                             f"{self.header.describe()}")
        self.buffer += data
        return n


class StreamDecoder:
    """Decode an array body chunk by chunk (upload bodies arrive in pieces).

    The buffer grows with the bytes that arrive, so a stalled or lying sender holds only what it
    sent. Raises InputError as soon as the body yields more bytes than the header promised (a
    small compressed body cannot expand without bound) and at the end if it yielded fewer.
    """

    def __init__(self, header: ArrayHeader):
        self.header = header
        self._sink = _Sink(header)
        self.received = 0  # bytes on the wire
        self._writer = None
        if header.codec == "zstd":
            self._writer = zstandard.ZstdDecompressor().stream_writer(self._sink, write_size=_WRITE_SIZE,
                                                                      closefd=False)

    @property
    def expected(self) -> int:
        return self._sink.expected

    @property
    def buffer(self) -> bytearray:
        return self._sink.buffer

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self._writer is None:
            self._sink.write(chunk)
            return
        try:
            self._writer.write(chunk)
        except zstandard.ZstdError as exc:
            raise InputError(f"body is not valid zstd data: {exc}") from None

    def finish(self) -> np.ndarray:
        writer, self._writer = self._writer, None  # free the decompression context now
        if writer is not None:
            try:
                writer.flush()
            except zstandard.ZstdError as exc:
                raise InputError(f"body is not valid zstd data: {exc}") from None
        sink = self._sink
        if len(sink.buffer) != sink.expected:
            raise InputError(f"body is shorter than its header says: {len(sink.buffer)} of {sink.expected} bytes "
                             f"for {self.header.describe()}")
        if self.header.packed:
            return unpack_mask(sink.buffer, self.header.shape)
        return np.frombuffer(sink.buffer, dtype=self.header.dtype).reshape(self.header.shape)


