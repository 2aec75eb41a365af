"""The slice each view shows, reported as it changes: the engine prepares a click there (issue 22).

Both shells use it on their slice nodes (MRML only, no Qt): each Modified event of a slice node
calls on_slice(ras at the view's centre, its normal, the view's name). The controller waits until
a view rests before it tells the engine (ModuleController.viewing), so scrolling costs nothing.
"""

from __future__ import annotations

from typing import Callable

import vtk

from .geometry import slice_view_center, slice_view_normal


class SliceViewWatch:
    def __init__(self, on_slice: Callable[[tuple, tuple, str], None]):
        self.on_slice = on_slice
        self._tags: list = []  # (slice node, observer tag)

    def watch(self, slice_nodes) -> None:
        """Report these slice nodes' slices from now on (those watched before are let go)."""
        self.stop()
        for node in slice_nodes:
            self._tags.append((node, node.AddObserver(vtk.vtkCommand.ModifiedEvent, self._moved)))

    def stop(self) -> None:
        for node, tag in self._tags:
            node.RemoveObserver(tag)
        self._tags = []

    def _moved(self, node, _event=None) -> None:
        self.on_slice(slice_view_center(node), slice_view_normal(node), node.GetName())
