"""Reading a propagation stream (NDJSON lines, see server/propagation_routes.py) on the client."""

from __future__ import annotations

import json
import threading
from typing import Callable, Generator

import httpx

from ..errors import ServerError
from .http_errors import error_from_line

LINE_TIMEOUT_S = 120.0  # the server sends a line at least every second while a stream is open


def read_propagation(response: httpx.Response, url: str, cancel: threading.Event | None,
                     decode_line: Callable[[dict], tuple], cancel_remote: Callable[[], None],
                     on_end: Callable[[dict], None] | None = None) -> Generator:
    """Yield decode_line(line) for every frame or progress line as it arrives; on_end(end line).

    Returns (as the generator's value) True when the server said the run finished, False when
    `cancel` stopped it: once set, nothing more is yielded and the server is told to stop.
    Closing the generator early closes the connection, which stops the server too.
    """
    try:
        for text in response.iter_lines():
            if cancel is not None and cancel.is_set():
                cancel_remote()
                return False
            if not text:
                continue
            line = json.loads(text)
            kind = line.get("type")
            if kind in ("frame", "progress"):
                yield decode_line(line)
                if cancel is not None and cancel.is_set():  # set while the caller held the item
                    cancel_remote()
                    return False
            elif kind == "end":
                if on_end is not None:
                    on_end(line)
                return not line.get("cancelled", False)
            elif kind == "error":
                raise error_from_line(line, "propagate")
            # "wait": a heartbeat while queued behind another client's work
        raise ServerError("propagate: the stream ended before the server said it was done "
                          "(server stopped or connection lost)")
    except httpx.TimeoutException:
        raise ServerError(f"propagate: no line from {url} for {LINE_TIMEOUT_S:g} s") from None
    except httpx.TransportError as exc:
        raise ServerError(f"propagate: connection to {url} failed ({exc})") from None
    finally:
        response.close()  # before the end (cancel, break): the server sees the disconnect
