"""The remote GPU server, one concern a module:

app (wiring: create_app, run), errors (error mapping), state (sessions, volumes, reaper),
limits, schemas (request/response bodies), gate (auth, body cap, logs), gpu_lock, and the routes:
volume_routes, session_routes, propagation_routes. See app.py for the API's shape.
"""

from .app import create_app, run
from .gpu_lock import FairLock
from .limits import Limits
from .state import ServerState

__all__ = ["create_app", "run", "FairLock", "Limits", "ServerState"]
