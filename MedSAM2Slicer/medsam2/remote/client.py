"""Remote client: a session on a `medsam2 serve` GPU box with the local session's interface.

    model = medsam2.connect("http://gpu-box:8765", token="...")
    session = model.open(volume)                 # uploads the volume once (by content digest)
    mask = session.add_prompt(3, points=[[30, 40]], labels=[1])
    for frame, masks in session.propagate(cancel=event): ...

Needs numpy, httpx and zstandard only (no torch): a laptop running Slicer can use a GPU box
without the model stack. Errors come back as the local ones would: an out-of-range prompt raises
InputError with the engine's message; server trouble raises ServerError; a session the server
no longer knows raises SessionExpired, or, with `auto_reopen` (the default), is re-opened
transparently (volume re-uploaded if needed, prompts replayed) with a warning that says so.
"""

import ipaddress
import json
import logging
import threading
import uuid
import warnings
import weakref
from urllib.parse import urlsplit

import httpx
import numpy as np

from ..errors import InputError, MedSAM2Error, ServerError, SessionExpired
from . import wire

log = logging.getLogger(__name__)

_EXCEPTIONS = {"InputError": InputError, "ValueError": ValueError, "KeyError": KeyError,
               "IndexError": IndexError, "TypeError": TypeError}
_EXPIRED = ("session_expired", "session_unknown")
_LINE_TIMEOUT_S = 120.0  # the server sends a line at least every second while a stream is open


class SessionReopened(UserWarning):
    """A remote session had expired and was re-opened with its prompts replayed."""


def connect(url, token=None, timeout=300.0, auto_reopen=True):
    """Connect to a `medsam2 serve` server -> RemoteModel (checks the URL and token at once).

    timeout: seconds to wait for one reply (a prompt may queue behind another client's work).
    auto_reopen: re-open expired sessions transparently (else raise SessionExpired).
    """
    return RemoteModel(url, token=token, timeout=timeout, auto_reopen=auto_reopen)


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _error_from(response, what):
    """HTTP error response -> the exception a local call would have raised (or ServerError)."""
    try:
        body = response.json()
        kind, message = body.get("error", ""), body.get("message") or response.text
        exception = body.get("exception")
    except (ValueError, AttributeError):
        kind, message, exception = "", response.text[:500], None
    status = response.status_code
    if status == 404 and kind in _EXPIRED:
        return SessionExpired(message)
    if status in (400, 422) and (kind in ("input", "invalid_request")):
        cls = _EXCEPTIONS.get(exception, InputError)
        return cls(message)
    if status == 401:
        err = ServerError(f"{what}: the server refused the token (401): pass the server's token to "
                          f"medsam2.connect(url, token=...)")
    elif status in (429, 503):
        retry = response.headers.get("Retry-After")
        err = ServerError(f"{what}: {message}")
        err.retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    else:
        err = ServerError(f"{what}: server answered {status}: {message}")
    err.status = status
    err.kind = kind
    return err


