"""How arrays travel between the remote client and server.

Needs only numpy and zstandard (no torch), so a laptop running Slicer can talk to a GPU box
without installing the model stack.

- A volume is uploaded once as zstd-compressed raw bytes (C order). Its dtype and shape travel
  in HTTP headers; its address is `volume_digest`, a sha256 over dtype, shape and bytes, so the
  server can check the body is exactly what the header says and a re-open skips the upload.
- A mask is a bool array sent as zstd-compressed packed bits (1 bit per pixel), base64 in
  JSON (a 512 x 512 mask is at most 32 KiB before compression, usually a few hundred bytes).
- Binary responses (whole-volume masks, label maps) use the same headers as uploads.
"""

import base64
import hashlib
import json

import numpy as np
import zstandard

from ..errors import InputError

DTYPE_HEADER = "X-MedSAM2-Dtype"
SHAPE_HEADER = "X-MedSAM2-Shape"
CODEC_HEADER = "X-MedSAM2-Codec"  # "zstd" (default) or "raw"
PACKED_HEADER = "X-MedSAM2-Packed"  # "1": bool array sent as packed bits

# Plain numeric dtypes only: object, string or structured arrays have no business on the wire.
_KINDS = {"b", "i", "u", "f"}
_ZSTD_LEVEL = 3  # fast; CT and masks compress well already at low levels
_WRITE_SIZE = 1 << 20


