"""`/v1/sessions/{id}/propagate`: frames streamed as NDJSON lines as they finish.

Lines: {"type": "wait", "waiting": n} every HEARTBEAT_S while nothing else is said (queued for the
GPU, or a long frame); {"type": "progress", "axis", "frame", "done", "total"} for each frame
finished on any axis of a fused run (axes="all"); {"type": "frame", "frame": f, "index": i,
"masks": {obj_id: mask | {"same": digest}}} for each finished frame; then {"type": "end",
"frames": n, "cancelled": bool, "report": where and why each direction stopped
(PropagationReport.as_dict)}, or {"type": "error", "status": s, "error": kind, "message": text}.
A disconnect or `.../propagate/cancel` stops the engine within one frame and frees the GPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from ...errors import InputError
from ...tracking.fusion import FusionProgress
from .. import wire
from .errors import ApiError, ServerErrorRoute, crash_body, engine_errors, input_error
from .schemas import PropagateRequest
from .state import OpenSession, ServerState, state_of

log = logging.getLogger("medsam2.remote.server")

router = APIRouter(tags=["propagation"], route_class=ServerErrorRoute)

SESSION_WAIT_S = 10.0  # how long a propagate waits for its session's previous call before 409
HEARTBEAT_S = 1.0  # a "wait" line this often keeps clients' read timeouts and progress bars alive


@router.post("/sessions/{sid}/propagate/cancel", summary="stop this session's propagation")
def cancel_propagation(sid: str, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        cancel = sess.cancel
        running = cancel is not None and not cancel.is_set()
        if cancel is not None:
            cancel.set()
        return {"cancelled": running}


@router.post(
    "/sessions/{sid}/propagate", summary="propagate; streams NDJSON lines as frames finish",
    response_description="application/x-ndjson: wait, progress and frame lines, then an end or error line "
                         "(see docs/remote.md)",
)
async def propagate(sid: str, req: PropagateRequest, request: Request, state: ServerState = Depends(state_of)):
    # The engine checks the arguments now, so bad ones get a plain 400 before the stream starts
    # (as locally: an error at the call, not at the first frame).
    run = await run_in_threadpool(PropagationRun.start, state, sid, req, asyncio.get_running_loop())
    return StreamingResponse(run.lines(request), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


class PropagationRun:
    """One propagation: the engine's generator driven on its own thread, its items as lines.

    The thread owns the session's lock (taken by `start`) and its busy mark until it ends, so the
    session is released even if the response stream never starts.
    """

    def __init__(self, state: ServerState, sess: OpenSession, items, cancel: threading.Event, loop):
        self.state, self.sess, self.items, self.cancel = state, sess, items, cancel
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.frames = 0

    @classmethod
    def start(cls, state: ServerState, sid: str, req: PropagateRequest, loop) -> "PropagationRun":
        sess = state.sessions.checkout(sid)
        try:
            if not sess.lock.acquire(timeout=SESSION_WAIT_S):
                raise ApiError(409, "busy", f"session {sid} is busy (another propagation is running on it); "
                                            f"cancel that one first, or retry")
            try:
                cancel = threading.Event()
                stop = tuple(req.stop) if isinstance(req.stop, (list, tuple)) else req.stop
                extra = {} if req.axes is None else {"axes": req.axes}
                if req.until is not None:
                    extra["until"] = req.until
                with engine_errors():
                    items = sess.engine.propagate(direction=req.direction, start=req.start, stop=stop,
                                                  cancel=cancel, **extra)
            except BaseException:
                sess.lock.release()
                raise
        except BaseException:
            state.sessions.checkin(sess)
            raise
        run = cls(state, sess, items, cancel, loop)
        threading.Thread(target=run._work, name=f"medsam2-propagate-{sid[:6]}", daemon=True).start()
        return run

    def _put(self, line: dict | None) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, line)

    def _work(self) -> None:
        sess, state, cancel = self.sess, self.state, self.cancel
        cancelled = False
        try:
            try:
                sess.cancel = cancel  # for .../propagate/cancel
                if not state.gpu.acquire(cancel=cancel):  # queued, and the client left
                    cancelled = True
                    return
                try:
                    for frame, masks in self.items:
                        sess.touch()
                        self._put(self._line(frame, masks))
                        if cancel.is_set():
                            break
                finally:
                    self.items.close()
                    cancelled = cancel.is_set()
                    state.gpu.release()
            finally:
                sess.cancel = None
                sess.lock.release()
            report = getattr(sess.engine, "last_propagation", None)
            self._put({"type": "end", "frames": self.frames, "cancelled": cancelled,
                       **({} if report is None else {"report": report.as_dict()})})
        except InputError as exc:
            self._put({"type": "error", "status": 400, **input_error(exc).body()})
        except Exception as exc:  # the stream is already 200: report in-band
            log.exception("propagation failed in session %s", sess.id[:8])
            self._put({"type": "error", "status": 500, **crash_body(exc)})
        finally:
            state.count("propagations")
            state.count("propagations_cancelled", int(cancelled))
            state.sessions.checkin(sess)
            self._put(None)

    def _line(self, frame, masks) -> dict:
        if isinstance(frame, FusionProgress):  # a fused run: a frame finished on one axis, no masks yet
            return {"type": "progress", "axis": frame.axis, "frame": frame.frame, "done": frame.done,
                    "total": frame.total}
        frame = int(frame)
        out = {}
        for obj, mask in masks.items():
            packed, digest = wire.mask_bits(mask)
            sent = self.sess.sent[int(obj)]
            if sent.get(frame) == digest:  # the client has exactly this mask: say so in a few bytes
                out[str(obj)] = {"same": digest}
            else:
                sent[frame] = digest
                out[str(obj)] = wire.encode_mask(mask, packed)
        line = {"type": "frame", "frame": frame, "index": self.frames, "masks": out}
        self.frames += 1
        self.state.count("frames_propagated")
        return line

    async def lines(self, request: Request):
        try:
            while True:
                try:
                    line = await asyncio.wait_for(self._queue.get(), timeout=HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield json.dumps({"type": "wait", "waiting": self.state.gpu.waiting()}) + "\n"
                    continue
                if line is None:
                    return
                yield json.dumps(line) + "\n"
                # Starlette cancels this generator on disconnect under ASGI spec < 2.4; this
                # check keeps a server that only drops writes (spec 2.4) from running on.
                if await request.is_disconnected():
                    return
        finally:
            # Finished, or the client went away: either way the worker stops within one frame.
            self.cancel.set()
