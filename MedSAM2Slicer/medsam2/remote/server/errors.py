"""Error mapping: every refusal is JSON {"error": kind, "message": text}.

Only the user's mistakes are 4xx: an InputError from the engine or a check here (400), a request
that does not fit the schema (422). Anything else the engine raises is a bug of ours: a 500, with
the traceback in the server's log.
"""

from __future__ import annotations

import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...errors import InputError, MedSAM2Error

log = logging.getLogger("medsam2.remote.server")

MIB = 1 << 20


class ApiError(Exception):
    """A refusal with its HTTP status, error kind and message for the client."""

    def __init__(self, status: int, error: str, message: str, headers: dict | None = None,
                 exception: str | None = None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.headers = headers or {}
        self.exception = exception

    def body(self) -> dict:
        return error_body(self.error, self.message, self.exception)


def error_body(error: str, message: str, exception: str | None = None, **extra) -> dict:
    body = {"error": error, "message": message, **extra}
    if exception:
        body["exception"] = exception
    return body


def input_error(exc: InputError, headers: dict | None = None) -> ApiError:
    """The user's mistake -> 400 carrying the engine's own message (the client re-raises InputError)."""
    return ApiError(400, "input", str(exc), headers=headers, exception="InputError")


def too_large(size: int, limit: int, what: str, headers: dict | None = None) -> ApiError:
    return ApiError(413, "too_large", f"{what} of {size / MIB:.1f} MiB exceeds the server's limit of "
                                      f"{limit / MIB:.1f} MiB", headers=headers)


@contextlib.contextmanager
def engine_errors():
    """Engine exceptions as API errors: InputError is a 400 with the engine's message; another
    error of ours (checkpoint, server) a 500 that says what it was. Anything else propagates to
    the 500 handler, which logs its traceback."""
    try:
        yield
    except InputError as exc:
        raise input_error(exc) from None
    except MedSAM2Error as exc:
        log.exception("engine error")
        raise ApiError(500, "server", f"{type(exc).__name__}: {exc}") from None


def crash_body(exc: BaseException) -> dict:
    return error_body("server", f"internal server error: {type(exc).__name__}: {exc}")


class ServerErrorRoute(APIRoute):
    """A route whose unexpected exception becomes a logged 500 answer right where it happens.

    Starlette's last-resort handler answers too, but then re-raises, and the server drops the
    connection: a client's next request on its kept-alive connection would fail as well.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer_errors(request: Request):
            try:
                return await handler(request)
            except (ApiError, InputError, RequestValidationError, StarletteHTTPException):
                raise  # answered by their handlers below
            except Exception as exc:
                log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
                return JSONResponse(crash_body(exc), 500)

        return answer_errors


def describe_validation(errors: list) -> str:
    """FastAPI's validation errors -> one readable sentence."""
    parts = []
    for err in errors[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        if err.get("type") == "json_invalid":
            ctx, where = err.get("ctx") or {}, err.get("loc") or ()
            at = f" at position {where[-1]}" if len(where) > 1 else ""
            parts.append(f"request body is not valid JSON ({ctx.get('error', err.get('msg'))}{at})")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    more = f" (and {len(errors) - 8} more)" if len(errors) > 8 else ""
    return "invalid request: " + "; ".join(parts) + more


async def send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    """A JSON response straight on the ASGI channel (for the gate, before any route runs)."""
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError):
        return JSONResponse(input_error(exc).body(), 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body("invalid_request", describe_validation(exc.errors())), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(kind, f"{request.method} {request.url.path}: {exc.detail}"),
                            exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception):
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(crash_body(exc), 500)
