"""What the server holds between requests: uploaded volumes, open sessions, upload slots, counters.

Each table has its own lock and holds it only to look things up or change them: nothing waits for
the engine (which may be busy for a long propagation) while holding one. Freeing an engine
happens after the table lock is released.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import secrets
import threading
import time
from typing import Iterator

import numpy as np
from fastapi import Request

from .errors import ApiError, engine_errors
from .gpu_lock import FairLock
from .limits import Limits

log = logging.getLogger("medsam2.remote.server")

EXPIRED_MEMORY = 4096  # remember this many expired ids, so a 404 can say "expired" not "unknown"


def close_engine(engine) -> None:
    """Free an engine session (best effort: the server session is gone either way)."""
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            log.exception("closing an engine session failed")


class StoredVolume:
    """An uploaded volume, addressed by its content digest."""

    def __init__(self, digest: str, array: np.ndarray):
        self.digest, self.array = digest, array
        self.last_used = time.monotonic()

    def info(self) -> dict:
        return {"digest": self.digest, "dtype": self.array.dtype.str, "shape": list(self.array.shape)}


class OpenSession:
    """One engine session and what the server tracks about it."""

    def __init__(self, sid: str, volume: StoredVolume, engine, memory: str, window, image_set: bool):
        self.id, self.volume, self.engine = sid, volume, engine
        self.memory, self.window, self.image_set = memory, window, image_set
        self.lock = threading.Lock()  # one engine call at a time per session
        self.last_used = time.monotonic()
        self.busy = 0  # calls in flight; a busy session never expires
        self.cancel: threading.Event | None = None  # set to stop the running propagation
        self.sent = collections.defaultdict(dict)  # obj_id -> {frame: digest of the mask the client has}

    @property
    def mask_shape(self) -> tuple[int, int]:
        """(rows, cols) of every mask in this session: the volume's slices, or its images."""
        return tuple(int(v) for v in self.volume.array.shape[1:])

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def obj_ids(self) -> list[int]:
        return [int(o) for o in self.engine.obj_ids]

    def info(self, ttl: float) -> dict:
        return {"session": self.id, "num_frames": int(self.engine.num_frames),
                "frame_shape": [int(v) for v in self.engine.frame_shape], "obj_ids": self.obj_ids(),
                "memory": self.memory, "ttl": ttl, "image_set": self.image_set,
                "image_shape": list(self.mask_shape)}


class VolumeStore:
    """Uploaded volumes. Those no session uses are kept for cheap re-opens, up to `spare_bytes`."""

    def __init__(self, spare_bytes: int):
        self.spare_bytes = int(spare_bytes)
        self._lock = threading.Lock()
        self._volumes: dict[str, StoredVolume] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._volumes)

    def get(self, digest: str) -> StoredVolume | None:
        with self._lock:
            vol = self._volumes.get(digest)
            if vol is not None:
                vol.last_used = time.monotonic()
            return vol

    def put(self, digest: str, array: np.ndarray, in_use: set) -> StoredVolume:
        with self._lock:
            vol = self._volumes.setdefault(digest, StoredVolume(digest, array))
            self._trim_locked(in_use)  # the new volume is the most recently used: it goes last
            return vol

    def drop_idle(self, in_use: set, ttl: float) -> None:
        """Forget volumes no session uses that were idle past the TTL, then trim to the spare budget."""
        now = time.monotonic()
        with self._lock:
            for digest, vol in list(self._volumes.items()):
                if digest not in in_use and now - vol.last_used > ttl:
                    del self._volumes[digest]
            self._trim_locked(in_use)

    def _trim_locked(self, in_use: set) -> None:
        idle = sorted((v for d, v in self._volumes.items() if d not in in_use), key=lambda v: v.last_used)
        spare = sum(v.array.nbytes for v in idle)
        while idle and spare > self.spare_bytes:  # least recently used first
            vol = idle.pop(0)
            spare -= vol.array.nbytes
            del self._volumes[vol.digest]


