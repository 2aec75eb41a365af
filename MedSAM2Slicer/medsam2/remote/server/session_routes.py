"""`/v1/sessions`: open and close engine sessions, prompts, objects and masks.

Each route is a small handler over the server's state: check out the session (404 if it is
unknown or expired), check the request against the limits, run the engine call under the
session's lock and the GPU lock, answer. Runs on worker threads (plain `def`), never on the
event loop.
"""

from __future__ import annotations

import logging
import secrets
from typing import Optional

import numpy as np
from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response

from ...errors import InputError
from ...prompt import Prompt
from .. import wire
from .errors import ApiError, ServerErrorRoute, engine_errors
from .limits import Limits
from .schemas import (ApiErrorBody, ObjIds, OpenRequest, PrepareRequest, PrepareResponse, PromptRequest,
                      PromptResponse, Review, SessionInfo)
from .state import OpenSession, ServerState, close_engine, state_of
from .volume_routes import check_digest

log = logging.getLogger("medsam2.remote.server")

router = APIRouter(route_class=ServerErrorRoute)

OBJ_ID_QUERY = Query(..., le=wire.MAX_OBJ_ID, description=f"object id, 1..{wire.MAX_OBJ_ID}")


@router.post("/sessions", tags=["sessions"], status_code=201, response_model=SessionInfo,
             summary="open a session on an uploaded volume (or on its slices as independent 2D images)",
             responses={429: {"model": ApiErrorBody, "description": "too many sessions; see Retry-After"}})
def open_session(req: OpenRequest, state: ServerState = Depends(state_of)):
    check_digest(req.volume)
    state.reap()
    if not state.sessions.reserve():
        wait = state.sessions.retry_after()
        state.count("sessions_refused")
        raise ApiError(429, "too_many_sessions",
                       f"the server is at its limit of {state.limits.max_sessions} open sessions; retry in {wait} s "
                       f"or close a session you no longer use", headers={"Retry-After": str(wait)})
    sess = None
    try:
        vol = state.volumes.get(req.volume)
        if vol is None:
            raise ApiError(404, "volume_unknown", f"volume {req.volume} is not on the server; upload it first")
        window = tuple(req.window) if req.window is not None else None
        opener = state.model.open_images if req.images else state.model.open
        with engine_errors():  # CPU work only (frames are built lazily): no need to wait for the GPU
            engine = opener(vol.array, memory=req.memory, window=window)
        sess = OpenSession(secrets.token_urlsafe(18), vol, engine, req.memory, window, req.images)
    finally:
        state.sessions.add_reserved(sess)
    state.count("sessions_opened")
    log.info("opened session %s on volume %s…%s", sess.id[:8], vol.digest[:12], " (image set)" if req.images else "")
    return sess.info(state.limits.session_ttl)


