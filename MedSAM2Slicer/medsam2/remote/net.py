"""Network facts the server's CLI and the client share (standard library only)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for an address that only this machine can reach: localhost (any case), 127.0.0.0/8, ::1.

    A host name other than localhost may resolve to anything, so it is not loopback.
    """
    host = (host or "").strip().strip("[]").rstrip(".")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
