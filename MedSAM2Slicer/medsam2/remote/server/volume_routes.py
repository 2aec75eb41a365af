"""`/v1/volumes/{sha256}`: a volume is uploaded once, addressed by its content digest.

An upload is refused on its headers before any body is read (bad header 400; too large, or a
side past the geometry limit, 413; too many uploads at once 503). The body's buffer grows as
bytes arrive and is dropped when the client goes away. Decompression, hashing and the NaN scan
run on worker threads, so the event loop (health checks, other clients) keeps answering.
"""

from __future__ import annotations

import logging
import re

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ...errors import InputError
from .. import wire
from .errors import ApiError, ServerErrorRoute, input_error, too_large
from .schemas import ApiErrorBody, VolumeInfo
from .state import ServerState, state_of

log = logging.getLogger("medsam2.remote.server")

router = APIRouter(tags=["volumes"], route_class=ServerErrorRoute)

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
CLOSE = {"Connection": "close"}  # an early refusal: the client should stop sending
FEED_BYTES = 1 << 20  # body bytes handed to a worker thread at a time
UPLOAD_RETRY_S = 1

_UPLOAD_OPENAPI = {
    "parameters": [
        {"name": wire.DTYPE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
         "description": "numpy dtype string of the array, e.g. <i2, <f4, |b1"},
        {"name": wire.SHAPE_HEADER, "in": "header", "required": True, "schema": {"type": "string"},
         "description": "slices,rows,cols"},
        {"name": wire.CODEC_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
         "description": "zstd (default) or raw"},
        {"name": wire.PACKED_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
         "description": "1: a bool array sent as packed bits"},
    ],
    "requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}},
}


def check_digest(digest: str) -> None:
    if not DIGEST_RE.match(digest):
        raise ApiError(400, "input", f"bad volume digest {digest[:80]!r}: expected 64 lowercase hex digits (sha256)")


@router.head("/volumes/{digest}", summary="is this volume already here? (200/404)")
@router.get("/volumes/{digest}", response_model=VolumeInfo, summary="an uploaded volume's header")
async def volume_info(digest: str, state: ServerState = Depends(state_of)):
    check_digest(digest)
    vol = state.volumes.get(digest)
    if vol is None:
        raise ApiError(404, "volume_unknown", f"volume {digest} is not on the server; upload it")
    return vol.info()


@router.put(
    "/volumes/{digest}", status_code=201, response_model=VolumeInfo,
    summary="upload a volume (zstd-compressed raw C-order bytes; dtype and shape in headers)",
    responses={413: {"model": ApiErrorBody, "description": "larger than the server's limits"},
               503: {"model": ApiErrorBody, "description": "too many uploads at once; see Retry-After"}},
    openapi_extra=_UPLOAD_OPENAPI,
)
async def upload_volume(digest: str, request: Request, state: ServerState = Depends(state_of)):
    check_digest(digest)
    vol = state.volumes.get(digest)
    if vol is not None:
        return JSONResponse(vol.info(), 200, headers=CLOSE)
    header = declared_array(request, state)
    if not state.uploads.take():
        state.count("uploads_refused")
        raise ApiError(503, "busy", f"the server is receiving {state.uploads.limit} uploads already (its limit); "
                                    f"retry in {UPLOAD_RETRY_S} s", headers={"Retry-After": str(UPLOAD_RETRY_S), **CLOSE})
    try:
        array = await receive_body(request, header, state)
    except ClientDisconnect:  # the buffer goes with the decoder; nobody is left to answer
        state.count("uploads_abandoned")
        return Response(status_code=400)
    finally:
        state.uploads.give_back()
    got = await run_in_threadpool(wire.volume_digest, array)
    if got != digest:
        raise ApiError(400, "input", f"body does not match its digest: the URL says {digest}, the bytes hash to "
                                     f"{got}; dtype, shape or data differ from what the client hashed")
    problem = await run_in_threadpool(nan_problem, array)
    if problem:
        raise ApiError(400, "input", problem, exception="InputError")
    vol = state.volumes.put(digest, array, state.sessions.volumes_in_use())
    state.count("uploads")
    log.info("stored volume %s… %s %s", digest[:12], header.dtype.str, list(header.shape))
    return JSONResponse(vol.info(), 201)


def declared_array(request: Request, state: ServerState) -> wire.ArrayHeader:
    """The upload's headers, checked against the limits before a byte of body is read."""
    try:
        header = wire.ArrayHeader.from_headers(request.headers)
    except InputError as exc:
        raise input_error(exc, headers=CLOSE) from None
    state.limits.check_volume(header.shape, header.array_bytes, headers=CLOSE)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > header.wire_limit:
        if int(length) > state.limits.max_upload_bytes:
            raise too_large(int(length), state.limits.max_upload_bytes, "upload", headers=CLOSE)
        raise ApiError(400, "input", f"body of {length} bytes is longer than its header says "
                                     f"({header.describe()})", headers=CLOSE)
    return header


async def receive_body(request: Request, header: wire.ArrayHeader, state: ServerState) -> np.ndarray:
    """Decode the body as it arrives, counting bytes (a missing or lying Content-Length)."""
    limit = state.limits.max_upload_bytes
    decoder = wire.StreamDecoder(header)
    batch, batched = [], 0
    try:
        async for chunk in request.stream():
            received = decoder.received + batched + len(chunk)
            if received > limit:
                raise too_large(received, limit, "upload", headers=CLOSE)
            if received > header.wire_limit:
                raise ApiError(400, "input", f"body is longer than its header says ({header.describe()})",
                               headers=CLOSE)
            batch.append(chunk)
            batched += len(chunk)
            if batched >= FEED_BYTES:
                await run_in_threadpool(decoder.feed, b"".join(batch))
                batch, batched = [], 0
        if batch:
            await run_in_threadpool(decoder.feed, b"".join(batch))
        return await run_in_threadpool(decoder.finish)
    except InputError as exc:
        raise input_error(exc, headers=CLOSE) from None


def nan_problem(array: np.ndarray) -> str | None:
    """Why a float volume with NaN cannot be segmented (None if it has none). Slice by slice, so
    the scan needs one slice of scratch memory, not several volumes of it."""
    if array.dtype.kind != "f":
        return None
    count, first = 0, None
    for k in range(array.shape[0]):
        bad = np.isnan(array[k])
        n = int(np.count_nonzero(bad))
        if n:
            count += n
            if first is None:
                first = (k, *(int(v) for v in np.unravel_index(int(np.argmax(bad)), bad.shape)))
    if not count:
        return None
    return (f"volume contains {count} NaN voxels (first at slice {first[0]}, row {first[1]}, col {first[2]}); "
            f"replace them before segmenting")
