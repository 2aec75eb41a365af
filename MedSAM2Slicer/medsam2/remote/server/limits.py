"""What one server accepts: sizes, counts and geometry, checked before any work is done."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...errors import InputError
from ..wire import MAX_OBJ_ID
from .errors import ApiError, too_large

MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The server's limits (docs/remote.md, "Limits"). `GET /v1/info` reports them."""

    max_sessions: int = 8  # open sessions at once (each holds a volume and its feature cache)
    session_ttl: float = 1800.0  # seconds a session may sit idle before it is freed
    max_upload_mb: float = 1024  # the largest volume, decoded size (and bytes on the wire)
    max_uploads: int = 4  # uploads received at once; more get 503 + Retry-After
    max_side: int = 4096  # every dimension of a volume: frames, rows, cols (any axis can be framed)
    max_points: int = 256  # points (and labels) in one prompt
    max_objects: int = 64  # objects in one session

    def __post_init__(self):
        for name in ("max_sessions", "max_uploads", "max_side", "max_points", "max_objects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer; got {value!r}")
        for name in ("session_ttl", "max_upload_mb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise InputError(f"{name} must be positive; got {value!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def json_body_bytes(self) -> int:
        """The largest JSON request: a mask prompt on the largest frame, in base64 of packed bits
        that did not compress at all, with room to spare (usually it is a few KiB)."""
        return self.max_side * self.max_side // 8 * 4 // 3 + 256 * 1024

    @property
    def json_values(self) -> int:
        """The most values (counted by their separators) one JSON request may carry: enough for a
        prompt of max_points points and labels. Checked before parsing, which runs on the event
        loop: 100,000 points would hold it for a quarter of a second."""
        return 8 * self.max_points + 256

    def as_dict(self) -> dict:
        return {**asdict(self), "max_obj_id": MAX_OBJ_ID, "json_body_bytes": self.json_body_bytes,
                "json_values": self.json_values}

    def check_volume(self, shape, array_bytes: int, headers: dict | None = None) -> None:
        """Refuse a volume (by its declared shape and decoded size) before any work: 400 if it is
        not a volume, 413 if it is larger than this server takes."""
        if len(shape) != 3:
            raise ApiError(400, "input", f"a volume must be 3D (slices, rows, cols); the header says shape "
                                         f"{list(shape)}", headers=headers)
        if max(shape) > self.max_side:
            raise ApiError(413, "too_large", f"volume shape {list(shape)} has a side over the server's limit of "
                                             f"{self.max_side} (every axis may be propagated along); crop or "
                                             f"downsample it", headers=headers)
        if array_bytes > self.max_upload_bytes:
            raise too_large(array_bytes, self.max_upload_bytes, "volume", headers=headers)