class RemoteModel:
    """A model served by `medsam2 serve`; `.open()` gives sessions like a local model's."""

    def __init__(self, url, token=None, timeout=300.0, auto_reopen=True):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"bad server URL {url!r}: expected http://host:port or https://host:port")
        self.url = url.rstrip("/")
        self.auto_reopen = auto_reopen
        # A stable id per client lets a load balancer keep all of its requests on one GPU box
        # (sessions and uploaded volumes live in that box's memory): hash on this header.
        self.client_id = uuid.uuid4().hex
        headers = {"User-Agent": "medsam2-client", "X-MedSAM2-Client": self.client_id}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            # a proxy from the environment must not capture a loopback server
            trust_env=not _is_loopback(parts.hostname),
        )
        self.info = self.refresh_info()
        self.name = self.info.get("model")
        self.image_size = self.info.get("image_size")
        self.device = self.info.get("device")  # a string: the server's torch device
        self.weights_are_random = bool(self.info.get("weights_are_random"))
        self.version = self.info.get("version")

    def __repr__(self):
        return f"RemoteModel({self.url!r}, model={self.name!r}, device={self.device!r})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._http.close()

    # -- transport ----------------------------------------------------------------------------
    def request(self, method, path, what=None, ok=(200, 201, 204), **kwargs):
        what = what or f"{method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"{what}: no answer from {self.url} in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise ServerError(f"{what}: cannot reach the MedSAM2 server at {self.url} ({exc})") from None
        if response.status_code not in ok:
            raise _error_from(response, what)
        return response

    def refresh_info(self):
        self.info = self.request("GET", "/v1/info", what="connect").json()
        return self.info

    def health(self):
        return self.request("GET", "/v1/health", what="health").json()

    # -- volumes and sessions -----------------------------------------------------------------
    def upload(self, volume, digest=None):
        """Upload `volume` unless the server has it already; returns (digest, uploaded?)."""
        digest = digest or wire.volume_digest(volume)
        head = self.request("HEAD", f"/v1/volumes/{digest}", what="check volume", ok=(200, 404))
        if head.status_code == 200:
            return digest, False
        limit_mb = self.info.get("max_upload_mb")
        size = volume.nbytes
        if limit_mb and size > limit_mb * (1 << 20):
            raise InputError(f"the volume is {size / 2**20:.1f} MiB; the server accepts at most {limit_mb} MiB "
                             f"(its --max-upload-mb); crop or downsample it, or ask for a larger limit")
        headers, body = wire.encode_array(volume)
        self.request("PUT", f"/v1/volumes/{digest}", what="upload volume", content=body,
                     headers={**headers, "Content-Type": "application/octet-stream"})
        log.info("uploaded volume %s… (%.1f MiB raw, %.1f MiB sent)", digest[:12], size / 2**20, len(body) / 2**20)
        return digest, True

    def open(self, volume, memory="self-sorting", window=None):
        """Open a remote session on `volume` (slices, rows, cols); same arguments as a local model."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"volume must be 3D (slices, rows, cols); got shape {volume.shape}")
        wire.check_dtype(volume.dtype)
        volume = np.ascontiguousarray(volume)
        return RemoteSession(self, volume, memory=memory, window=window)

    def _open_session(self, volume, digest, memory, window):
        payload = {"volume": digest, "memory": memory,
                   "window": None if window is None else [float(window[0]), float(window[1])]}
        for attempt in range(2):  # the volume may be evicted between upload and open: upload once more
            self.upload(volume, digest)
            try:
                return self.request("POST", "/v1/sessions", what="open session", json=payload).json()
            except ServerError as exc:
                if getattr(exc, "kind", "") != "volume_unknown" or attempt:
                    raise
        raise AssertionError("unreachable")


class RemoteSession:
    """The local session's interface, backed by a server session.

    Masks come back as numpy bool arrays of the volume's (rows, cols), label maps as uint16,
    exactly as from a local session. Prompts are recorded so an expired session can be
    re-opened and brought back to the same prompts.
    """

    def __init__(self, model, volume, memory="self-sorting", window=None):
        self.model = model
        self.memory, self.window = memory, window
        self._volume = volume
        self._digest = wire.volume_digest(volume)
        self._lock = threading.RLock()
        self._log = []  # replayable prompt operations since the last reset
        self._mirror = {}  # obj_id -> {frame: encoded mask as last received}
        self.reopened = 0
        self.on_reopen = None  # callable(message), e.g. to show it in a status bar
        self.id = None
        self._start(self.model._open_session(volume, self._digest, memory, window))

    def _start(self, info):
        self.id = info["session"]
        self.num_frames = int(info["num_frames"])
        self.frame_shape = tuple(int(v) for v in info["frame_shape"])
        self._obj_ids = [int(o) for o in info["obj_ids"]]
        self._mirror = {}

    def __repr__(self):
        return f"RemoteSession({self.model.url!r}, id={self.id!r}, frames={self.num_frames})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def obj_ids(self):
        return list(self._obj_ids)

    # -- plumbing -----------------------------------------------------------------------------
    def _path(self, tail=""):
        return f"/v1/sessions/{self.id}{tail}"

    def _call(self, method, tail, what, **kwargs):
        """One request on this session; re-open and retry once if the server forgot it."""
        try:
            return self.model.request(method, self._path(tail), what=what, **kwargs)
        except SessionExpired as exc:
            if not self.model.auto_reopen:
                raise
            self._reopen(str(exc))
            return self.model.request(method, self._path(tail), what=what, **kwargs)

    def reopen(self):
        """Open a new server session on the same volume and replay the prompts; -> prompts replayed.

        Masks from earlier propagations are not recomputed: propagate again to refresh them.
        """
        with self._lock:
            info = self.model._open_session(self._volume, self._digest, self.memory, self.window)
            self._start(info)
            replayed = 0
            for op, kwargs in self._log:
                if op == "add_prompt":
                    payload = kwargs
                    response = self.model.request("POST", self._path("/prompts"), what="replay prompt", json=payload)
                    self._note_prompt(response.json())
                    replayed += 1
                elif op == "clear_prompts":
                    data = self.model.request("DELETE", self._path("/prompts"), what="replay clear", params=kwargs)
                    self._obj_ids = data.json()["obj_ids"]
                    self._mirror.pop(kwargs["obj_id"], None)
                elif op == "remove_object":
                    data = self.model.request("DELETE", self._path(f"/objects/{kwargs['obj_id']}"), what="replay remove")
                    self._obj_ids = data.json()["obj_ids"]
                    self._mirror.pop(kwargs["obj_id"], None)
            self.reopened += 1
            return replayed

    def _reopen(self, reason):
        replayed = self.reopen()
        message = (f"MedSAM2 server session expired ({reason}); re-opened it as {self.id[:8]}… and replayed "
                   f"{replayed} prompt(s); propagate again to refresh propagated frames")
        log.warning(message)
        warnings.warn(message, SessionReopened, stacklevel=4)
        if self.on_reopen is not None:
            self.on_reopen(message)

    def _note_prompt(self, data):
        self._obj_ids = [int(o) for o in data["obj_ids"]]
        self._mirror.setdefault(int(data["obj_id"]), {})[int(data["frame"])] = data["mask"]
        return wire.decode_mask(data["mask"], self.frame_shape)

    # -- the session interface ----------------------------------------------------------------
    def add_prompt(self, frame, obj_id=1, points=None, labels=None, box=None, mask=None):
        """Add points / box / mask on `frame` for `obj_id`; returns that frame's bool mask."""
        # Only what JSON cannot carry is checked here; the engine checks the rest, with the
        # messages a local session gives.
        payload = {"frame": _as_int(frame, "frame"), "obj_id": _as_int(obj_id, "obj_id")}
        if points is not None:
            pts = np.asarray(points, dtype=np.float64)
            if pts.ndim == 1 and pts.size == 2:
                pts = pts[None]
            if pts.ndim != 2:
                raise InputError(f"points must be an (N, 2) array of (x=col, y=row); got shape {pts.shape}")
            payload["points"] = pts.tolist()
        if labels is not None:
            payload["labels"] = np.asarray(labels).reshape(-1).tolist()  # ints stay ints, as in messages
        if box is not None:
            payload["box"] = np.asarray(box, dtype=np.float64).reshape(-1).tolist()
        if mask is not None:
            m = np.asarray(mask)
            if m.ndim != 2:
                raise InputError(f"mask shape {m.shape} does not match the frame (rows, cols) {self.frame_shape}")
            payload["mask"] = wire.encode_mask(m.astype(bool))
        with self._lock:
            data = self._call("POST", "/prompts", "add prompt", json=payload).json()
            self._log.append(("add_prompt", payload))
            return self._note_prompt(data)

    def clear_prompts(self, frame, obj_id):
        params = {"frame": _as_int(frame, "frame"), "obj_id": _as_int(obj_id, "obj_id")}
        with self._lock:
            data = self._call("DELETE", "/prompts", "clear prompts", params=params).json()
            self._log.append(("clear_prompts", params))
            self._obj_ids = data["obj_ids"]
            self._mirror.pop(params["obj_id"], None)

    def remove_object(self, obj_id):
        obj_id = _as_int(obj_id, "obj_id")
        with self._lock:
            data = self._call("DELETE", f"/objects/{obj_id}", "remove object").json()
            self._log.append(("remove_object", {"obj_id": obj_id}))
            self._obj_ids = data["obj_ids"]
            self._mirror.pop(obj_id, None)

    def reset(self):
        with self._lock:
            data = self._call("POST", "/reset", "reset").json()
            self._log.clear()
            self._obj_ids = data["obj_ids"]
            self._mirror.clear()

    def mask(self, obj_id):
        """bool (slices, rows, cols) for one object."""
        response = self._call("GET", "/masks", "get mask", params={"obj_id": _as_int(obj_id, "obj_id")})
        return wire.decode_array(response.headers, response.content)

    def masks(self):
        """uint16 label volume (slices, rows, cols)."""
        response = self._call("GET", "/masks", "get masks")
        return wire.decode_array(response.headers, response.content)

    def frame_masks(self, frame):
        """Every object's current mask on one frame: {obj_id: bool (rows, cols)}."""
        data = self._call("GET", f"/frames/{_as_int(frame, 'frame')}", "get frame").json()["masks"]
        for obj, enc in data.items():
            self._mirror.setdefault(int(obj), {})[int(frame)] = enc
        return {int(obj): wire.decode_mask(enc, self.frame_shape) for obj, enc in data.items()}

    def propagate(self, direction="both", start=None, stop=None, cancel=None, axes=None):
        """Generator of (frame, {obj_id: bool mask}) as the server finishes frames.

        Arguments are checked at the call (as locally); frames come as they finish. cancel: a
        threading.Event; once set, no further frame is yielded and the server stops within one
        frame (breaking out of the loop, or closing the generator, does the same).
        """
        if axes not in (None, "one"):
            raise InputError("multi-axis fusion (axes='all') runs on a local model only; the server "
                             "propagates along one axis. Use axes='one', or run the model locally.")
        payload = {"direction": direction,
                   "start": None if start is None else _as_int(start, "start"),
                   "stop": None if stop is None else (
                       [_as_int(v, "stop") for v in stop] if isinstance(stop, (tuple, list, np.ndarray))
                       else _as_int(stop, "stop"))}
        try:
            response = self._open_stream(payload)
        except SessionExpired as exc:
            if not self.model.auto_reopen:
                raise
            self._reopen(str(exc))
            response = self._open_stream(payload)
        lines = self._read_stream(response, cancel)
        weakref.finalize(lines, response.close)  # a generator dropped unstarted still frees its connection
        return lines

    def _open_stream(self, payload):
        http = self.model._http
        request = http.build_request("POST", self._path("/propagate"), json=payload,
                                     timeout=httpx.Timeout(_LINE_TIMEOUT_S, connect=10.0))
        try:
            response = http.send(request, stream=True)
        except httpx.TimeoutException:
            raise ServerError(f"propagate: no answer from {self.model.url} in time") from None
        except httpx.TransportError as exc:
            raise ServerError(f"propagate: cannot reach the MedSAM2 server at {self.model.url} ({exc})") from None
        if response.status_code != 200:
            try:
                response.read()
            finally:
                response.close()
            raise _error_from(response, "propagate")
        return response

    def _read_stream(self, response, cancel):
        try:
            ended = False
            for line in response.iter_lines():
                if cancel is not None and cancel.is_set():
                    self._cancel_remote()
                    return
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type")
                if kind == "frame":
                    frame = int(event["frame"])
                    yield frame, {int(obj): self._frame_mask(int(obj), frame, enc)
                                  for obj, enc in event["masks"].items()}
                    if cancel is not None and cancel.is_set():  # set while the caller held the frame
                        self._cancel_remote()
                        return
                elif kind == "end":
                    ended = True
                    break
                elif kind == "error":
                    raise _error_from(_Fake(event), "propagate")
                # "wait": a heartbeat while queued behind another client's work
            if not ended:
                raise ServerError("propagate: the stream ended before the server said it was done "
                                  "(server stopped or connection lost)")
        except httpx.TimeoutException:
            raise ServerError(f"propagate: no line from {self.model.url} for {_LINE_TIMEOUT_S:g} s") from None
        except httpx.TransportError as exc:
            raise ServerError(f"propagate: connection to {self.model.url} failed ({exc})") from None
        finally:
            response.close()  # before the end (cancel, break): the server sees the disconnect

    def _frame_mask(self, obj, frame, enc):
        frames = self._mirror.setdefault(obj, {})
        if "same" in enc:
            known = frames.get(frame)
            if known is None or known.get("digest") != enc["same"]:
                known = self._fetch_frame(frame).get(str(obj))  # we missed it (e.g. a cancelled stream)
                if known is None:
                    raise ServerError(f"propagate: the server has no mask for object {obj} on frame {frame}")
                frames[frame] = known
            return wire.decode_mask(known, self.frame_shape)
        frames[frame] = enc
        return wire.decode_mask(enc, self.frame_shape)

    def _fetch_frame(self, frame):
        return self.model.request("GET", self._path(f"/frames/{frame}"), what="get frame").json()["masks"]

    def _cancel_remote(self):
        try:  # best effort: closing the stream also stops the server
            self.model._http.post(self._path("/propagate/cancel"), timeout=5.0)
        except httpx.HTTPError:
            pass

    def close(self):
        """Free the server session (its GPU memory); the object is unusable afterwards."""
        if self.id is None:
            return
        try:
            self.model.request("DELETE", self._path(), what="close session", ok=(204, 404))
        except MedSAM2Error as exc:
            log.warning("closing remote session failed: %s", exc)
        self.id = None


class _Fake:
    """Lets an in-stream error line go through the same mapping as an HTTP error response."""

    def __init__(self, event):
        self._event = event
        self.status_code = int(event.get("status", 500))
        self.headers = {}
        self.text = event.get("message", "")

    def json(self):
        return self._event


def _as_int(value, name):
    """Integers only, as the engine wants (JSON would quietly turn 3.0 into 3)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer; got {value!r}")
    return int(value)