@router.get("/sessions/{sid}", tags=["sessions"], response_model=SessionInfo, summary="a session's state")
def session_info(sid: str, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        return sess.info(state.limits.session_ttl)


@router.delete("/sessions/{sid}", tags=["sessions"], status_code=204, summary="close a session and free its memory")
def close_session(sid: str, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        if sess.cancel is not None:
            sess.cancel.set()
        state.sessions.close(sid)
        with sess.lock:
            close_engine(sess.engine)
    return Response(status_code=204)


@router.post("/sessions/{sid}/prompts", tags=["prompts"], response_model=PromptResponse,
             summary="add points / box / mask on one frame for one object; returns that frame's mask")
def add_prompt(sid: str, req: PromptRequest, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        with engine_errors():  # its mask's declared shape is checked before anything is allocated
            prompt = Prompt.from_json(req.model_dump(), mask_shape=sess.mask_shape,
                                      max_points=state.limits.max_points)

        def add():
            check_room_for(sess, req.obj_id, state.limits)
            return sess.engine.add_prompt(**prompt.arguments(), packed=True)

        mask = state.engine_call(sess, add)
        packed, digest = wire.mask_bits(mask)
        sess.sent[req.obj_id][req.frame] = digest
        state.count("prompts")
        return {"frame": req.frame, "obj_id": req.obj_id, "mask": wire.encode_mask(mask, packed),
                "obj_ids": sess.obj_ids()}


@router.post("/sessions/{sid}/prepare", tags=["prompts"], response_model=PrepareResponse,
             summary="make a click on this frame cheap (its memory-conditioned features, computed now)")
def prepare(sid: str, req: PrepareRequest, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        # Preparing yields to real work: with this session busy (a propagation, which changes the
        # memory a preparation would use anyway) or the GPU taken or queued for, nothing is done.
        if state.gpu.locked() or state.gpu.waiting() or not sess.lock.acquire(blocking=False):
            return {"frame": req.frame, "prepared": False}
        try:
            with state.gpu.hold(), engine_errors():
                sess.engine.prepare(req.frame)
        finally:
            sess.touch()
            sess.lock.release()
        return {"frame": req.frame, "prepared": True}


def check_room_for(sess: OpenSession, obj_id: int, limits: Limits) -> None:
    known = sess.engine.obj_ids
    if obj_id not in known and len(known) >= limits.max_objects:
        raise InputError(f"this session has {len(known)} objects, the server's limit: remove one, or open another "
                         f"session for object {obj_id}")


@router.delete("/sessions/{sid}/prompts", tags=["prompts"], response_model=ObjIds,
               summary="clear one object's prompts on one frame")
def clear_prompts(sid: str, frame: int = Query(...), obj_id: int = OBJ_ID_QUERY,
                  state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        state.engine_call(sess, sess.engine.clear_prompts, frame, obj_id)
        sess.sent.pop(obj_id, None)  # its masks may change anywhere: resend them all
        return {"obj_ids": sess.obj_ids()}


@router.delete("/sessions/{sid}/objects/{obj_id}", tags=["prompts"], response_model=ObjIds,
               summary="remove an object and its masks")
def remove_object(sid: str, obj_id: int = Path(..., le=wire.MAX_OBJ_ID), state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        state.engine_call(sess, sess.engine.remove_object, obj_id)
        sess.sent.pop(obj_id, None)
        return {"obj_ids": sess.obj_ids()}


@router.post("/sessions/{sid}/reset", tags=["prompts"], response_model=ObjIds,
             summary="drop every prompt, object and mask (keeps the cached image features)")
def reset(sid: str, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        state.engine_call(sess, sess.engine.reset)
        sess.sent.clear()
        return {"obj_ids": sess.obj_ids()}


@router.get("/sessions/{sid}/masks", tags=["masks"],
            summary="one object's bool mask volume (obj_id given) or the uint16 label volume; binary body in the "
                    "upload format (X-MedSAM2-* headers)")
def masks(sid: str, obj_id: Optional[int] = Query(None, le=wire.MAX_OBJ_ID), state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        if obj_id is None:
            arr = state.engine_call(sess, sess.engine.masks)
        else:
            arr = state.engine_call(sess, sess.engine.mask, obj_id)
        if isinstance(arr, list):  # an image set: one array per image, all of one shape here
            arr = np.stack(arr)
        headers, body = wire.encode_array(np.asarray(arr))
        return Response(body, media_type="application/octet-stream", headers=headers)


@router.get("/sessions/{sid}/frames/{frame}", tags=["masks"],
            summary="every object's mask on one frame (JSON, like a propagation line)")
def frame_masks(sid: str, frame: int, state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        out = {}
        for obj, mask in state.engine_call(sess, sess.engine.frame_masks, frame).items():
            packed, digest = wire.mask_bits(mask)
            sess.sent[int(obj)][frame] = digest
            out[str(obj)] = wire.encode_mask(mask, packed)
        return {"frame": frame, "masks": out}


@router.get("/sessions/{sid}/review", tags=["masks"], response_model=Review,
            summary="per (frame, object) with a result: the decoder's confidence and object score, the mask's area "
                    "and change, its source, and whether the slice is flagged for review")
def review(sid: str, obj_id: Optional[int] = Query(None, le=wire.MAX_OBJ_ID), state: ServerState = Depends(state_of)):
    with state.session(sid) as sess:
        return {"records": state.engine_call(sess, sess.engine.review, obj_id)}
