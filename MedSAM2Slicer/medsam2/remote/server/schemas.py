"""Request and response bodies (these make the OpenAPI page at /docs).

Loose types where the engine validates: its messages are the ones a local caller would see.
Bounds that protect the server (object ids fit the uint16 label map) are stated here.
"""

from __future__ import annotations

from typing import List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, Field

from ..wire import MAX_OBJ_ID
from ...options import AXES

class OpenRequest(BaseModel):
    volume: str = Field(..., description="sha256 content digest of an uploaded volume")
    memory: str = Field("self-sorting", description='"self-sorting" or "sam2"')
    window: Optional[List[float]] = Field(None, description="(low, high) intensity window")
    images: bool = Field(False, description="true: the slices are independent 2D images (one-prompt mode, "
                                            "Model.open_images), not a volume")


class SessionInfo(BaseModel):
    session: str
    num_frames: int
    frame_shape: List[int] = Field(..., description="the engine's frame shape (for an image set: the model's "
                                                    "square canvas, as locally)")
    obj_ids: List[int]
    memory: str
    ttl: float
    image_set: bool = False
    image_shape: List[int] = Field(..., description="(rows, cols) of every mask")


class EncodedMask(BaseModel):
    shape: List[int] = Field(..., description="(rows, cols)")
    bits: str = Field(..., description="base64 of zstd-compressed np.packbits(mask)")
    digest: Optional[str] = None


class PromptRequest(BaseModel):
    frame: int
    obj_id: int = Field(1, le=MAX_OBJ_ID, description=f"object id, 1..{MAX_OBJ_ID} (labels are uint16)")
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
    axes: Optional[Literal[AXES]] = Field(
        None, description='"all": propagate along the three axes of the volume and fuse (progress lines first, '
                          'then every fused frame)')
    until: Optional[str] = Field(
        None, description='"agreement" (default with start: stop each direction where the new masks agree with the '
                          'previous ones) or "conditioning" (run on to the next prompted frame or the end)')


class PrepareRequest(BaseModel):
    frame: int = Field(..., description="the slice a view shows: a click there will run only the prompt "
                                        "encoder and mask decoder")


class PrepareResponse(BaseModel):
    frame: int
    prepared: bool = Field(..., description="false: the session was busy (a propagation runs); nothing was done")


class ReviewRecord(BaseModel):
    """One (frame, object) of Session.review (the flag rule: docs/review.md)."""

    frame: int
    obj_id: int
    confidence: float = Field(..., description="the chosen mask's predicted IoU; 0.0 where the object score says "
                                               "absent")
    object_score: float = Field(..., description="the object-score logit (> 0: present)")
    area: int = Field(..., description="pixels of the kept mask on this frame")
    change: float = Field(..., description="|area - previous slice's area| / max(the two, 1)")
    source: Literal["prompt", "propagated", "refined"]
    flagged: bool
    reason: str = Field(..., description='why it is flagged: "low-confidence", "area-jump", "vanished", '
                                         'comma-separated; empty when not flagged')


class Review(BaseModel):
    records: List[ReviewRecord] = Field(..., description="one per (frame, object) with a result, frames ascending")


class ObjIds(BaseModel):
    obj_ids: List[int]


class VolumeInfo(BaseModel):
    digest: str
    dtype: str
    shape: List[int]


class ApiErrorBody(BaseModel):
    error: str
    message: str


ERROR_RESPONSES = {
    400: {"model": ApiErrorBody, "description": "bad input (the engine's message)"},
    401: {"model": ApiErrorBody, "description": "missing or wrong token"},
    404: {"model": ApiErrorBody, "description": "unknown or expired session / volume"},
    422: {"model": ApiErrorBody, "description": "the request does not fit the schema"},
}
