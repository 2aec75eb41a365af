"""The engine agent: a child process that runs the engine for an application that must not block.

An application whose main thread must stay responsive (3D Slicer keeps Python's GIL on its main
thread, so its Python threads starve) starts this process, and talks to it over one loopback
socket in framed messages (channel.py), reading replies without blocking. The agent does every
engine call through the project's own client (`medsam2.connect`):

- local: it loads the model, serves it with the project's own server (`medsam2 serve`'s app) on
  127.0.0.1, a free port and a random token, in this process, and connects to it;
- remote: it connects to a `medsam2 serve` server at a URL.

So local and remote are one code path. The agent exits when its parent's socket closes (the
parent exited or was killed) or when asked to; it never outlives the application.

    python -m medsam2.remote.agent --connect 127.0.0.1:PORT      (key in $MEDSAM2_AGENT_KEY)
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import secrets
import socket
import sys
import threading
import time
import warnings

import numpy as np

from ..errors import MedSAM2Error
from ..masks import pack_mask, unpack_mask
from . import channel

log = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0
# The loopback server serves one user's application: one session per segment and view axis, kept as
# long as the application runs, and volumes as large as the application holds. A remote server's
# limits protect it from many users; these only keep the process sane.
LOCAL_LIMITS = {"max_sessions": 1024, "session_ttl": 30 * 24 * 3600.0, "max_upload_mb": 65536, "max_side": 16384}
# The engine computes on every core; the application's UI must stay first in line for the CPU
# (its clicks and redraws are short, the engine's work is long), as for any background job.
NICENESS = 5


class Link:
    """The agent's end of the socket: blocking sends under a lock, messages read on one thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()
        self._reader = channel.MessageReader()

    def send(self, header: dict, payload: bytes = b"") -> None:
        with self._lock:
            for chunk in channel.encode(header, payload):
                self.sock.sendall(chunk)

    def receive(self):
        """The next message, or None once the application has closed its end."""
        while True:
            message = self._reader.pop()
            if message is not None:
                return message
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self._reader.feed(data)


class LinkLogHandler(logging.Handler):
    """Log records go to the application's log (e.g. Slicer's), not to a console nobody sees."""

    def __init__(self, link: Link):
        super().__init__(logging.INFO)
        self.link = link

    def emit(self, record):
        try:
            self.link.send({"type": "log", "level": record.levelno, "name": record.name,
                            "message": self.format(record)})
        except OSError:
            pass


def _error_fields(exc: BaseException) -> dict:
    fields = {"kind": type(exc).__name__, "message": str(exc) or type(exc).__name__,
              "medsam2": isinstance(exc, MedSAM2Error)}
    if hasattr(exc, "template"):  # CheckpointUnavailable: the application words the way on itself
        fields.update(template=exc.template, model=exc.model)
    return fields


