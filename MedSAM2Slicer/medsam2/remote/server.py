"""Remote GPU server: the engine's session interface over HTTP (FastAPI + uvicorn).

One process serves one model on one device to several clients. The API lives under `/v1` and
is documented at `/docs` (OpenAPI). Its shape:

- `GET /v1/health` (no token): is the process up. `GET /v1/info`: version, model, device, limits,
  free sessions.
- `HEAD|PUT /v1/volumes/{sha256}`: a volume is uploaded once, addressed by its content digest
  (`medsam2.remote.wire.volume_digest`); re-opening the same volume skips the upload.
- `POST /v1/sessions` opens an engine session on an uploaded volume; `DELETE` closes it. Sessions
  idle longer than the TTL are freed; at most `max_sessions` are open (429 + Retry-After).
- `POST /v1/sessions/{id}/prompts` adds a prompt and returns that frame's mask.
- `POST /v1/sessions/{id}/propagate` streams NDJSON: one line per finished frame (masks as
  compressed packed bits, or "same" when the client already has that exact mask), heartbeats
  while waiting for the GPU, then an end line. A disconnect or `.../propagate/cancel` stops the
  work within one frame and frees the GPU.

Every engine call runs under one FIFO GPU lock (one device, one job at a time, in arrival
order) and the session's own lock. Errors are JSON `{"error": kind, "message": text}`; engine
input errors are 400 with the engine's own message. The token (Bearer) is compared in constant
time and never logged.
"""

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import InputError, MedSAM2Error
from . import wire

log = logging.getLogger(__name__)

API_VERSION = 1
SESSION_WAIT_S = 10.0  # how long a propagate waits for its session's previous call before 409
HEARTBEAT_S = 1.0  # a "wait" line this often keeps clients' read timeouts and progress bars alive
JSON_BODY_LIMIT = 16 << 20  # prompts are small; a mask prompt is at most a few hundred KiB
EXPIRED_MEMORY = 4096  # remember this many expired ids, so a 404 can say "expired" not "unknown"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_UPLOAD_PATH_RE = re.compile(r"^/v1/volumes/[^/]+$")
_PUBLIC_PATHS = {"/v1/health"}
# engine exceptions a client re-raises as the same type, so remote calls fail like local ones
_INPUT_EXCEPTIONS = (InputError, ValueError, KeyError, IndexError, TypeError)


