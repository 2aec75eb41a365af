"""Who may see the page.

AccessGate: with a token, every request (page, scripts, the view stream's websocket, the status
and download endpoints) needs a session cookie that only a correct token buys. Without the cookie
the server answers a login form (or 401) and nothing else, so no image data reaches a browser that
has not given the token. The token is compared in constant time, never logged, and a wrong one
costs the client a short wait. Sessions live in memory (a bounded set): a restart logs everyone out.

SameOriginGuard, always on: another web site open in the same browser must not drive the page or
read its images through the user's own connection. Requests that carry an Origin (scripts,
websockets, form posts) must come from the page's own origin; and a server on loopback answers only
to loopback host names, so a hostile DNS name pointed at 127.0.0.1 (DNS rebinding) gets nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import secrets
from collections import OrderedDict
from urllib.parse import urlsplit

COOKIE = "medsam2_session"
LOGIN_PATH = "/medsam2/login"
MAX_SESSIONS = 256          # oldest logins are forgotten first
MAX_LOGIN_BYTES = 4096      # a login form is tiny; anything bigger is refused unread
WRONG_TOKEN_DELAY_S = 0.5

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MedSAM2 - log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:sans-serif;background:#202124;color:#eee;display:flex;justify-content:center;
align-items:center;height:100vh;margin:0}}form{{background:#303134;padding:2em;border-radius:8px;min-width:20em}}
input{{width:100%;padding:.5em;margin:.5em 0 1em;box-sizing:border-box}}.error{{color:#f28b82}}</style></head>
<body><form method="post" action="{action}"><h1>MedSAM2</h1>
<p>This server needs its access token (the one given to <code>medsam2 web</code>).</p>{error}
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button></form></body></html>
"""


class AccessGate:
    """aiohttp middleware and login route; `token=None` lets everyone in (loopback, --insecure)."""

    def __init__(self, token: str | None):
        self._token = token
        self._sessions = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def install(self, app) -> None:
        """Add the middleware and the login route to wslink's aiohttp application (before it starts)."""
        if not self.enabled:
            return
        app.middlewares.append(self.middleware)
        app.router.add_post(LOGIN_PATH, self._login)

    def allows(self, request) -> bool:
        if not self.enabled:
            return True
        session = request.cookies.get(COOKIE, "")
        return bool(session) and session in self._sessions

    @property
    def middleware(self):
        from aiohttp import web

        @web.middleware
        async def gate(request, handler):
            if request.path == LOGIN_PATH or self.allows(request):
                return await handler(request)
            if request.method == "GET" and request.path in ("/", "/index.html"):
                return self._login_page(status=401)
            return web.Response(status=401, text="Log in first (open the page's address).")

        return gate

    def _login_page(self, error: str = "", status: int = 200):
        from aiohttp import web

        body = LOGIN_PAGE.format(action=LOGIN_PATH, error=f'<p class="error">{html.escape(error)}</p>' if error else "")
        return web.Response(status=status, text=body, content_type="text/html")

    async def _login(self, request):
        from aiohttp import web

        if request.content_length is None or request.content_length > MAX_LOGIN_BYTES:
            return web.Response(status=413, text="The login form is too large.")
        form = await request.post()
        given = str(form.get("token", "")).strip()
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            await asyncio.sleep(WRONG_TOKEN_DELAY_S)
            return self._login_page("Wrong token.", status=401)
        session = secrets.token_urlsafe(32)
        self._sessions[session] = True
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        response = web.Response(status=303, headers={"Location": "/"})
        response.set_cookie(COOKIE, session, httponly=True, samesite="Strict", path="/")
        return response


class SameOriginGuard:
    """aiohttp middleware: refuse cross-origin requests, and foreign Host names on loopback.

    public_url: the address browsers use when a reverse proxy (TLS) stands in front; its host and
    origin are accepted too.
    """

    def __init__(self, loopback_only: bool, public_url: str | None = None):
        self.loopback_only = loopback_only
        self.public = urlsplit(public_url).netloc.lower() if public_url else None

    def install(self, app) -> None:
        app.middlewares.insert(0, self.middleware)  # before the gate: a foreign site learns nothing

    def refusal(self, request) -> str | None:
        """Why this request is refused, or None."""
        from medsam2.cli.serve import is_loopback

        host = (request.host or "").lower()
        if self.loopback_only and host != self.public and not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return (f"This server answers only to this machine's own address, not to {host!r} (behind a "
                    "reverse proxy, start it with --public-url).")
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc.lower() not in (host, self.public):
            return "Requests from another web site are refused."
        return None

    @property
    def middleware(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            reason = self.refusal(request)
            if reason is not None:
                return web.Response(status=403, text=reason)
            return await handler(request)

        return guard