class Agent:
    """Executes the application's requests in order on one worker thread."""

    def __init__(self, link: Link):
        self.link = link
        self.model = None          # RemoteModel (the client)
        self.server = None         # the in-process uvicorn server, local mode
        self.sessions = {}         # handle -> RemoteSession
        self.cancels = {}          # request id -> threading.Event
        self.work: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self._work_loop, name="medsam2-agent", daemon=True)
        self.worker.start()

    # -- reader thread -------------------------------------------------------------------------
    def dispatch(self, header: dict, payload: bytes) -> bool:
        """Queue one request (cancel acts at once). Returns False on shutdown."""
        op = header.get("op")
        if op == "cancel":
            event = self.cancels.get(header.get("target"))
            if event is not None:
                event.set()
            return True
        if op == "shutdown":
            return False
        if "id" in header:
            self.cancels[header["id"]] = threading.Event()
        self.work.put((header, payload))
        return True

    # -- worker thread -------------------------------------------------------------------------
    def _work_loop(self):
        while True:
            header, payload = self.work.get()
            rid = header.get("id")
            try:
                handler = getattr(self, "op_" + str(header.get("op")), None)
                if handler is None:
                    raise ValueError(f"unknown engine request {header.get('op')!r}")
                result = handler(header, payload, self.cancels.get(rid))
                value, body = result if isinstance(result, tuple) else (result, b"")
                self.link.send({"id": rid, "type": "done", "value": value}, body)
            except OSError:
                return
            except BaseException as exc:  # every failure goes back to the request that caused it
                if not isinstance(exc, MedSAM2Error):
                    log.exception("engine request %s failed", header.get("op"))
                try:
                    self.link.send({"id": rid, "type": "error", **_error_fields(exc)})
                except OSError:
                    return
            finally:
                self.cancels.pop(rid, None)

    def op_start(self, header, payload, cancel):
        config = header["config"]
        import medsam2

        if config.get("mode") == "remote":
            self.model = medsam2.connect(config["url"], token=config.get("token") or None,
                                         timeout=float(config.get("timeout", 300.0)))
        else:
            self.model = self._start_local(config, cancel)
        info = dict(self.model.info)
        info["weights_are_random"] = bool(getattr(self.model, "weights_are_random", False))
        info["pid"] = os.getpid()
        return info

    def _start_local(self, config, cancel):
        """Load the model and serve it on loopback in this process; return a client to it."""
        import medsam2
        from ..models import checkpoints

        def progress(done, total):
            self.link.send({"type": "progress", "stage": "download", "done": int(done), "total": int(total or 0)})

        # the cached, verified file; or a download with progress (cancellable, resumable)
        checkpoint = checkpoints.resolve(config["model"], config.get("checkpoint") or None, progress=False,
                                         cancel=cancel, on_progress=progress)
        self._status("Loading the model")
        with warnings.catch_warnings():  # the random-weights warning is reported as a field instead
            warnings.simplefilter("ignore")
            model = medsam2.load_model(config["model"], checkpoint=checkpoint, device=config.get("device", "auto"),
                                       image_size=config.get("image_size") or None,
                                       precision=config.get("precision", "auto"))
        token = secrets.token_urlsafe(32)
        self.server, url = _serve_on_loopback(model, token)
        self._status(f"Model ready: {model.name} at {model.image_size} px on {model.device}")
        return medsam2.connect(url, token=token)

    def _status(self, text):
        self.link.send({"type": "status", "text": text})
        log.info(text)

    def _session(self, header):
        session = self.sessions.get(header["handle"])
        if session is None:
            raise ValueError(f"engine session {header['handle']} is not open (it failed to open, or was closed)")
        return session

    def op_open(self, header, payload, cancel):
        volume = channel.array_from(header["array"], payload)
        window = tuple(header["window"]) if header.get("window") else None
        if header.get("image_set"):
            session = self.model.open_images(volume, memory=header["memory"], window=window)
        else:
            session = self.model.open(volume, memory=header["memory"], window=window)
        self.sessions[header["handle"]] = session
        return {"num_frames": int(session.num_frames), "frame_shape": list(session.frame_shape)}

    def op_set_prompts(self, header, payload, cancel):
        """Make the engine hold exactly these prompts for one object on one frame (replay after
        undo/redo or a restart): clear the frame's prompts for it, then add each in order."""
        session = self._session(header)
        frame, obj_id = int(header["frame"]), int(header["obj_id"])
        if obj_id in session.obj_ids:
            session.clear_prompts(frame, obj_id)
        for prompt in header["prompts"]:
            session.add_prompt(frame, obj_id=obj_id, **_prompt_kwargs(prompt, payload))
        return {}

    def op_add_prompt(self, header, payload, cancel):
        session = self._session(header)
        mask = session.add_prompt(int(header["frame"]), obj_id=int(header["obj_id"]),
                                  **_prompt_kwargs(header["prompt"], payload))
        mask = np.asarray(mask, dtype=bool)
        return {"shape": list(mask.shape)}, pack_mask(mask).tobytes()

    def op_propagate(self, header, payload, cancel):
        session = self._session(header)
        stop = header.get("stop")
        kwargs = {"direction": header["direction"], "start": header.get("start"),
                  "stop": tuple(stop) if isinstance(stop, list) else stop, "cancel": cancel}
        if header.get("axes") == "all":
            kwargs["axes"] = "all"
        count = 0
        for frame, masks in session.propagate(**kwargs):
            fields, body = channel.masks_payload(masks)
            # a fused run's progress items carry no masks, and their frame as `.frame`
            self.link.send({"id": header["id"], "type": "item", "frame": int(getattr(frame, "frame", frame)), **fields},
                           body)
            count += 1
        return {"frames": count, "cancelled": bool(cancel is not None and cancel.is_set())}

    def op_masks(self, header, payload, cancel):
        session = self._session(header)
        obj_id = header.get("obj_id")
        volume = session.masks() if obj_id is None else session.mask(int(obj_id))
        volume = np.ascontiguousarray(volume)
        return {"array": channel.array_meta(volume)}, volume.tobytes()

    def op_close(self, header, payload, cancel):
        session = self.sessions.pop(header["handle"], None)
        if session is not None:
            session.close()
        return {}

    def stop(self):
        for session in list(self.sessions.values()):
            try:
                session.close()
            except Exception:  # best effort: the process is about to exit
                pass
        if self.server is not None:
            self.server.should_exit = True


def _prompt_kwargs(prompt: dict, payload: bytes) -> dict:
    kw = {}
    if prompt.get("points") is not None:
        kw["points"] = np.asarray(prompt["points"], dtype=float).reshape(-1, 2)
        kw["labels"] = np.asarray(prompt["labels"], dtype=int)
    if prompt.get("box") is not None:
        kw["box"] = np.asarray(prompt["box"], dtype=float)
    if prompt.get("mask") is not None:
        start, end = prompt["mask"]["span"]
        kw["mask"] = unpack_mask(payload[start:end], prompt["mask"]["shape"])
    return kw


def _serve_on_loopback(model, token):
    """Start the project's server for `model` on 127.0.0.1 (a free port) in a daemon thread."""
    import uvicorn

    from .server import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(model, token=token, **LOCAL_LIMITS)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="medsam2-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the engine's loopback server did not start")
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def _watch_parent(parent_pid: int) -> None:
    """Exit if the application disappears without closing the socket (POSIX: we get re-parented)."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent_pid:
            os._exit(3)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsam2.remote.agent", description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="HOST:PORT", help="the application's loopback socket")
    args = parser.parse_args(argv)
    key = os.environ.pop(channel.KEY_ENV, "")
    if hasattr(os, "nice"):
        os.nice(NICENESS)
    host, port = args.connect.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    link = Link(sock)
    link.send({"type": "hello", "key": key, "pid": os.getpid(), "python": sys.version.split()[0]})

    handler = LinkLogHandler(link)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to our own server is noise
    if os.name == "posix":
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="medsam2-parent", daemon=True).start()

    agent = Agent(link)
    try:
        while True:
            message = link.receive()
            if message is None or not agent.dispatch(*message):
                break
    except (OSError, channel.ChannelError) as exc:
        log.warning("engine agent: connection to the application lost (%s)", exc)
    finally:
        root.removeHandler(handler)
        agent.stop()
        try:
            sock.close()
        except OSError:
            pass
    # the worker may be inside an engine call: leave without waiting for it (the OS frees the GPU)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