class ApiError(Exception):
    def __init__(self, status, error, message, headers=None, exception=None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = headers or {}
        self.exception = exception


def _error_body(error, message, exception=None, **extra):
    body = {"error": error, "message": message, **extra}
    if exception:
        body["exception"] = exception
    return body


@contextlib.contextmanager
def _engine_errors():
    """Engine exceptions as API errors: bad input is a 400 with the engine's message, any other
    error of ours a 500."""
    try:
        yield
    except InputError as exc:
        raise _input_error(exc) from None
    except MedSAM2Error as exc:
        raise ApiError(500, "server", f"{type(exc).__name__}: {exc}") from None
    except _INPUT_EXCEPTIONS as exc:
        raise _input_error(exc) from None


def _input_error(exc):
    """Engine input error -> 400 carrying the engine's message and exception type."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    kind = "InputError" if isinstance(exc, InputError) else type(exc).__name__
    return ApiError(400, "input", str(message), exception=kind)


class FairLock:
    """A lock granted in arrival order (threading.Lock is not), with a cancellable wait.

    Two clients propagating at once are served one after the other, and a waiter whose client
    has gone away leaves the queue instead of holding the GPU for nobody.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._held = False

    def acquire(self, cancel=None, poll=0.1):
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait(poll if cancel is not None else None)
                self._held = True
                return True
            finally:
                self._queue.remove(me)
                self._cond.notify_all()

    def release(self):
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self):
        with self._cond:
            return self._held

    def waiting(self):
        with self._cond:
            return len(self._queue)

    @contextlib.contextmanager
    def hold(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class _Volume:
    def __init__(self, digest, array):
        self.digest, self.array = digest, array
        self.last_used = time.monotonic()


class _Session:
    def __init__(self, sid, volume, engine, memory, window):
        self.id, self.volume, self.engine = sid, volume, engine
        self.memory, self.window = memory, window
        self.lock = threading.Lock()  # one call at a time per session
        self.last_used = time.monotonic()
        self.created = time.time()
        self.busy = 0  # calls in flight; a busy session never expires
        self.cancel = None  # threading.Event of the running propagation
        self.sent = collections.defaultdict(dict)  # obj_id -> {frame: digest the client was sent}

    def touch(self):
        self.last_used = time.monotonic()

    def obj_ids(self):
        return [int(o) for o in self.engine.obj_ids]


class _State:
    def __init__(self, model, token, max_sessions, session_ttl, max_upload_mb):
        if max_sessions < 1:
            raise InputError("max_sessions must be at least 1")
        if session_ttl <= 0:
            raise InputError("session_ttl must be positive (seconds)")
        if max_upload_mb <= 0:
            raise InputError("max_upload_mb must be positive")
        self.model = model
        self.token = token.encode() if token else None
        self.max_sessions = int(max_sessions)
        self.session_ttl = float(session_ttl)
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.max_upload_mb = max_upload_mb
        self.gpu = FairLock()
        self.lock = threading.Lock()  # guards the dicts below
        self.sessions: Dict[str, _Session] = {}
        self.expired = collections.OrderedDict()  # id -> reason
        self.volumes: Dict[str, _Volume] = {}
        self.reserved = 0  # session slots taken by opens in progress
        self.stats = collections.Counter()
        self.started = time.time()

    # -- auth ------------------------------------------------------------------------------
    def token_ok(self, authorization):
        if self.token is None:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token)

    # -- sessions --------------------------------------------------------------------------
    def _expire_locked(self, sid, reason):
        sess = self.sessions.pop(sid, None)
        self.expired[sid] = reason
        while len(self.expired) > EXPIRED_MEMORY:
            self.expired.popitem(last=False)
        if sess is not None:
            self.stats["sessions_expired"] += 1
            _close_engine(sess.engine)

    def reap(self):
        """Free sessions idle past the TTL, and volumes no session uses that are as idle."""
        now = time.monotonic()
        with self.lock:
            for sid, sess in list(self.sessions.items()):
                if not sess.busy and now - sess.last_used > self.session_ttl:
                    self._expire_locked(sid, f"expired after {self.session_ttl:g} s idle")
            used = {s.volume.digest for s in self.sessions.values()}
            for digest, vol in list(self.volumes.items()):
                if digest not in used and now - vol.last_used > self.session_ttl:
                    del self.volumes[digest]
            self._trim_volumes_locked()

    def _trim_volumes_locked(self):
        """Keep volumes no session uses (for cheap re-opens) only up to twice the upload limit."""
        used = {s.volume.digest for s in self.sessions.values()}
        idle = sorted((v for d, v in self.volumes.items() if d not in used), key=lambda v: v.last_used)
        spare = sum(v.array.nbytes for v in idle)
        while idle and spare > 2 * self.max_upload_bytes:
            vol = idle.pop(0)
            spare -= vol.array.nbytes
            del self.volumes[vol.digest]

    def get_session(self, sid):
        with self.lock:
            sess = self.sessions.get(sid)
            if sess is not None and not sess.busy and time.monotonic() - sess.last_used > self.session_ttl:
                self._expire_locked(sid, f"expired after {self.session_ttl:g} s idle")
                sess = None
            if sess is None:
                if sid in self.expired:
                    raise ApiError(404, "session_expired",
                                   f"session {sid} {self.expired[sid]}; session expired, re-open it")
                raise ApiError(404, "session_unknown",
                               f"unknown session {sid}: the server does not know it (it was closed, or the "
                               f"server restarted); session expired, re-open it")
            sess.busy += 1
            sess.touch()
            return sess

    def release_session(self, sess):
        with self.lock:
            sess.busy -= 1
            sess.touch()

    def retry_after(self):
        """Seconds until the first idle session expires (the earliest a slot can free itself)."""
        now = time.monotonic()
        with self.lock:
            waits = [self.session_ttl - (now - s.last_used) for s in self.sessions.values() if not s.busy]
        return max(1, math.ceil(min(waits))) if waits else max(1, math.ceil(min(self.session_ttl, 60)))

    def reserve_slot(self):
        self.reap()
        with self.lock:
            if len(self.sessions) + self.reserved < self.max_sessions:
                self.reserved += 1
                return
        wait = self.retry_after()
        self.stats["sessions_refused"] += 1
        raise ApiError(
            429, "too_many_sessions",
            f"the server is at its limit of {self.max_sessions} open sessions; retry in {wait} s "
            f"or close a session you no longer use",
            headers={"Retry-After": str(wait)},
        )

    def free_sessions(self):
        with self.lock:
            return max(0, self.max_sessions - len(self.sessions) - self.reserved)

    def shutdown(self):
        with self.lock:
            for sess in self.sessions.values():
                if sess.cancel is not None:
                    sess.cancel.set()


