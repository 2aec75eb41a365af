"""MedSAM2 engine: SAM2 video tracking over volume slices with a self-sorting memory bank.

Importing this package is cheap and needs neither torch nor sam2: the Slicer module imports it
before those are installed (to offer the install dialog). Heavy modules load on first use.
"""

import os
import sys
import warnings
from importlib import import_module

from .errors import Cancelled, CheckpointError, InputError, MedSAM2Error, ServerError, SessionExpired, SetupError

__version__ = "0.1.0"

# sam2 built without its CUDA extension warns on every frame that it skips filling tiny mask
# holes; the official predictor skips it identically, so the warning is only noise. Set here, at
# package import, so that no later warnings.catch_warnings() block can undo it.
warnings.filterwarnings("ignore", message=r"cannot import name '_C' from 'sam2'", category=UserWarning)

# On Apple silicon, an operation PyTorch has no MPS kernel for runs on the CPU instead of failing
# (SAM2's own guidance for Macs). PyTorch reads this once, when it is first imported: setting it
# here, before our first torch import, covers every process that starts with medsam2 (CLI,
# server, tests); inside Slicer it applies when torch was not imported earlier. The user's own
# setting wins.
if sys.platform == "darwin":
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "list_models": ("models.registry", "list_models"),
    "load_model": ("models.model", "load_model"),
    "connect": ("remote.client", "connect"),
    "testing": ("testing", None),
}

__all__ = [
    "Cancelled", "CheckpointError", "InputError", "MedSAM2Error", "ServerError", "SessionExpired", "SetupError",
    "__version__", *_LAZY,
]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'medsam2' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = import_module(f".{module_name}", __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
