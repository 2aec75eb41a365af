"""The include / exclude / box prompt tools, without Qt: what a click in a slice view becomes.

While a tool is on, Slicer places each click as a control point in "MedSAM2 points" (place mode,
PlacementState); PointPositionDefinedEvent then turns it into a prompt: an include or exclude
point at once, a box from two corners. A shell only maps its buttons and shortcuts to set() and
asks interaction_changed() when Slicer's interaction mode changes. This runs inside the markups
widget's event: errors go to the controller's on_error, which a Qt shell shows from its event loop.
"""

from __future__ import annotations

from medsam2.errors import InputError

from .geometry import slice_view_normal
from .markers import Marker
from .prompt_nodes import PlacementState

TOOLS = ("include", "exclude", "box")


class BoxCorners:
    """The box tool's first corner: a control point in "MedSAM2 points" until the second corner
    makes the box. Changing tool between the two corners discards it (no stray point stays)."""

    def __init__(self):
        self._corner = None  # (Marker of the first corner's control point, its RAS)

    @property
    def pending(self) -> bool:
        return self._corner is not None

    def place(self, node, index: int, ras):
        """A corner placed at control point `index`: None after the first corner; after the second
        (first RAS, second RAS), both points removed (the box's ROI shows it instead)."""
        marker = Marker.for_point(node, index)
        if self._corner is None:
            self._corner = (marker, tuple(ras))
            return None
        (first, first_ras), self._corner = self._corner, None
        marker.remove()
        first.remove()
        return first_ras, tuple(ras)

    def discard(self) -> None:
        if self._corner is not None:
            self._corner[0].remove()
        self._corner = None


class PromptTools:
    """Which prompt tool is on, and the clicks it turns into the controller's prompts."""

    def __init__(self, controller, interaction_node, selection_node):
        import slicer

        self.controller = controller
        self.placement = PlacementState(interaction_node, selection_node)
        self.corners = BoxCorners()
        self.tool: str | None = None
        self.last_slice_node = None  # the view of the last prompt
        self._event = slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent
        self._observed = None  # (points node, observer tag)

    def set(self, tool: str | None) -> None:
        """Turn `tool` on (None: off, the user's own place state back). A first box corner left
        pending is removed either way."""
        if tool is not None and tool not in TOOLS:
            raise ValueError(f"tool must be one of {', '.join(TOOLS)}, got {tool!r}")
        self.corners.discard()
        self.tool = tool
        if tool is None:
            self.placement.end()
            return
        node = self.controller.prompt_nodes.node("points")
        if self._observed is None or self._observed[0] is not node:
            self._unobserve()
            self._observed = (node, node.AddObserver(self._event, self._on_point_defined))
        self.placement.begin(node)

    def interaction_changed(self) -> bool:
        """Place mode left elsewhere (Esc in a view, another module's tool): the tool goes off.
        Returns True when it did (a shell then releases its tool buttons)."""
        if self.tool is None or self.placement.ours(self.controller.prompt_nodes.nodes()):
            return False
        self.tool = None
        self.corners.discard()
        self.placement.end()
        return True

    def close(self) -> None:
        self.set(None)
        self._unobserve()

    def _unobserve(self) -> None:
        if self._observed is not None:
            self._observed[0].RemoveObserver(self._observed[1])
        self._observed = None

    def _on_point_defined(self, node, event=None) -> None:
        n = node.GetNumberOfControlPoints()
        if n == 0 or self.tool is None:
            return
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(n - 1, ras)
        slice_node = self._slice_node_under_cursor(node.GetScene())
        if slice_node is None:
            node.RemoveNthControlPoint(n - 1)
            self.controller.on_error(InputError("Place MedSAM2 prompts in a slice view (Red, Yellow or Green), "
                                                "not in the 3D view."))
            return
        self.last_slice_node = slice_node
        normal = slice_view_normal(slice_node)
        if self.tool == "box":
            corners = self.corners.place(node, n - 1, ras)  # None until the second corner
            if corners is not None:
                self.controller.place_box(*corners, normal)
            return
        include = self.tool == "include"
        node.SetNthControlPointSelected(n - 1, include)  # selected colour = include (green)
        node.SetNthControlPointLocked(n - 1, True)
        self.controller.place_point(ras, normal, include, marker=Marker.for_point(node, n - 1))

    @staticmethod
    def _slice_node_under_cursor(scene):
        """The slice view the mouse is in (where the point was just placed); None in a 3D view."""
        crosshair = scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") if scene is not None else None
        if crosshair is None:
            return None
        return crosshair.GetCursorPositionXYZ([0.0, 0.0, 0.0])
