"""MRML side of the MedSAM2 Slicer module: geometry, segment slices, sessions.

Imports slicer and vtk (works on a bare slicer-core scene), never qt or ctk, so everything here is
testable without the Slicer application.
"""

from .geometry import FrameLayout, VolumeGeometry
from .session import SegmentationSession

__all__ = ["FrameLayout", "SegmentationSession", "VolumeGeometry"]
