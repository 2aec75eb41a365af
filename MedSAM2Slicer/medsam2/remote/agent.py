"""The engine agent: a child process that runs the engine for an application that must not block.

An application whose main thread must stay responsive (3D Slicer keeps Python's GIL on its main
thread, so its Python threads starve) starts this process, and talks to it over one loopback
socket in framed messages (channel.py), reading replies without blocking. The agent holds an
engine and calls its sessions directly:

- local: the model loaded in this process (`medsam2.load_model`); the agent opens no socket of
  its own, it only connects to its parent;
- remote: the client of a `medsam2 serve` server (`medsam2.connect`), whose sessions offer the
  same calls.

So local and remote are one code path. Prompts arrive in their one JSON form (medsam2.prompt);
masks leave packed, once (a remote client's packed masks are passed on without unpacking). The
agent exits when its parent's socket closes (the parent exited or was killed) or when asked to;
it never outlives the application.

    python -m medsam2.remote.agent --connect 127.0.0.1:PORT      (key in $MEDSAM2_AGENT_KEY)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import socket
import sys
import threading
import time
import warnings
from typing import Callable

import numpy as np

from ..errors import Cancelled, MedSAM2Error, SetupError
from ..prompt import Prompt, hold_prompts
from . import channel

log = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0
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


class Agent:
    """Executes the application's requests in order on one worker thread; in idle time, the
    latest idle task of each kind (e.g. preparing the slice a view shows)."""

    def __init__(self, link: Link):
        self.link = link
        self.engine = None         # a loaded Model (local) or a RemoteModel (remote): the same session calls
        self.sessions = {}         # handle -> the engine's session
        self.cancels = {}          # request id -> threading.Event
        self.work: queue.Queue = queue.Queue()
        self.idle: dict[str, Callable[[], None]] = {}  # kind -> the newest task of that kind
        self._idle_lock = threading.Lock()
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

    def has_work(self) -> bool:
        """A request is waiting: idle tasks stop at their next step and let it run."""
        return not self.work.empty()

    def set_idle(self, kind: str, task: Callable[[], None] | None) -> None:
        """Run `task` when no request waits; a newer task of the same kind replaces it."""
        with self._idle_lock:
            if task is None:
                self.idle.pop(kind, None)
            else:
                self.idle[kind] = task

    # -- worker thread -------------------------------------------------------------------------
    def _work_loop(self):
        while True:
            try:
                header, payload = self.work.get(timeout=None if not self.idle else 0.0)
            except queue.Empty:
                self._run_idle()
                continue
            if not self._serve(header, payload):
                return

    def _run_idle(self) -> None:
        with self._idle_lock:
            if not self.idle:
                return
            kind = next(iter(self.idle))
            task = self.idle.pop(kind)
        try:
            task()
        except Exception:  # idle work is an optimisation: a failure must not stop the agent
            log.exception("idle task %s failed", kind)

    def _serve(self, header: dict, payload: bytes) -> bool:
        """Run one request and send its reply; False once the application is gone."""
        rid = header.get("id")
        try:
            handler = getattr(self, "op_" + str(header.get("op")), None)
            if handler is None:
                raise ValueError(f"unknown engine request {header.get('op')!r}")
            result = handler(header, payload, self.cancels.get(rid))
            value, body = result if isinstance(result, tuple) else (result, b"")
            self.link.send({"id": rid, "type": "done", "value": value}, body)
        except OSError:
            return False
        except BaseException as exc:  # every failure goes back to the request that caused it
            if not isinstance(exc, MedSAM2Error):
                log.exception("engine request %s failed", header.get("op"))
            try:
                self.link.send({"id": rid, "type": "error", **_error_fields(exc)})
            except OSError:
                return False
        finally:
            self.cancels.pop(rid, None)
        return True

    def op_start(self, header, payload, cancel):
        config = header["config"]
        try:
            import medsam2

            if config.get("mode") == "remote":
                self.engine = medsam2.connect(config["url"], token=config.get("token") or None,
                                              timeout=float(config.get("timeout", 300.0)))
            else:
                self.engine = self._load_model(config, cancel)
        except ImportError as exc:  # the application says how to install; here we say what is missing
            raise SetupError(f"The MedSAM2 engine cannot start: {exc} in {sys.executable}. "
                             "Install MedSAM2's Python packages (the module's Install button, or "
                             "scripts/install.sh), then try again.") from exc
        return {"mode": config.get("mode", "local"), "model": self.engine.name, "image_size": self.engine.image_size,
                "device": str(self.engine.device), "weights_are_random": bool(self.engine.weights_are_random),
                "pid": os.getpid()}

    def _load_model(self, config, cancel):
        """The model, loaded in this process (the checkpoint downloaded first if needed)."""
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
        self._status(f"Model ready: {model.name} at {model.image_size} px on {model.device}")
        return model

    def _status(self, text):
        self.link.send({"type": "status", "text": text})
        log.info(text)

    def session(self, header):
        """The engine session a request names (raises if it is not open)."""
        session = self.sessions.get(header["handle"])
        if session is None:
            raise ValueError(f"engine session {header['handle']} is not open (it failed to open, or was closed)")
        return session

    def op_open(self, header, payload, cancel):
        volume = channel.array_from(header["array"], payload)
        window = tuple(header["window"]) if header.get("window") else None
        if header.get("image_set"):
            session = self.engine.open_images(volume, memory=header["memory"], window=window)
        else:
            session = self.engine.open(volume, memory=header["memory"], window=window)
        self.sessions[header["handle"]] = session
        return {"num_frames": int(session.num_frames), "frame_shape": list(session.frame_shape)}

    def op_set_prompts(self, header, payload, cancel):
        """Make the engine hold exactly these prompts for one object on one frame (replay after
        undo/redo or a restart)."""
        hold_prompts(self.session(header), int(header["frame"]), int(header["obj_id"]),
                     [Prompt.from_json(p) for p in header["prompts"]])
        return {}

    def op_add_prompt(self, header, payload, cancel):
        prompt = Prompt.from_json(header["prompt"])
        mask = self.session(header).add_prompt(**prompt.arguments(), packed=True)
        return {"shape": list(mask.shape)}, mask.bits

    def op_propagate(self, header, payload, cancel):
        session = self.session(header)
        stop = header.get("stop")
        kwargs = {"direction": header["direction"], "start": header.get("start"),
                  "stop": tuple(stop) if isinstance(stop, list) else stop, "cancel": cancel, "packed": True}
        if header.get("axes") == "all":
            kwargs["axes"] = "all"
        if header.get("until"):
            kwargs["until"] = header["until"]
        count = 0
        for frame, masks in session.propagate(**kwargs):
            fields, body = channel.masks_payload(masks)
            # a fused run's progress items carry no masks, and their frame as `.frame`
            self.link.send({"id": header["id"], "type": "item", "frame": int(getattr(frame, "frame", frame)), **fields},
                           body)
            count += 1
        report = getattr(session, "last_propagation", None)  # where and why each direction stopped
        return {"frames": count, "cancelled": bool(cancel is not None and cancel.is_set()),
                **({} if report is None else {"report": report.as_dict()})}

    def op_prepare(self, header, payload, cancel):
        """Prepare a click on a frame (Session.prepare): now, or (the default) in idle time, where it
        yields to every request; the newest frame asked for a session replaces an older one."""
        session, frame = self.session(header), int(header["frame"])
        if header.get("now"):
            session.prepare(frame)
            return {"prepared": True}
        kind = f"prepare {header['handle']}"

        def prepare():
            if not self.has_work():
                session.prepare(frame)
                return
            with self._idle_lock:  # real work came first: try again after it, unless a newer frame was asked
                self.idle.setdefault(kind, prepare)

        self.set_idle(kind, prepare)
        return {"prepared": False}

    def op_review(self, header, payload, cancel):
        obj_id = header.get("obj_id")
        return self.session(header).review(None if obj_id is None else int(obj_id))

    def op_masks(self, header, payload, cancel):
        session = self.session(header)
        obj_id = header.get("obj_id")
        volume = session.masks() if obj_id is None else session.mask(int(obj_id))
        volume = np.ascontiguousarray(volume)
        return {"array": channel.array_meta(volume)}, volume.tobytes()

    def op_close(self, header, payload, cancel):
        self.set_idle(f"prepare {header['handle']}", None)
        session = self.sessions.pop(header["handle"], None)
        if session is not None:
            session.close()
        return {}

    def op_close_all(self, header, payload, cancel):
        """Close every session and free what they held (a scene closed); the model stays loaded."""
        self.idle.clear()
        self.close_sessions()
        gc.collect()  # the feature caches go with their last session
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {}

    def close_sessions(self) -> None:
        sessions, self.sessions = list(self.sessions.values()), {}
        for session in sessions:
            try:
                session.close()
            except Exception:  # best effort: a remote server may be gone
                log.warning("closing an engine session failed", exc_info=True)

    def stop(self):
        self.close_sessions()


def _error_fields(exc: BaseException) -> dict:
    fields = {"kind": type(exc).__name__, "message": str(exc) or type(exc).__name__,
              "medsam2": isinstance(exc, MedSAM2Error), "cancelled": isinstance(exc, Cancelled)}
    if hasattr(exc, "template"):  # CheckpointUnavailable: the application words the way on itself
        fields.update(template=exc.template, model=exc.model)
    return fields


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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a remote engine's requests, one line each: noise
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
