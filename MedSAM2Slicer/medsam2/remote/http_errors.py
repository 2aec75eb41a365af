"""A refusal from the server -> the exception a local call would have raised (or ServerError).

The server's errors are JSON {"error": kind, "message": text} in an HTTP response, or the same
fields in an error line of a propagation stream; both go through `error_from`.
"""

from __future__ import annotations

from typing import Mapping

from ..errors import InputError, MedSAM2Error, ServerError, SessionExpired

EXPIRED_KINDS = ("session_expired", "session_unknown")
INPUT_KINDS = ("input", "invalid_request")


def error_from(status: int, body: Mapping | None, text: str, headers: Mapping, what: str) -> MedSAM2Error:
    """status, parsed JSON body (None if it was not JSON), raw text, headers -> the exception."""
    if isinstance(body, Mapping):
        kind, message = str(body.get("error", "")), str(body.get("message") or text)
    else:
        kind, message = "", text[:500]
    if status == 404 and kind in EXPIRED_KINDS:
        return SessionExpired(message)
    if status in (400, 422) and kind in INPUT_KINDS:
        return InputError(message)  # the engine's own message, as a local call raises it
    if status == 401:
        err = ServerError(f"{what}: the server refused the token (401): pass the server's token to "
                          f"medsam2.connect(url, token=...)")
    elif status in (429, 503):
        err = ServerError(f"{what}: {message}")
        retry = headers.get("Retry-After")
        err.retry_after = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
    else:
        err = ServerError(f"{what}: server answered {status}: {message}")
    err.status = status
    err.kind = kind
    return err


def error_from_response(response, what: str) -> MedSAM2Error:
    """An httpx response with an error status -> the exception."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return error_from(response.status_code, body, response.text, response.headers, what)


def error_from_line(line: Mapping, what: str) -> MedSAM2Error:
    """An {"type": "error", ...} line of a propagation stream -> the exception."""
    return error_from(int(line.get("status", 500)), line, str(line.get("message", "")), {}, what)
