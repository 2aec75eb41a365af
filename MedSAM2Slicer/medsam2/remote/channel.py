"""Framed messages between an application and its engine agent process (see agent.py).

A message is a JSON header and an optional binary payload (arrays, packed masks):

    !II (header length, payload length) | header (UTF-8 JSON) | payload

Standard library and numpy only: the application side (e.g. inside 3D Slicer) reads these
without blocking, the agent with plain blocking sockets. Arrays travel raw (dtype and shape in the
header), masks as packed bits (medsam2.masks.PackedMask), prompts in their JSON form
(medsam2.prompt).
"""

from __future__ import annotations

import json
import struct
from collections import deque
from typing import Iterator

import numpy as np

from ..errors import InputError
from ..masks import PackedMask

PREFIX = struct.Struct("!II")
MAX_HEADER = 16 << 20  # a header holds a prompt's points at most; larger means a broken stream
KEY_ENV = "MEDSAM2_AGENT_KEY"  # the shared secret the agent proves it was started by us


class ChannelError(Exception):
    """The byte stream is not a sequence of our messages (a bug or a stranger on the port)."""


def frame_head(header: dict, payload_len: int) -> bytes:
    """The bytes before a message's payload: the length prefix and the JSON header."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return PREFIX.pack(len(head), payload_len) + head


def encode(header: dict, payload: bytes | memoryview = b"") -> list:
    """One message as a list of byte chunks (the payload is not copied)."""
    return [frame_head(header, len(payload)), payload]


class MessageReader:
    """Turns received bytes, in pieces of any size, into (header, payload) messages."""

    def __init__(self):
        self._buffer = bytearray()
        self._ready: deque = deque()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= PREFIX.size:
            head_len, body_len = PREFIX.unpack_from(self._buffer)
            if head_len > MAX_HEADER:
                raise ChannelError(f"message header of {head_len} bytes: not a MedSAM2 engine stream")
            end = PREFIX.size + head_len + body_len
            if len(self._buffer) < end:
                break
            header = json.loads(bytes(self._buffer[PREFIX.size:PREFIX.size + head_len]))
            payload = bytes(self._buffer[PREFIX.size + head_len:end])
            del self._buffer[:end]
            self._ready.append((header, payload))

    def __iter__(self) -> Iterator[tuple[dict, bytes]]:
        while self._ready:
            yield self._ready.popleft()

    def pending(self) -> int:
        return len(self._ready)

    def pop(self):
        """The oldest complete message, or None."""
        return self._ready.popleft() if self._ready else None


def array_meta(array: np.ndarray) -> dict:
    return {"dtype": array.dtype.str, "shape": list(array.shape)}


def array_from(meta: dict, payload: bytes) -> np.ndarray:
    dtype, shape = np.dtype(meta["dtype"]), tuple(int(s) for s in meta["shape"])
    if int(np.prod(shape)) * dtype.itemsize != len(payload):
        raise ChannelError(f"array of {shape} {dtype} does not match its {len(payload)} payload bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def masks_payload(masks: dict) -> tuple[dict, bytes]:
    """{obj_id: PackedMask} -> header fields and one payload of their bits, in obj order."""
    objs, shape, chunks = [], None, []
    for obj_id, mask in masks.items():
        if shape is None:
            shape = mask.shape
        elif mask.shape != shape:
            raise InputError(f"masks of one frame differ in shape: {shape} and {mask.shape}")
        objs.append(int(obj_id))
        chunks.append(mask.bits)
    return {"objs": objs, "shape": list(shape or ())}, b"".join(chunks)


def masks_from(fields: dict, payload: bytes) -> dict:
    """The inverse of masks_payload: {obj_id: PackedMask}, unpacked by whoever uses the pixels."""
    objs, shape = fields["objs"], tuple(fields["shape"])
    if not objs:
        return {}
    size = len(payload) // len(objs)
    return {obj: PackedMask(shape, payload[i * size:(i + 1) * size]) for i, obj in enumerate(objs)}
