"""Slicer logic without Qt: the MRML adapter, the module's controller, the engine process.

Imports slicer and vtk (works on a bare slicer-core scene), never qt or ctk, so everything here is
testable without the Slicer application, and shared by the Qt shell (MedSAM2.py) and the web
shell (MedSAM2Web). Importing it needs neither torch nor sam2.
"""

from .engine_api import Engine, EngineSession, Request
from .engine_inprocess import InProcessEngine
from .engine_process import ChildEngine, EngineStopped, LocalEngine, LocalTarget, RemoteEngine, RemoteTarget
from .geometry import FrameLayout, VolumeGeometry
from .models import ModelSettings
from .session import SegmentationSession

__all__ = ["ChildEngine", "Engine", "EngineSession", "EngineStopped", "FrameLayout", "InProcessEngine", "LocalEngine",
           "LocalTarget", "ModelSettings", "RemoteEngine", "RemoteTarget", "Request", "SegmentationSession",
           "VolumeGeometry"]