def _close_engine(engine):
    close = getattr(engine, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # freeing is best effort; the session is gone either way
            log.exception("closing an engine session failed")


# -- request/response models (these make the OpenAPI page) -------------------------------------
# Loose types where the engine validates: its messages are the ones a local caller would see.
class OpenRequest(BaseModel):
    volume: str = Field(..., description="sha256 content digest of an uploaded volume")
    memory: str = Field("self-sorting", description='"self-sorting" or "sam2"')
    window: Optional[List[float]] = Field(None, description="(low, high) intensity window")


class SessionInfo(BaseModel):
    session: str
    num_frames: int
    frame_shape: List[int]
    obj_ids: List[int]
    memory: str
    ttl: float


class EncodedMask(BaseModel):
    shape: List[int] = Field(..., description="(rows, cols)")
    bits: str = Field(..., description="base64 of zstd-compressed np.packbits(mask)")
    digest: Optional[str] = None


class PromptRequest(BaseModel):
    frame: int
    obj_id: int = 1
    points: Optional[List[List[float]]] = Field(None, description="(N, 2) pixel x=col, y=row")
    labels: Optional[List[Union[int, float]]] = Field(None, description="N labels: 1 include, 0 exclude")
    box: Optional[List[float]] = Field(None, description="x0, y0, x1, y1")
    mask: Optional[EncodedMask] = None


class PromptResponse(BaseModel):
    frame: int
    obj_id: int
    mask: EncodedMask
    obj_ids: List[int]


class PropagateRequest(BaseModel):
    direction: str = Field("both", description='"forward", "backward" or "both"')
    start: Optional[int] = Field(None, description="frame to run from (default: the prompted frames)")
    stop: Optional[Union[int, Tuple[int, int]]] = Field(
        None, description="last frame to reach; a (low, high) pair for direction both")


class ObjIds(BaseModel):
    obj_ids: List[int]


class VolumeInfo(BaseModel):
    digest: str
    dtype: str
    shape: List[int]


class ApiErrorBody(BaseModel):
    error: str
    message: str


_ERRORS = {
    400: {"model": ApiErrorBody, "description": "bad input (the engine's message)"},
    401: {"model": ApiErrorBody, "description": "missing or wrong token"},
    404: {"model": ApiErrorBody, "description": "unknown or expired session / volume"},
}


# -- the gate: auth and body size, before any body is read --------------------------------------
class _Gate:
    """Pure ASGI middleware: 401 without a valid token, 413 for oversized bodies.

    Runs before FastAPI reads a body, so a bad token never costs an upload, and JSON bodies are
    read here with a cap (the volume upload route counts its own, larger limit).
    """

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/") and path not in _PUBLIC_PATHS:
            if not self.state.token_ok(headers.get("authorization")):
                self.state.stats["unauthorized"] += 1
                log.warning("401 %s %s: missing or wrong token", method, path)
                return await _send_json(send, 401, _error_body(
                    "unauthorized", "missing or wrong token: send the server's token as 'Authorization: Bearer <token>'"),
                    {"WWW-Authenticate": "Bearer", "Connection": "close"})
        if method in ("POST", "PUT", "PATCH") and not (method == "PUT" and _UPLOAD_PATH_RE.match(path)):
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit():
                    return await _send_json(send, 400, _error_body("invalid_request", "bad Content-Length header"),
                                            {"Connection": "close"})
                if int(length) > JSON_BODY_LIMIT:
                    return await _send_json(send, 413, _too_large(int(length), JSON_BODY_LIMIT, "request body"),
                                            {"Connection": "close"})
            chunks, total, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > JSON_BODY_LIMIT:
                    return await _send_json(send, 413, _too_large(total, JSON_BODY_LIMIT, "request body"),
                                            {"Connection": "close"})
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: lets the app see a disconnect

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


def _too_large(size, limit, what):
    return _error_body("too_large", f"{what} of {size / 2**20:.1f} MiB exceeds the server's limit of "
                                    f"{limit / 2**20:.1f} MiB", limit_bytes=limit)


async def _send_json(send, status, body, headers=None):
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


# -- the app ----------------------------------------------------------------------------------
def create_app(model, token=None, max_sessions=8, session_ttl=1800.0, max_upload_mb=1024):
    """Build the FastAPI app serving `model` (a `medsam2.load_model` result).

    token: clients must send `Authorization: Bearer <token>`; None = no auth (loopback use).
    max_sessions: open sessions at once (each holds a volume and its feature cache on the GPU).
    session_ttl: seconds a session may sit idle before it is freed.
    max_upload_mb: the largest volume accepted (raw size, and bytes on the wire).
    """
    state = _State(model, token, max_sessions, session_ttl, max_upload_mb)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def reaper():
            period = min(30.0, max(0.5, state.session_ttl / 4))
            while True:
                await asyncio.sleep(period)
                await run_in_threadpool(state.reap)

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            state.shutdown()  # stop running propagations so their threads let go of the GPU

    app = FastAPI(
        title="MedSAM2 remote engine",
        version=__version__,
        description=__doc__,
        lifespan=lifespan,
    )
    app.state.medsam2 = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(_error_body(exc.error, exc.message, exc.exception), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return JSONResponse(_error_body("invalid_request", _describe_validation(exc.errors())), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_error_body(kind, f"{request.method} {request.url.path}: {exc.detail}"),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("internal error in %s %s", request.method, request.url.path)
        return JSONResponse(_error_body("server", f"internal server error: {type(exc).__name__}: {exc}"), 500)

    @app.get("/", include_in_schema=False)
    async def root():
        return {"service": "medsam2", "version": __version__, "api": "/v1", "docs": "/docs"}

    # Declared for the OpenAPI page's "Authorize" button; the gate does the checking.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(HTTPBearer(auto_error=False))], responses=_ERRORS)

    @app.get("/v1/health", tags=["server"], summary="liveness (no token needed)")
    async def health():
        return {"status": "ok", "version": __version__}

    @v1.get("/info", tags=["server"], summary="version, model, device, limits, free sessions")
    async def info():
        with state.lock:
            open_sessions = len(state.sessions)
            volumes = len(state.volumes)
        return {
            "version": __version__,
            "api": API_VERSION,
            "model": getattr(model, "name", None),
            "image_size": getattr(model, "image_size", None),
            "device": str(getattr(model, "device", "")),
            "weights_are_random": bool(getattr(model, "weights_are_random", False)),
            "sessions": {"open": open_sessions, "max": state.max_sessions, "free": state.free_sessions()},
            "session_ttl": state.session_ttl,
            "max_upload_mb": state.max_upload_mb,
            "volumes": volumes,
            "gpu_busy": state.gpu.locked(),
            "gpu_waiting": state.gpu.waiting(),
            "stats": dict(state.stats),
        }

    # -- volumes ----------------------------------------------------------------------------
    def _check_digest(digest):
        if not _DIGEST_RE.match(digest):
            raise ApiError(400, "input", f"bad volume digest {digest!r}: expected 64 lowercase hex digits (sha256)")

    def _volume_info(vol):
        return {"digest": vol.digest, "dtype": vol.array.dtype.str, "shape": list(vol.array.shape)}

    @v1.head("/volumes/{digest}", tags=["volumes"], summary="is this volume already here? (200/404)")
    @v1.get("/volumes/{digest}", tags=["volumes"], response_model=VolumeInfo, summary="an uploaded volume's header")
    async def volume_info(digest: str):
        _check_digest(digest)
        with state.lock:
            vol = state.volumes.get(digest)
            if vol is not None:
                vol.last_used = time.monotonic()
        if vol is None:
            raise ApiError(404, "volume_unknown", f"volume {digest} is not on the server; upload it")
        return _volume_info(vol)

    @v1.put(
        "/volumes/{digest}", tags=["volumes"], status_code=201, response_model=VolumeInfo,
        summary="upload a volume (zstd-compressed raw C-order bytes; dtype and shape in headers)",
        responses={413: {"model": ApiErrorBody, "description": "larger than --max-upload-mb"}},
    )
    async def upload_volume(digest: str, request: Request):
        _check_digest(digest)
        with state.lock:
            if digest in state.volumes:
                state.volumes[digest].last_used = time.monotonic()
                return JSONResponse(_volume_info(state.volumes[digest]), 200, headers={"Connection": "close"})
        h = request.headers
        try:
            dtype = wire.check_dtype(h.get(wire.DTYPE_HEADER, ""))
            shape = wire.parse_shape(h.get(wire.SHAPE_HEADER, ""))
            codec = h.get(wire.CODEC_HEADER, "zstd")
            if len(shape) != 3:
                raise InputError(f"a volume must be 3D (slices, rows, cols); the header says shape {list(shape)}")
            raw_size = wire.nbytes(dtype, shape)
        except InputError as exc:
            raise ApiError(400, "input", str(exc), headers={"Connection": "close"}) from None
        limit = state.max_upload_bytes
        if raw_size > limit:
            raise ApiError(413, "too_large", _too_large(raw_size, limit, "volume")["message"],
                           headers={"Connection": "close"})
        # zstd can grow incompressible data slightly; raw bodies must be exact
        wire_limit = raw_size if codec == "raw" else raw_size + (raw_size >> 7) + (1 << 16)
        length = h.get("content-length")
        if length is not None and length.isdigit() and int(length) > wire_limit:
            status = 413 if int(length) > limit else 400
            message = (_too_large(int(length), limit, "upload")["message"] if status == 413 else
                       f"body of {length} bytes is longer than its header says "
                       f"(dtype {dtype.str} shape {wire.format_shape(shape)})")
            raise ApiError(status, "too_large" if status == 413 else "input", message, headers={"Connection": "close"})
        try:
            decoder = wire.StreamDecoder(dtype, shape, codec=codec)
            async for chunk in request.stream():
                received = decoder.received + len(chunk)
                if received > limit:  # counted while streaming: a missing or lying Content-Length
                    raise ApiError(413, "too_large", _too_large(received, limit, "upload")["message"],
                                   headers={"Connection": "close"})
                if received > wire_limit:
                    raise ApiError(400, "input", f"body is longer than its header says (dtype {dtype.str} "
                                                 f"shape {wire.format_shape(shape)})", headers={"Connection": "close"})
                decoder.feed(chunk)
            array = await run_in_threadpool(decoder.finish)
        except InputError as exc:
            raise ApiError(400, "input", str(exc), headers={"Connection": "close"}) from None
        got = await run_in_threadpool(wire.volume_digest, array)
        if got != digest:
            raise ApiError(400, "input", f"body does not match its digest: the URL says {digest}, the bytes hash to "
                                         f"{got}; dtype, shape or data differ from what the client hashed")
        if array.dtype.kind == "f":
            nans = int(await run_in_threadpool(lambda: np.count_nonzero(np.isnan(array))))
            if nans:
                first = np.argwhere(np.isnan(array))[0]
                raise ApiError(400, "input", f"volume contains {nans} NaN voxels (first at slice {first[0]}, row "
                                             f"{first[1]}, col {first[2]}); replace them before segmenting",
                               exception="InputError")
        with state.lock:
            state.volumes.setdefault(digest, _Volume(digest, array))
            state.stats["uploads"] += 1
            state._trim_volumes_locked()
        log.info("stored volume %s… %s %s", digest[:12], dtype.str, list(shape))
        return JSONResponse(_volume_info(state.volumes[digest]), 201)

    # -- sessions ---------------------------------------------------------------------------
    def _engine_call(sess, fn, *args, **kwargs):
        """Run an engine call under the session lock and the GPU lock, mapping input errors to 400."""
        with sess.lock, state.gpu.hold():
            try:
                with _engine_errors():
                    return fn(*args, **kwargs)
            finally:
                sess.touch()

    def _with_session(sid, fn):
        sess = state.get_session(sid)
        try:
            return fn(sess)
        finally:
            state.release_session(sess)

    def _session_info(sess):
        return {"session": sess.id, "num_frames": int(sess.engine.num_frames),
                "frame_shape": [int(v) for v in sess.engine.frame_shape], "obj_ids": sess.obj_ids(),
                "memory": sess.memory, "ttl": state.session_ttl}

    @v1.post("/sessions", tags=["sessions"], status_code=201, response_model=SessionInfo,
             summary="open a session on an uploaded volume",
             responses={429: {"model": ApiErrorBody, "description": "too many sessions; see Retry-After"}})
    def open_session(req: OpenRequest):
        _check_digest(req.volume)
        state.reserve_slot()
        try:
            with state.lock:
                vol = state.volumes.get(req.volume)
                if vol is not None:
                    vol.last_used = time.monotonic()
            if vol is None:
                raise ApiError(404, "volume_unknown", f"volume {req.volume} is not on the server; upload it first")
            window = tuple(req.window) if req.window is not None else None
            with _engine_errors():  # CPU work only (frames are built lazily): no need to wait for the GPU
                engine = model.open(vol.array, memory=req.memory, window=window)
            sess = _Session(secrets.token_urlsafe(18), vol, engine, req.memory, window)
            with state.lock:
                state.sessions[sess.id] = sess
                state.stats["sessions_opened"] += 1
        finally:
            with state.lock:
                state.reserved -= 1
        log.info("opened session %s on volume %s…", sess.id[:8], vol.digest[:12])
        return _session_info(sess)

    @v1.get("/sessions/{sid}", tags=["sessions"], response_model=SessionInfo, summary="a session's state")
    def session_info(sid: str):
        return _with_session(sid, _session_info)

    @v1.delete("/sessions/{sid}", tags=["sessions"], status_code=204, summary="close a session and free its memory")
    def close_session(sid: str):
        sess = state.get_session(sid)
        if sess.cancel is not None:
            sess.cancel.set()
        with state.lock:
            state.sessions.pop(sid, None)
            state.expired[sid] = "was closed"
        with sess.lock:
            _close_engine(sess.engine)
        state.release_session(sess)
        return Response(status_code=204)

    @v1.post("/sessions/{sid}/prompts", tags=["prompts"], response_model=PromptResponse,
             summary="add points / box / mask on one frame for one object; returns that frame's mask")
    def add_prompt(sid: str, req: PromptRequest):
        def run(sess):
            kwargs = {}
            try:
                if req.points is not None:
                    kwargs["points"] = np.asarray(req.points, dtype=np.float64)
                if req.labels is not None:
                    kwargs["labels"] = np.asarray(req.labels)
                if req.box is not None:
                    kwargs["box"] = np.asarray(req.box, dtype=np.float64)
                if req.mask is not None:  # the engine checks its shape against the frame
                    kwargs["mask"] = wire.decode_mask(req.mask.model_dump())
            except ValueError as exc:  # ragged point lists, a corrupt mask
                raise _input_error(exc) from None
            mask = _engine_call(sess, sess.engine.add_prompt, req.frame, obj_id=req.obj_id, **kwargs)
            packed, digest = wire.pack_mask(mask)
            sess.sent[req.obj_id][req.frame] = digest
            state.stats["prompts"] += 1
            return {"frame": req.frame, "obj_id": req.obj_id, "mask": wire.encode_mask(mask, packed),
                    "obj_ids": sess.obj_ids()}

        return _with_session(sid, run)

    @v1.delete("/sessions/{sid}/prompts", tags=["prompts"], response_model=ObjIds,
               summary="clear one object's prompts on one frame")
    def clear_prompts(sid: str, frame: int = Query(...), obj_id: int = Query(...)):
        def run(sess):
            _engine_call(sess, sess.engine.clear_prompts, frame, obj_id)
            sess.sent.pop(obj_id, None)  # its masks may change anywhere: resend them all
            return {"obj_ids": sess.obj_ids()}

        return _with_session(sid, run)

    @v1.delete("/sessions/{sid}/objects/{obj_id}", tags=["prompts"], response_model=ObjIds,
               summary="remove an object and its masks")
    def remove_object(sid: str, obj_id: int):
        def run(sess):
            _engine_call(sess, sess.engine.remove_object, obj_id)
            sess.sent.pop(obj_id, None)
            return {"obj_ids": sess.obj_ids()}

        return _with_session(sid, run)

    @v1.post("/sessions/{sid}/reset", tags=["prompts"], response_model=ObjIds,
             summary="drop every prompt, object and mask (keeps the cached image features)")
    def reset(sid: str):
        def run(sess):
            _engine_call(sess, sess.engine.reset)
            sess.sent.clear()
            return {"obj_ids": sess.obj_ids()}

        return _with_session(sid, run)

    @v1.get("/sessions/{sid}/masks", tags=["masks"],
            summary="one object's bool mask volume (obj_id given) or the uint16 label volume; binary "
                    "body in the upload format (X-MedSAM2-* headers)")
    def masks(sid: str, obj_id: Optional[int] = None):
        def run(sess):
            if obj_id is None:
                arr = _engine_call(sess, sess.engine.masks)
            else:
                arr = _engine_call(sess, sess.engine.mask, obj_id)
            headers, body = wire.encode_array(np.asarray(arr))
            return Response(body, media_type="application/octet-stream", headers=headers)

        return _with_session(sid, run)

    @v1.get("/sessions/{sid}/frames/{frame}", tags=["masks"],
            summary="every object's mask on one frame (JSON, like a propagation line)")
    def frame_masks(sid: str, frame: int):
        def run(sess):
            out = {}
            for obj, mask in _engine_call(sess, sess.engine.frame_masks, frame).items():
                packed, digest = wire.pack_mask(mask)
                sess.sent[int(obj)][frame] = digest
                out[str(obj)] = wire.encode_mask(mask, packed)
            return {"frame": frame, "masks": out}

        return _with_session(sid, run)

    @v1.post("/sessions/{sid}/propagate/cancel", tags=["propagation"], summary="stop this session's propagation")
    def cancel_propagation(sid: str):
        def run(sess):
            running = sess.cancel is not None and not sess.cancel.is_set()
            if sess.cancel is not None:
                sess.cancel.set()
            return {"cancelled": running}

        return _with_session(sid, run)

    @v1.post(
        "/sessions/{sid}/propagate", tags=["propagation"],
        summary="propagate; streams NDJSON lines as frames finish",
        response_description=(
            'application/x-ndjson, one JSON object a line: {"type": "wait", "waiting": n} while queued for the '
            'GPU; {"type": "frame", "frame": f, "index": i, "masks": {obj_id: mask | {"same": digest}}} per '
            'finished frame; then {"type": "end", "frames": n, "cancelled": bool} or {"type": "error", ...}'),
    )
    async def propagate(sid: str, req: PropagateRequest, request: Request):
        cancel = threading.Event()
        stop = tuple(req.stop) if isinstance(req.stop, (list, tuple)) else req.stop
        # The engine validates the arguments now, so bad ones get a plain 400 (and the local
        # behaviour: an error at the call, not at the first frame) before the stream starts.
        sess, gen = await run_in_threadpool(_start_propagation, sid, req.direction, req.start, stop, cancel)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():  # owns sess.lock (taken by _start_propagation) and the session's busy mark
            frames, cancelled = 0, False
            try:
                try:
                    sess.cancel = cancel  # for .../propagate/cancel
                    if not state.gpu.acquire(cancel=cancel):  # queued; the client left
                        cancelled = True
                        return
                    try:
                        for frame, masks in gen:
                            sess.touch()
                            out = {}
                            for obj, mask in masks.items():
                                packed, digest = wire.pack_mask(mask)
                                if sess.sent[int(obj)].get(int(frame)) == digest:
                                    out[str(obj)] = {"same": digest}
                                else:
                                    sess.sent[int(obj)][int(frame)] = digest
                                    out[str(obj)] = wire.encode_mask(mask, packed)
                            put({"type": "frame", "frame": int(frame), "index": frames, "masks": out})
                            frames += 1
                            state.stats["frames_propagated"] += 1
                            if cancel.is_set():
                                break
                    finally:
                        gen.close()
                        cancelled = cancel.is_set()
                        state.gpu.release()
                finally:
                    sess.cancel = None
                    sess.lock.release()
                put({"type": "end", "frames": frames, "cancelled": cancelled})
            except _INPUT_EXCEPTIONS as exc:
                err = _input_error(exc)
                put({"type": "error", "status": 400, **_error_body(err.error, err.message, err.exception)})
            except Exception as exc:  # the stream is already 200: report in-band
                log.exception("propagation failed in session %s", sid[:8])
                put({"type": "error", "status": 500,
                     **_error_body("server", f"internal server error: {type(exc).__name__}: {exc}")})
            finally:
                state.stats["propagations"] += 1
                state.stats["propagations_cancelled"] += int(cancelled)
                state.release_session(sess)
                put(None)

        # Started here, not in the stream, so the session is released even if the stream never starts.
        worker = threading.Thread(target=work, name=f"medsam2-propagate-{sid[:6]}", daemon=True)
        worker.start()

        async def lines():
            try:
                while True:
                    try:
                        item = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_S)
                    except asyncio.TimeoutError:
                        yield json.dumps({"type": "wait", "waiting": state.gpu.waiting()}) + "\n"
                        continue
                    if item is None:
                        return
                    yield json.dumps(item) + "\n"
                    # Starlette cancels this generator on disconnect under ASGI spec < 2.4; this
                    # check keeps a server that only drops writes (spec 2.4) from running on.
                    if await request.is_disconnected():
                        return
            finally:
                # Finished, or the client went away (Starlette cancels this generator on
                # disconnect): either way the worker stops within one frame.
                cancel.set()

        return StreamingResponse(lines(), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    def _start_propagation(sid, direction, start, stop, cancel):
        sess = state.get_session(sid)
        try:
            if not sess.lock.acquire(timeout=SESSION_WAIT_S):
                raise ApiError(409, "busy", f"session {sid} is busy (another propagation is running on it); "
                                            f"cancel that one first, or retry")
            try:
                gen = sess.engine.propagate(direction=direction, start=start, stop=stop, cancel=cancel)
            except BaseException as exc:
                sess.lock.release()
                if isinstance(exc, _INPUT_EXCEPTIONS):
                    raise _input_error(exc) from None
                raise
        except BaseException:
            state.release_session(sess)
            raise
        return sess, gen

    app.include_router(v1)
    return app


def _describe_validation(errors):
    """FastAPI's validation errors -> one readable sentence."""
    parts = []
    for err in errors[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"request body is not valid JSON ({ctx.get('error', err.get('msg'))} at position "
                         f"{err.get('loc', ('', '?'))[-1]})")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    return "invalid request: " + "; ".join(parts) + more


def run(model, host="127.0.0.1", port=8765, token=None, max_sessions=8, session_ttl=1800.0, max_upload_mb=1024,
        log_level="info"):
    """Serve `model` with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model, token=token, max_sessions=max_sessions, session_ttl=session_ttl,
                     max_upload_mb=max_upload_mb)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
