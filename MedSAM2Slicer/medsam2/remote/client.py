"""Remote client: a session on a `medsam2 serve` GPU box with the local session's interface.

    model = medsam2.connect("http://gpu-box:8765", token="...")
    session = model.open(volume)                 # uploads the volume once (by content digest)
    mask = session.add_prompt(3, points=[[30, 40]], labels=[1])
    for frame, masks in session.propagate(cancel=event): ...
    images = model.open_images(stack)            # 2D images of one shape: one-prompt mode

Needs numpy, httpx and zstandard only (no torch): a laptop running Slicer can use a GPU box
without the model stack. Errors come back as the local ones would: an out-of-range prompt raises
InputError with the engine's message; server trouble raises ServerError; a session the server
no longer knows raises SessionExpired, or, with `auto_reopen` (the default), is re-opened
transparently (volume re-uploaded if needed, the whole action history replayed, propagations
included) with a warning that says so.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
import uuid
import warnings
import weakref
from typing import Callable
from urllib.parse import urlsplit

import httpx
import numpy as np

from ..errors import InputError, MedSAM2Error, ServerError, SessionExpired
from ..prompt import Prompt, as_integer, as_obj_id
from . import wire
from .http_errors import error_from_response
from .mirror import MaskMirror
from .net import is_loopback
from .replay import ADD_PROMPT, CLEAR_PROMPTS, PROPAGATE, REMOVE_OBJECT, RESET, Action, ActionLog
from .stream import LINE_TIMEOUT_S, read_propagation

log = logging.getLogger(__name__)

UPLOAD_BUSY_WAIT_S = 60.0  # how long an upload waits, in total, for a server receiving other uploads


class SessionReopened(UserWarning):
    """A remote session had expired and was re-opened with its action history replayed."""


def connect(url: str, token: str | None = None, timeout: float = 300.0, auto_reopen: bool = True,
            verify=True) -> "RemoteModel":
    """Connect to a `medsam2 serve` server -> RemoteModel (checks the URL and token at once).

    timeout: seconds to wait for one reply (a prompt may queue behind another client's work).
    auto_reopen: re-open expired sessions transparently (else raise SessionExpired).
    verify: TLS verification for https: True, False, or the path of a CA bundle (a clinic's own CA).
    """
    return RemoteModel(url, token=token, timeout=timeout, auto_reopen=auto_reopen, verify=verify)


class RemoteModel:
    """A model served by `medsam2 serve`; `.open()` gives sessions like a local model's."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0, auto_reopen: bool = True,
                 verify=True):
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
            base_url=self.url, headers=headers, verify=_tls_verification(verify),
            timeout=httpx.Timeout(timeout, connect=10.0),
            # a proxy from the environment must not capture a loopback server
            trust_env=not is_loopback(parts.hostname),
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

    def close(self) -> None:
        self._http.close()

    # -- transport ----------------------------------------------------------------------------
    def request(self, method: str, path: str, what: str | None = None, ok=(200, 201, 204), **kwargs) -> httpx.Response:
        what = what or f"{method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"{what}: no answer from {self.url} in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise ServerError(f"{what}: cannot reach the MedSAM2 server at {self.url} ({exc})") from None
        if response.status_code not in ok:
            raise error_from_response(response, what)
        return response

    def open_stream(self, path: str, payload: dict, what: str) -> httpx.Response:
        """POST that answers with a stream (a propagation); errors before the stream starts raise."""
        request = self._http.build_request("POST", path, json=payload,
                                           timeout=httpx.Timeout(LINE_TIMEOUT_S, connect=10.0))
        try:
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException:
            raise ServerError(f"{what}: no answer from {self.url} in time") from None
        except httpx.TransportError as exc:
            raise ServerError(f"{what}: cannot reach the MedSAM2 server at {self.url} ({exc})") from None
        if response.status_code != 200:
            try:
                response.read()
            finally:
                response.close()
            raise error_from_response(response, what)
        return response

    def refresh_info(self) -> dict:
        self.info = self.request("GET", "/v1/info", what="connect").json()
        return self.info

    def health(self) -> dict:
        return self.request("GET", "/v1/health", what="health").json()

    # -- volumes and sessions -----------------------------------------------------------------
    def upload(self, volume: np.ndarray, digest: str | None = None) -> tuple[str, bool]:
        """Upload `volume` unless the server has it already; returns (digest, uploaded?)."""
        digest = digest or wire.volume_digest(volume)
        head = self.request("HEAD", f"/v1/volumes/{digest}", what="check volume", ok=(200, 404))
        if head.status_code == 200:
            return digest, False
        self._check_fits(volume)
        headers, body = wire.encode_array(volume)
        deadline = time.monotonic() + UPLOAD_BUSY_WAIT_S
        while True:
            try:
                self.request("PUT", f"/v1/volumes/{digest}", what="upload volume", content=body,
                             headers={**headers, "Content-Type": "application/octet-stream"})
                break
            except ServerError as exc:  # the server is receiving as many uploads as it takes: wait a turn
                wait = getattr(exc, "retry_after", None)
                if getattr(exc, "status", None) != 503 or wait is None or time.monotonic() + wait > deadline:
                    raise
                time.sleep(wait)
        log.info("uploaded volume %s… (%.1f MiB raw, %.1f MiB sent)", digest[:12], volume.nbytes / 2**20,
                 len(body) / 2**20)
        return digest, True

    def _check_fits(self, volume: np.ndarray) -> None:
        """Say before uploading what the server would refuse on the headers."""
        limit_mb = self.info.get("max_upload_mb")
        if limit_mb and volume.nbytes > limit_mb * (1 << 20):
            raise InputError(f"the volume is {volume.nbytes / 2**20:.1f} MiB; the server accepts at most {limit_mb} "
                             f"MiB (its --max-upload-mb); crop or downsample it, or ask for a larger limit")
        max_side = self.info.get("limits", {}).get("max_side")
        if max_side and max(volume.shape) > max_side:
            raise InputError(f"volume shape {list(volume.shape)} has a side over the server's limit of {max_side} "
                             f"(its --max-side); crop or downsample it")

    def open(self, volume, memory: str = "self-sorting", window=None) -> "RemoteSession":
        """Open a remote session on `volume` (slices, rows, cols); same arguments as a local model."""
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise InputError(f"volume must be 3D (slices, rows, cols); got shape {volume.shape}")
        wire.check_dtype(volume.dtype)
        return RemoteSession(self, np.ascontiguousarray(volume), memory=memory, window=window)

    def open_images(self, images, memory: str = "self-sorting", window=None) -> "RemoteSession":
        """One-prompt session on 2D images of one shape: a list of (rows, cols) arrays, or an
        (N, rows, cols) array whose slices are independent images (as Model.open_images)."""
        return RemoteSession(self, _image_stack(images), memory=memory, window=window, images=True)

    def open_session(self, volume: np.ndarray, digest: str, memory: str, window, images: bool = False) -> dict:
        """Upload if needed and open a server session -> its facts (a re-open calls this too)."""
        payload = {"volume": digest, "memory": memory, "images": bool(images),
                   "window": None if window is None else [float(window[0]), float(window[1])]}
        for attempt in range(2):  # the volume may be evicted between upload and open: upload once more
            self.upload(volume, digest)
            try:
                return self.request("POST", "/v1/sessions", what="open session", json=payload).json()
            except ServerError as exc:
                if getattr(exc, "kind", "") != "volume_unknown" or attempt:
                    raise
        raise AssertionError("unreachable")


def _tls_verification(verify):
    """True / False, an ssl.SSLContext, or the path of a CA bundle file or folder -> what httpx takes."""
    if isinstance(verify, (str, os.PathLike)):
        path = os.fspath(verify)
        if not os.path.exists(path):
            raise InputError(f"verify={path!r}: no such CA bundle file or folder")
        return ssl.create_default_context(capath=path) if os.path.isdir(path) else ssl.create_default_context(cafile=path)
    return verify


def _image_stack(images) -> np.ndarray:
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise InputError(f"an image set given as one array must be (N, rows, cols); got shape {images.shape}")
        stack = images
    else:
        try:
            arrays = [np.asarray(im) for im in images]
        except TypeError:
            raise InputError("images must be a list of 2-D arrays or an (N, rows, cols) array") from None
        if not arrays:
            raise InputError("the image set is empty: give at least one image")
        shapes = {a.shape for a in arrays}
        if any(a.ndim != 2 for a in arrays) or len(shapes) != 1:
            raise InputError(f"a remote image set takes grey 2D images of one shape; got shapes {sorted(shapes)[:4]}. "
                             f"Convert colour to grey and bring the images to one size, or run the model locally")
        stack = np.stack(arrays)
    wire.check_dtype(stack.dtype)
    return np.ascontiguousarray(stack)


class RemoteSession:
    """The local session's interface, backed by a server session.

    Masks come back as numpy bool arrays of the volume's (rows, cols), label maps as uint16,
    exactly as from a local session (for an image set: lists, one array per image). Every action
    is recorded, so a session the server lost can be re-opened and brought back to the same state.
    """

    def __init__(self, model: RemoteModel, volume: np.ndarray, memory: str = "self-sorting", window=None,
                 images: bool = False):
        self.model = model
        self.memory, self.window = memory, window
        self.is_image_set = bool(images)
        self._volume = volume
        self._digest = wire.volume_digest(volume)
        self._lock = threading.RLock()
        self._history = ActionLog()
        self._mirror = MaskMirror()
        self.reopened = 0
        self.on_reopen: Callable[[str], None] | None = None  # e.g. to show the message in a status bar
        self.last_propagation = None  # the latest propagation's PropagationReport, once its stream ended
        self.id: str | None = None
        self._start(self._open_on_server())

    def _open_on_server(self) -> dict:
        return self.model.open_session(self._volume, self._digest, self.memory, self.window, self.is_image_set)

    def _start(self, info: dict) -> None:
        self.id = info["session"]
        self.num_frames = int(info["num_frames"])
        self.frame_shape = tuple(int(v) for v in info["frame_shape"])
        self._mask_shape = tuple(int(v) for v in info.get("image_shape") or self._volume.shape[1:])
        self._obj_ids = [int(o) for o in info["obj_ids"]]
        self._mirror.clear()

    def __repr__(self):
        return f"RemoteSession({self.model.url!r}, id={self.id!r}, frames={self.num_frames})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def obj_ids(self) -> list[int]:
        return list(self._obj_ids)

    @property
    def image_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of every image (an image set) or slice."""
        return [self._mask_shape] * self.num_frames

    # -- the session interface ----------------------------------------------------------------
    def add_prompt(self, frame: int, obj_id: int = 1, points=None, labels=None, box=None, mask=None,
                   packed: bool = False):
        """Add points / box / mask on `frame` for `obj_id`; returns that frame's bool mask (packed=True:
        a PackedMask, for a caller that passes it on rather than using its pixels)."""
        # Only what JSON cannot carry is checked here (prompt.py); the engine checks the rest, with
        # the messages a local session gives.
        payload = Prompt.make(frame, obj_id, points, labels, box, mask).to_json()
        return self._decode(self._perform(Action(ADD_PROMPT, payload)), packed)

    def clear_prompts(self, frame: int, obj_id: int) -> None:
        self._perform(Action(CLEAR_PROMPTS, {"frame": as_integer(frame, "frame"), "obj_id": as_obj_id(obj_id)}))

    def remove_object(self, obj_id: int) -> None:
        self._perform(Action(REMOVE_OBJECT, {"obj_id": as_obj_id(obj_id)}))

    def reset(self) -> None:
        self._perform(Action(RESET))

    def mask(self, obj_id: int):
        """bool (slices, rows, cols) for one object (an image set: a list of bool (rows, cols))."""
        response = self._call("GET", "/masks", "get mask", params={"obj_id": as_obj_id(obj_id)})
        return self._as_result(wire.decode_array(response.headers, response.content))

    def masks(self):
        """uint16 label volume (slices, rows, cols) (an image set: a list of uint16 (rows, cols))."""
        response = self._call("GET", "/masks", "get masks")
        return self._as_result(wire.decode_array(response.headers, response.content))

    def frame_masks(self, frame: int) -> dict:
        """Every object's current mask on one frame: {obj_id: bool (rows, cols)}."""
        frame = as_integer(frame, "frame")
        data = self._call("GET", f"/frames/{frame}", "get frame").json()["masks"]
        for obj, enc in data.items():
            self._mirror.keep(int(obj), frame, enc)
        return {int(obj): self._decode(enc) for obj, enc in data.items()}

    def review(self, obj_id: int | None = None) -> list[dict]:
        """The session's review records, as a local session's `review()` returns them."""
        params = {} if obj_id is None else {"obj_id": as_obj_id(obj_id)}
        return self._call("GET", "/review", "review", params=params).json()["records"]

    def prepare(self, frame: int) -> bool:
        """Make a click on `frame` cheap (the server computes its memory-conditioned features now).
        False when the server was busy with real work and did nothing (nothing is lost: a click
        then simply computes them itself)."""
        data = self._call("POST", "/prepare", "prepare", json={"frame": as_integer(frame, "frame")}).json()
        return bool(data["prepared"])

    def propagate(self, direction: str = "both", start: int | None = None, stop=None,
                  cancel: threading.Event | None = None, axes: str | None = None, packed: bool = False,
                  until: str | None = None):
        """Generator of (frame, {obj_id: bool mask}) as the server finishes frames.

        Arguments are checked at the call (as locally); frames come as they finish. cancel: a
        threading.Event; once set, no further frame is yielded and the server stops within one
        frame (breaking out of the loop, or closing the generator, does the same). axes="all":
        the fused run of all three axes, yielding what a local session yields ((FusionProgress,
        {}) items while the three runs go on, then every fused frame). until: as locally; where and
        why each direction stopped is `last_propagation` once the stream has ended.
        """
        payload = {"direction": direction,
                   "start": None if start is None else as_integer(start, "start"),
                   "stop": None if stop is None else (
                       [as_integer(v, "stop") for v in stop] if isinstance(stop, (tuple, list, np.ndarray))
                       else as_integer(stop, "stop"))}
        if axes is not None:
            payload["axes"] = axes
        if until is not None:
            payload["until"] = until
        action = Action(PROPAGATE, payload, completed=False)
        response = self._perform(action)
        items = self._follow(response, cancel, action, packed)
        weakref.finalize(items, response.close)  # a generator dropped unstarted still frees its connection
        return items

    def _follow(self, response, cancel, action: Action, packed: bool = False):
        """The caller's items, counted on the action (a replay stops where the caller did)."""
        lines = read_propagation(response, self.model.url, cancel, lambda line: self._decode_line(line, packed),
                                 self._cancel_remote, on_end=self._keep_report)
        try:
            while True:
                try:
                    item = next(lines)
                except StopIteration as end:
                    action.completed = bool(end.value)
                    return
                action.seen += 1
                yield item
        finally:
            lines.close()

    def close(self) -> None:
        """Free the server session (its GPU memory); the object is unusable afterwards."""
        if self.id is None:
            return
        try:
            self.model.request("DELETE", self._path(), what="close session", ok=(204, 404))
        except MedSAM2Error as exc:
            log.warning("closing remote session failed: %s", exc)
        self.id = None

    # -- actions: sent once, recorded, replayed after a re-open --------------------------------
    def _perform(self, action: Action):
        """Send an action; if the server lost the session, re-open it (replaying the history) and
        send it again. Then record it."""
        with self._lock:
            try:
                result = self._send(action)
            except SessionExpired as exc:
                if not self.model.auto_reopen:
                    raise
                self._reopen(str(exc))
                result = self._send(action)
            self._history.append(action)
            return result

    def _send(self, action: Action):
        args = action.args
        if action.kind == ADD_PROMPT:
            data = self._request("POST", "/prompts", "add prompt", json=args).json()
            self._obj_ids = [int(o) for o in data["obj_ids"]]
            self._mirror.keep(data["obj_id"], data["frame"], data["mask"])
            return data["mask"]
        if action.kind == PROPAGATE:
            return self.model.open_stream(self._path("/propagate"), args, "propagate")
        if action.kind == CLEAR_PROMPTS:
            data = self._request("DELETE", "/prompts", "clear prompts", params=args).json()
            self._mirror.forget(args["obj_id"])
        elif action.kind == REMOVE_OBJECT:
            data = self._request("DELETE", f"/objects/{args['obj_id']}", "remove object").json()
            self._mirror.forget(args["obj_id"])
        elif action.kind == RESET:
            data = self._request("POST", "/reset", "reset").json()
            self._mirror.clear()
        else:
            raise AssertionError(f"unknown action {action.kind!r}")
        self._obj_ids = [int(o) for o in data["obj_ids"]]
        return None

    def _replay(self, action: Action) -> None:
        result = self._send(action)
        if action.kind != PROPAGATE:
            return
        lines = read_propagation(result, self.model.url, None, self._decode_line, self._cancel_remote)
        received = 0
        try:
            for _ in lines:
                received += 1
                if not action.completed and received >= action.seen:
                    self._cancel_remote()  # stop where the caller stopped
                    break
        finally:
            lines.close()

    def reopen(self) -> int:
        """Open a new server session on the same volume and replay the action history in order
        (prompts, clears, removals, propagations); -> the number of prompts replayed."""
        with self._lock:
            self._start(self._open_on_server())
            for action in self._history:
                if action.replayable():
                    self._replay(action)
            self.reopened += 1
            return self._history.counts()[ADD_PROMPT]

    def _reopen(self, reason: str) -> None:
        self.reopen()
        counts = self._history.counts()
        message = (f"MedSAM2 server session expired ({reason}); re-opened it as {self.id[:8]}… and replayed "
                   f"{counts[ADD_PROMPT]} prompt(s) and {counts[PROPAGATE]} propagation(s)")
        log.warning(message)
        warnings.warn(message, SessionReopened, stacklevel=5)
        if self.on_reopen is not None:
            self.on_reopen(message)

    # -- plumbing -----------------------------------------------------------------------------
    def _path(self, tail: str = "") -> str:
        return f"/v1/sessions/{self.id}{tail}"

    def _request(self, method: str, tail: str, what: str, **kwargs) -> httpx.Response:
        return self.model.request(method, self._path(tail), what=what, **kwargs)

    def _call(self, method: str, tail: str, what: str, **kwargs) -> httpx.Response:
        """A read on this session; re-open and retry once if the server forgot it."""
        try:
            return self._request(method, tail, what, **kwargs)
        except SessionExpired as exc:
            if not self.model.auto_reopen:
                raise
            with self._lock:
                self._reopen(str(exc))
            return self._request(method, tail, what, **kwargs)

    def _decode(self, encoded: dict, packed: bool = False):
        if packed:
            return wire.decode_packed(encoded, self._mask_shape)
        return wire.decode_mask(encoded, self._mask_shape)

    def _decode_line(self, line: dict, packed: bool = False) -> tuple:
        if line["type"] == "progress":
            from ..tracking.fusion import FusionProgress  # numpy only; loaded when a fused run is asked for

            return FusionProgress(int(line["axis"]), int(line["frame"]), int(line["done"]), int(line["total"])), {}
        frame = int(line["frame"])
        return frame, {int(obj): self._decode(self._mirror.resolve(int(obj), frame, enc, self._fetch_frame), packed)
                       for obj, enc in line["masks"].items()}

    def _keep_report(self, end_line: dict) -> None:
        report = end_line.get("report")
        if report is not None:
            from ..tracking.refine import PropagationReport  # numpy only

            self.last_propagation = PropagationReport.from_dict(report)

    def _fetch_frame(self, frame: int) -> dict:
        return self._request("GET", f"/frames/{frame}", "get frame").json()["masks"]

    def _cancel_remote(self) -> None:
        try:  # best effort: closing the stream also stops the server
            self.model._http.post(self._path("/propagate/cancel"), timeout=5.0)
        except httpx.HTTPError:
            pass

    def _as_result(self, arr: np.ndarray):
        return list(arr) if self.is_image_set else arr