def check_dtype(dtype):
    """Return a numpy dtype for `dtype` (a string such as '<i2') or raise InputError."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise InputError(f"unsupported dtype {dtype!r}: {exc}") from None
    if dt.kind not in _KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise InputError(f"unsupported dtype {dtype!r}: only bool, int, uint and float arrays travel")
    return dt


def parse_shape(text):
    """'8,64,64' or '[8, 64, 64]' -> (8, 64, 64); raise InputError on anything else."""
    try:
        shape = json.loads(text) if text.strip().startswith("[") else [int(v) for v in text.split(",")]
        shape = tuple(int(v) for v in shape)
    except (ValueError, TypeError):
        raise InputError(f"bad shape header {text!r}: expected comma-separated integers like 8,512,512") from None
    if not shape or any(v <= 0 for v in shape):
        raise InputError(f"bad shape {shape}: every dimension must be a positive integer")
    return shape


def format_shape(shape):
    return ",".join(str(int(v)) for v in shape)


def nbytes(dtype, shape, packed=False):
    """Bytes of the raw (uncompressed) payload for this dtype and shape."""
    count = int(np.prod(shape, dtype=np.int64))
    if packed:
        return (count + 7) // 8
    return count * check_dtype(dtype).itemsize


def volume_digest(volume):
    """Content address of a volume: sha256 of dtype, shape and C-order bytes.

    Two uploads of the same array share one copy on the server; the same voxels in another
    dtype are another volume (the engine's window depends on the values it is given).
    """
    arr = np.ascontiguousarray(volume)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{format_shape(arr.shape)}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def digest_update_header(h, dtype, shape):
    """Start a streaming sha256 the same way `volume_digest` does (for the server's check)."""
    h.update(f"{np.dtype(dtype).str}|{format_shape(shape)}|".encode())
    return h


def encode_array(arr, codec="zstd"):
    """-> (headers dict, body bytes). Bool arrays travel as packed bits."""
    arr = np.asarray(arr)
    check_dtype(arr.dtype)
    packed = arr.dtype == np.bool_
    raw = np.packbits(arr, axis=None).tobytes() if packed else np.ascontiguousarray(arr).tobytes()
    body = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(raw) if codec == "zstd" else raw
    headers = {
        DTYPE_HEADER: arr.dtype.str,
        SHAPE_HEADER: format_shape(arr.shape),
        CODEC_HEADER: codec,
        PACKED_HEADER: "1" if packed else "0",
    }
    return headers, body


def decode_array(headers, body):
    """Inverse of `encode_array`: headers (any case-insensitive mapping) + body -> array."""
    get = {k.lower(): v for k, v in headers.items()}.get
    dtype = check_dtype(get(DTYPE_HEADER.lower(), ""))
    shape = parse_shape(get(SHAPE_HEADER.lower(), ""))
    codec = get(CODEC_HEADER.lower(), "zstd")
    packed = get(PACKED_HEADER.lower(), "0") == "1"
    decoder = StreamDecoder(dtype, shape, codec=codec, packed=packed)
    decoder.feed(body)
    return decoder.finish()


class StreamDecoder:
    """Decode an array body chunk by chunk into a buffer of exactly the declared size.

    Raises InputError as soon as the body yields more bytes than the header promised (so a
    small compressed body cannot expand without bound) and at the end if it yielded fewer.
    """

    def __init__(self, dtype, shape, codec="zstd", packed=False):
        if codec not in ("zstd", "raw"):
            raise InputError(f"unknown codec {codec!r}: use 'zstd' or 'raw'")
        self.dtype = check_dtype(dtype)
        self.shape = tuple(shape)
        self.packed = packed
        if packed and self.dtype != np.bool_:
            raise InputError("packed bits are only for bool arrays")
        self.expected = nbytes(self.dtype, self.shape, packed)
        self.buffer = bytearray(self.expected)
        self.filled = 0
        self.received = 0  # bytes on the wire
        self._writer = None
        if codec == "zstd":
            self._writer = zstandard.ZstdDecompressor().stream_writer(self, write_size=_WRITE_SIZE)

    def write(self, data):  # sink for the zstd stream writer
        n = len(data)
        if self.filled + n > self.expected:
            raise InputError(
                f"body is longer than its header says: more than {self.expected} bytes for "
                f"dtype {self.dtype.str} shape {format_shape(self.shape)}"
            )
        self.buffer[self.filled:self.filled + n] = data
        self.filled += n
        return n

    def feed(self, chunk):
        self.received += len(chunk)
        if self._writer is None:
            self.write(chunk)
            return
        try:
            self._writer.write(chunk)
        except zstandard.ZstdError as exc:
            raise InputError(f"body is not valid zstd data: {exc}") from None

    def finish(self):
        if self._writer is not None:
            try:
                self._writer.flush()
            except zstandard.ZstdError as exc:
                raise InputError(f"body is not valid zstd data: {exc}") from None
        if self.filled != self.expected:
            raise InputError(
                f"body is shorter than its header says: {self.filled} of {self.expected} bytes "
                f"for dtype {self.dtype.str} shape {format_shape(self.shape)}"
            )
        if self.packed:
            count = int(np.prod(self.shape, dtype=np.int64))
            bits = np.unpackbits(np.frombuffer(self.buffer, dtype=np.uint8), count=count)
            return bits.astype(bool).reshape(self.shape)
        return np.frombuffer(self.buffer, dtype=self.dtype).reshape(self.shape)


def mask_digest(packed_bytes):
    """Short digest of a mask's packed bits: lets the server say "unchanged" instead of resending."""
    return hashlib.blake2b(packed_bytes, digest_size=8).hexdigest()


def pack_mask(mask):
    """bool (rows, cols) -> (packed bytes, digest)."""
    packed = np.packbits(np.asarray(mask, dtype=bool), axis=None).tobytes()
    return packed, mask_digest(packed)


def encode_mask(mask, packed=None):
    """bool 2D mask -> JSON-able dict {shape, bits (base64 of zstd packed bits), digest}."""
    mask = np.asarray(mask, dtype=bool)
    if packed is None:
        packed, digest = pack_mask(mask)
    else:
        digest = mask_digest(packed)
    bits = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(packed)
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits).decode("ascii"), "digest": digest}


def decode_mask(obj, shape=None):
    """Inverse of `encode_mask`; `shape` (if given) is the shape the caller expects."""
    if not isinstance(obj, dict) or "shape" not in obj or "bits" not in obj:
        raise InputError("mask must be an object with 'shape' and 'bits' (as made by medsam2.remote.wire.encode_mask)")
    try:
        got_shape = tuple(int(v) for v in obj["shape"])
        compressed = base64.b64decode(obj["bits"], validate=True)
    except (TypeError, ValueError):
        raise InputError("mask 'shape' must be integers and 'bits' base64") from None
    if len(got_shape) != 2 or min(got_shape) <= 0:
        raise InputError(f"mask shape {list(got_shape)} is not a 2D (rows, cols) shape")
    if shape is not None and tuple(shape) != got_shape:
        raise InputError(f"mask shape {list(got_shape)} does not match the frame shape {list(shape)}")
    decoder = StreamDecoder(np.bool_, got_shape, codec="zstd", packed=True)
    decoder.feed(compressed)
    return decoder.finish()
