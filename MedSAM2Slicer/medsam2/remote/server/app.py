"""Remote GPU server: the engine's session interface over HTTP (FastAPI + uvicorn).

One process serves one model on one device to several clients. The API lives under `/v1` and
is documented at `/docs` (OpenAPI). Its shape:

- `GET /v1/health` (no token): is the process up. `GET /v1/info`: version, model, device, limits,
  free sessions.
- `HEAD|PUT /v1/volumes/{sha256}`: a volume is uploaded once, addressed by its content digest
  (`medsam2.remote.wire.volume_digest`); re-opening the same volume skips the upload.
- `POST /v1/sessions` opens an engine session on an uploaded volume (or on its slices as
  independent 2D images); `DELETE` closes it. Sessions idle longer than the TTL are freed; at
  most `max_sessions` are open (429 + Retry-After).
- `POST /v1/sessions/{id}/prompts` adds a prompt and returns that frame's mask.
- `POST /v1/sessions/{id}/propagate` streams NDJSON: one line per finished frame (masks as
  compressed packed bits, or "same" when the client already has that exact mask), progress lines
  of a fused run, heartbeats while waiting for the GPU, then an end line. A disconnect or
  `.../propagate/cancel` stops the work within one frame and frees the GPU.

Every engine call runs under one FIFO GPU lock (one device, one job at a time, in arrival
order) and the session's own lock. Errors are JSON `{"error": kind, "message": text}`; the
user's mistakes are 400 (with the engine's own message) or 422, limits 413/429/503, and an
engine failure is a 500 with its traceback in the log. The token (Bearer) is compared in
constant time and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc

from fastapi import APIRouter, Depends, FastAPI
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from ... import __version__
from . import propagation_routes, session_routes, volume_routes
from .errors import ServerErrorRoute, install_handlers
from .gate import AuthGate, install_access_log_filter
from .limits import Limits
from .schemas import ERROR_RESPONSES
from .state import ServerState, state_of

API_VERSION = 1

server_router = APIRouter(tags=["server"], route_class=ServerErrorRoute)


def create_app(model, token: str | None = None, limits: Limits | None = None, **overrides) -> FastAPI:
    """Build the FastAPI app serving `model` (a `medsam2.load_model` result).

    token: clients must send `Authorization: Bearer <token>`; None = no auth (loopback use).
    limits: the server's Limits; keyword overrides of its fields (max_sessions=, session_ttl=,
    max_upload_mb=, max_uploads=, max_side=, max_points=, max_objects=) apply on top.
    """
    limits = dataclasses.replace(limits or Limits(), **overrides)
    state = ServerState(model, limits)
    app = FastAPI(title="MedSAM2 remote engine", version=__version__, description=__doc__,
                  lifespan=_lifespan(state))
    app.state.medsam2 = state
    app.add_middleware(AuthGate, state=state, token=token)
    install_handlers(app)
    app.add_api_route("/", root, include_in_schema=False)
    app.add_api_route("/v1/health", health, tags=["server"], summary="liveness (no token needed)")
    # The bearer scheme is declared for the OpenAPI page's "Authorize" button; the gate checks it.
    secured = [Depends(HTTPBearer(auto_error=False))]
    for router in (server_router, volume_routes.router, session_routes.router, propagation_routes.router):
        app.include_router(router, prefix="/v1", dependencies=secured, responses=ERROR_RESPONSES)
    return app


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        install_access_log_filter()  # after uvicorn has configured its loggers
        # The model, torch and the app are a few hundred thousand long-lived objects: a full
        # garbage collection walking them takes ~0.2 s, with the GIL held, on whichever thread
        # triggers it, and the event loop waits. Frozen, later collections skip them.
        gc.collect()
        gc.freeze()
        reaper = asyncio.create_task(_reap_forever(state))
        try:
            yield
        finally:
            reaper.cancel()
            state.shutdown()  # stop running propagations so their threads let go of the GPU

    return lifespan


async def _reap_forever(state: ServerState) -> None:
    period = min(30.0, max(0.5, state.limits.session_ttl / 4))
    while True:
        await asyncio.sleep(period)
        await run_in_threadpool(state.reap)  # freeing an engine may wait for it: off the event loop


async def root():
    return {"service": "medsam2", "version": __version__, "api": "/v1", "docs": "/docs"}


async def health():
    return {"status": "ok", "version": __version__}


@server_router.get("/info", summary="version, model, device, limits, free sessions")
async def info(state: ServerState = Depends(state_of)):
    model, limits = state.model, state.limits
    return {
        "version": __version__,
        "api": API_VERSION,
        "instance": state.instance,
        "model": getattr(model, "name", None),
        "image_size": getattr(model, "image_size", None),
        "device": str(getattr(model, "device", "")),
        "weights_are_random": bool(getattr(model, "weights_are_random", False)),
        "sessions": {"open": len(state.sessions), "max": limits.max_sessions, "free": state.sessions.free()},
        "session_ttl": limits.session_ttl,
        "max_upload_mb": limits.max_upload_mb,
        "limits": limits.as_dict(),
        "uploads": {"receiving": state.uploads.in_flight, "max": limits.max_uploads},
        "volumes": len(state.volumes),
        "gpu_busy": state.gpu.locked(),
        "gpu_waiting": state.gpu.waiting(),
        "stats": state.counters(),
    }


def run(model, host: str = "127.0.0.1", port: int = 8765, token: str | None = None, log_level: str = "info",
        **limits) -> None:
    """Serve `model` with uvicorn until interrupted; `limits` as for create_app."""
    import uvicorn

    app = create_app(model, token=token, **limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