class UploadSlots:
    """How many upload bodies are being received at once (each one's buffer grows as it arrives)."""

    def __init__(self, limit: int):
        self.limit = int(limit)
        self._lock = threading.Lock()
        self.in_flight = 0

    def take(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self.in_flight -= 1


class SessionTable:
    """Open sessions by id, the ids that expired (to say so), and slots reserved by opens in progress."""

    def __init__(self, max_sessions: int, ttl: float):
        self.max_sessions, self.ttl = int(max_sessions), float(ttl)
        self._lock = threading.Lock()
        self._open: dict[str, OpenSession] = {}
        self._expired: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> reason
        self._reserved = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _idle_reason(self) -> str:
        return f"expired after {self.ttl:g} s idle"

    def _forget_locked(self, sid: str, reason: str) -> OpenSession | None:
        sess = self._open.pop(sid, None)
        self._expired[sid] = reason
        while len(self._expired) > EXPIRED_MEMORY:
            self._expired.popitem(last=False)
        return sess

    def _is_idle(self, sess: OpenSession, now: float) -> bool:
        return not sess.busy and now - sess.last_used > self.ttl

    def expire_idle(self) -> list[OpenSession]:
        """Forget sessions idle past the TTL; the caller frees their engines (outside this lock)."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, sess in self._open.items() if self._is_idle(sess, now)]
            return [self._forget_locked(sid, self._idle_reason()) for sid in idle]

    def checkout(self, sid: str) -> OpenSession:
        """The session, marked busy (it cannot expire until `checkin`), or a 404 that says why not."""
        stale = None
        with self._lock:
            sess = self._open.get(sid)
            if sess is not None and self._is_idle(sess, time.monotonic()):
                stale, sess = self._forget_locked(sid, self._idle_reason()), None
            if sess is not None:
                sess.busy += 1
                sess.touch()
                return sess
            reason = self._expired.get(sid)
        if stale is not None:
            close_engine(stale.engine)
        if reason is not None:
            raise ApiError(404, "session_expired", f"session {sid} {reason}; session expired, re-open it")
        raise ApiError(404, "session_unknown", f"unknown session {sid}: the server does not know it (it was closed, "
                                               f"or the server restarted); session expired, re-open it")

    def checkin(self, sess: OpenSession) -> None:
        with self._lock:
            sess.busy -= 1
            sess.touch()

    def close(self, sid: str) -> None:
        with self._lock:
            self._forget_locked(sid, "was closed")

    def reserve(self) -> bool:
        with self._lock:
            if len(self._open) + self._reserved < self.max_sessions:
                self._reserved += 1
                return True
            return False

    def add_reserved(self, sess: OpenSession | None) -> None:
        """Fill a reserved slot with `sess` (None: the open failed, free the slot)."""
        with self._lock:
            self._reserved -= 1
            if sess is not None:
                self._open[sess.id] = sess

    def free(self) -> int:
        with self._lock:
            return max(0, self.max_sessions - len(self._open) - self._reserved)

    def retry_after(self) -> int:
        """Seconds until the first idle session expires (the earliest a slot can free itself)."""
        now = time.monotonic()
        with self._lock:
            waits = [self.ttl - (now - s.last_used) for s in self._open.values() if not s.busy]
        return max(1, math.ceil(min(waits))) if waits else max(1, math.ceil(min(self.ttl, 60)))

    def volumes_in_use(self) -> set:
        with self._lock:
            return {s.volume.digest for s in self._open.values()}

    def cancel_all(self) -> None:
        with self._lock:
            for sess in self._open.values():
                if sess.cancel is not None:
                    sess.cancel.set()


class ServerState:
    """Everything one server process holds, shared by the routes (app.state.medsam2)."""

    def __init__(self, model, limits: Limits):
        self.model, self.limits = model, limits
        self.gpu = FairLock()
        self.sessions = SessionTable(limits.max_sessions, limits.session_ttl)
        self.volumes = VolumeStore(2 * limits.max_upload_bytes)
        self.uploads = UploadSlots(limits.max_uploads)
        self.stats = collections.Counter()
        self._stats_lock = threading.Lock()
        self.instance = secrets.token_hex(6)  # tells the processes behind a load balancer apart
        self.started = time.time()

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def counters(self) -> dict:
        with self._stats_lock:  # a key added meanwhile would break the copy
            return dict(self.stats)

    def reap(self) -> None:
        """Free sessions idle past the TTL, then volumes no session uses that are as idle."""
        for sess in self.sessions.expire_idle():
            self.count("sessions_expired")
            close_engine(sess.engine)  # may wait for the engine: no table lock is held here
        self.volumes.drop_idle(self.sessions.volumes_in_use(), self.limits.session_ttl)

    @contextlib.contextmanager
    def session(self, sid: str) -> Iterator[OpenSession]:
        sess = self.sessions.checkout(sid)
        try:
            yield sess
        finally:
            self.sessions.checkin(sess)

    def engine_call(self, sess: OpenSession, fn, *args, **kwargs):
        """Run an engine call under the session's lock and the GPU lock; InputError -> 400."""
        with sess.lock, self.gpu.hold():
            try:
                with engine_errors():
                    return fn(*args, **kwargs)
            finally:
                sess.touch()

    def shutdown(self) -> None:
        self.sessions.cancel_all()  # running propagations let go of the GPU


def state_of(request: Request) -> ServerState:
    """The server's state, for routes (a FastAPI dependency)."""
    return request.app.state.medsam2
