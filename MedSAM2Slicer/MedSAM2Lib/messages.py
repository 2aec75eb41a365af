"""What a shell shows for an error: a title and a text, by the kind of error (no string parsing)."""

from __future__ import annotations

from medsam2.errors import CheckpointError, InputError, ServerError


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(title, text) for a dialog or a banner."""
    if isinstance(exc, CheckpointError):
        return "MedSAM2: model problem", str(exc)
    if isinstance(exc, ServerError):  # the engine process or a remote server
        return "MedSAM2: engine or server problem", str(exc)
    if isinstance(exc, (InputError, ValueError)):
        return "MedSAM2", str(exc)
    return "MedSAM2: unexpected error", f"{type(exc).__name__}: {exc}"
