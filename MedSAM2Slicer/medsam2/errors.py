"""Exception kinds the Slicer shell, CLI and server map to user messages without parsing strings."""


class MedSAM2Error(Exception):
    """Base of every error this package raises on purpose."""


class InputError(MedSAM2Error, ValueError):
    """Bad user input: a prompt out of range, a NaN volume, an unreadable file.

    Also a ValueError, so plain Python callers can catch it the usual way.
    """


class CheckpointError(MedSAM2Error):
    """A checkpoint is missing, corrupt, of the wrong model, or fails its checksum."""


class ServerError(MedSAM2Error):
    """The remote server refused or failed a request."""


class SessionExpired(ServerError):
    """The server no longer knows this session (restart or idle TTL); re-open it."""


class SetupError(MedSAM2Error):
    """A package the engine needs is missing or broken in this Python (e.g. torch or sam2)."""


class Cancelled(MedSAM2Error):
    """The request was cancelled on purpose (by the user): an outcome, not a failure."""
