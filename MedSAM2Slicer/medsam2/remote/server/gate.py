"""The gate in front of every route: the token, the JSON body cap, and what refusals leave in logs.

Runs as pure ASGI middleware, before FastAPI reads a body: a bad token never costs an upload, and
JSON bodies are read here with a cap (the volume upload route counts its own, larger limit). The
token is compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time
from urllib.parse import parse_qsl

from .errors import error_body, send_json, too_large

log = logging.getLogger("medsam2.remote.server")

PUBLIC_PATHS = {"/v1/health"}
UPLOAD_PATH_RE = re.compile(r"^/v1/volumes/[^/]+$")
# the only query parameters the API defines; anything else in a URL is not for the log
LOGGED_QUERY_KEYS = {"frame", "obj_id"}
UNAUTHORIZED_MESSAGE = "missing or wrong token: send the server's token as 'Authorization: Bearer <token>'"


class RateLimitedWarning:
    """At most one warning per `period` seconds; the next one says how many were held back.

    An unauthenticated client must not be able to flood the log with one line per request.
    """

    def __init__(self, logger: logging.Logger, period: float = 60.0):
        self.logger, self.period = logger, float(period)
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def warn(self, fmt: str, *args) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.period:
                self._held += 1
                return
            held, self._held, self._last = self._held, 0, now
        more = f" ({held} more like it in the last {self.period:g} s, not logged)" if held else ""
        self.logger.warning(fmt + "%s", *args, more)


class TokenCheck:
    def __init__(self, token: str | None):
        self._token = token.encode() if token else None

    @property
    def required(self) -> bool:
        return self._token is not None

    def accepts(self, authorization: str | None) -> bool:
        if self._token is None:
            return True
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self._token)


class AuthGate:
    """401 without a valid token, 413 for an oversized JSON body; everything else passes through."""

    def __init__(self, app, state, token: str | None):
        self.app, self.state = app, state
        self.token = TokenCheck(token)
        self.warning = RateLimitedWarning(log)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/v1/") and path not in PUBLIC_PATHS and not self.token.accepts(headers.get("authorization")):
            self.state.count("unauthorized")
            self.warning.warn("401 %s %s: missing or wrong token", method, path)
            return await send_json(send, 401, error_body("unauthorized", UNAUTHORIZED_MESSAGE),
                                   {"WWW-Authenticate": "Bearer", "Connection": "close"})
        if method in ("POST", "PUT", "PATCH") and not (method == "PUT" and UPLOAD_PATH_RE.match(path)):
            return await self._with_capped_body(scope, receive, send, headers.get("content-length"))
        return await self.app(scope, receive, send)

    async def _with_capped_body(self, scope, receive, send, length):
        limit = self.state.limits.json_body_bytes
        close = {"Connection": "close"}
        if length is not None:
            if not length.isdigit():
                return await send_json(send, 400, error_body("invalid_request", "bad Content-Length header"), close)
            if int(length) > limit:
                return await send_json(send, 413, too_large(int(length), limit, "request body").body(), close)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await send_json(send, 413, too_large(total, limit, "request body").body(), close)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        values = body.count(b",") + body.count(b":")  # C speed, before any parsing
        if values > self.state.limits.json_values:
            limits = self.state.limits
            return await send_json(send, 413, error_body(
                "too_large", f"request body carries {values} values; the server takes at most {limits.json_values} "
                             f"in one request (a prompt: at most {limits.max_points} points)"), close)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: lets the app see a disconnect

        return await self.app(scope, replay, send)


def loggable_target(target: str, status: int) -> str:
    """A request target as the access log may show it: a refused request without its query
    string; an accepted one with only the parameters the API defines."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    if status >= 400:
        return path + "?..."
    pairs = parse_qsl(query, keep_blank_values=True)
    kept = [(k, v) for k, v in pairs if k in LOGGED_QUERY_KEYS]
    shown = "&".join(f"{k}={v}" for k, v in kept)
    if len(kept) < len(pairs) or not pairs:
        shown = f"{shown}&..." if shown else "..."
    return f"{path}?{shown}"


class AccessLogQueryFilter(logging.Filter):
    """Applies `loggable_target` to uvicorn's access log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn: '%s - "%s %s HTTP/%s" %d' % (client, method, target, http_version, status)
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str) and isinstance(args[4], int):
            record.args = (*args[:2], loggable_target(args[2], args[4]), *args[3:])
        return True


_ACCESS_FILTER = AccessLogQueryFilter()


def install_access_log_filter() -> None:
    """Idempotent; called at startup, after uvicorn has configured its loggers."""
    logging.getLogger("uvicorn.access").addFilter(_ACCESS_FILTER)
