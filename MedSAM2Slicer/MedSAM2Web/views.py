"""Slicer's slice views in the page (trame-slicer), their layouts, and the prompt tools in them.

Each slice view is a real vtkMRMLSliceView rendered offscreen (EGL) and streamed to the page as
images; the page sends mouse events back to its VTK interactor. The prompt tools listen to that
interactor ahead of Slicer's own interaction (higher observer priority) and take the left button
while a tool is active, the way Segment Editor effects do; otherwise Slicer's slice interaction
(scroll, window/level drag, pan, zoom) works as in Slicer.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from trame_slicer.rca_view.rca_view_factory import RemoteSliceViewFactory
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from MedSAM2Lib.geometry import slice_view_center as slice_center  # noqa: F401  (the one definition)
from MedSAM2Lib.geometry import slice_view_normal as slice_normal  # noqa: F401
from MedSAM2Lib.geometry import vtk_to_numpy_matrix

VIEW_NAMES = ("Red", "Yellow", "Green")  # axial, sagittal, coronal, as Slicer names them
TOOL_PRIORITY = 10.0  # ahead of vtkMRMLSliceViewInteractorStyle (0.0)
MIN_BOX_PIXELS = 3    # a shorter drag is a click, not a box
BOX_COLOR = (1.0, 0.85, 0.1)

TOOLS = ("include", "exclude", "box")


def layouts() -> dict[str, Layout]:
    """The layout choices offered on the page (Slicer's names where Slicer has them)."""
    red, yellow, green = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.sagittal_view(),
                          ViewLayoutDefinition.coronal_view())
    return {
        "Red slice only": Layout(LayoutDirection.Vertical, [red]),
        "Three over one": Layout(LayoutDirection.Vertical, [red, Layout(LayoutDirection.Horizontal, [yellow, green])],
                                 flex_sizes=["2", "1"]),
        "Side by side": Layout(LayoutDirection.Horizontal, [red, yellow, green]),
    }


class TaggedSliceViewFactory(RemoteSliceViewFactory):
    """trame-slicer's remote slice view, its area tagged `data-view="<Red|Yellow|Green>"` so a page
    (and a browser test) can find the image of each view."""

    def _create_vuetify_ui(self, view_id, slicer_view, rca_scheduler, *, active_view_cursor):
        from trame.widgets import html

        tag = slicer_view.get_singleton_tag()
        with html.Div(raw_attrs=[f'data-view="{tag}"', f'aria-label="{tag} slice view"'],
                      style="position: relative; width: 100%; height: 100%;"):
            super()._create_vuetify_ui(view_id, slicer_view, rca_scheduler, active_view_cursor=active_view_cursor)


def register_views(view_manager, server) -> None:
    from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

    view_manager.register_factory(TaggedSliceViewFactory(server, populate_view_ui_f=create_vertical_slice_view_gutter_ui))


def xy_to_ras(slice_node, x: float, y: float) -> tuple[float, float, float]:
    """A view pixel (VTK display coordinates: origin bottom left) -> RAS on the displayed slice."""
    return tuple(slice_node.GetXYToRAS().MultiplyPoint((float(x), float(y), 0.0, 1.0))[:3])


def matrix_list(vtk_matrix) -> list[list[float]]:
    """A vtkMatrix4x4 as nested lists (for JSON)."""
    return vtk_to_numpy_matrix(vtk_matrix).tolist()


class PromptTools:
    """Include point, exclude point and box (press, drag, release) on every slice view.

    on_point(ras, normal, view_name, include) and on_box(ras_a, ras_b, normal, view_name) are
    called on the event loop, from the view's interactor events.
    """

    def __init__(self, on_point: Callable, on_box: Callable):
        self.on_point, self.on_box = on_point, on_box
        self.tool: str | None = None
        self._drag = None  # (view, start xy) while a box is being drawn
        self._tags = {}    # (interactor, event) -> observer tag, to abort the event
        self._bands = {}   # view name -> rubber-band actor

    def set_tool(self, tool: str | None) -> None:
        if tool is not None and tool not in TOOLS:
            raise ValueError(f"unknown tool {tool!r}")
        self.tool = tool
        if self._drag is not None:
            self._end_band(self._drag[0])
            self._drag = None

    def attach(self, view) -> None:
        import vtk

        interactor = view.interactor()
        for event, handler in ((vtk.vtkCommand.LeftButtonPressEvent, self._press),
                               (vtk.vtkCommand.MouseMoveEvent, self._move),
                               (vtk.vtkCommand.LeftButtonReleaseEvent, self._release)):
            tag = interactor.AddObserver(event, partial(self._dispatch, view, handler), TOOL_PRIORITY)
            self._tags[(interactor, vtk.vtkCommand.GetStringFromEventId(event))] = tag

    def _dispatch(self, view, handler, interactor, event):
        if handler(view, interactor.GetEventPosition()):
            interactor.GetCommand(self._tags[(interactor, event)]).SetAbortFlag(1)

    def _press(self, view, xy) -> bool:
        if self.tool is None:
            return False
        if self.tool == "box":
            self._drag = (view, xy)
            self._show_band(view, xy, xy)
            return True
        node = view.get_view_node()
        self.on_point(xy_to_ras(node, *xy), slice_normal(node), view.get_singleton_tag(), self.tool == "include")
        return True

    def _move(self, view, xy) -> bool:
        if self._drag is None or self._drag[0] is not view:
            return False
        self._show_band(view, self._drag[1], xy)
        return True

    def _release(self, view, xy) -> bool:
        if self._drag is None or self._drag[0] is not view:
            return self.tool is not None
        start = self._drag[1]
        self._drag = None
        self._end_band(view)
        if max(abs(xy[0] - start[0]), abs(xy[1] - start[1])) < MIN_BOX_PIXELS:
            return True
        node = view.get_view_node()
        self.on_box(xy_to_ras(node, *start), xy_to_ras(node, *xy), slice_normal(node), view.get_singleton_tag())
        return True

    # --- the rectangle drawn while dragging -------------------------------------------------
    def _show_band(self, view, a, b) -> None:
        import vtk

        name = view.get_singleton_tag()
        actor = self._bands.get(name)
        if actor is None:
            points, lines = vtk.vtkPoints(), vtk.vtkCellArray()
            points.SetNumberOfPoints(4)
            lines.InsertNextCell(5, [0, 1, 2, 3, 0])
            poly = vtk.vtkPolyData()
            poly.SetPoints(points)
            poly.SetLines(lines)
            mapper = vtk.vtkPolyDataMapper2D()
            mapper.SetInputData(poly)
            actor = vtk.vtkActor2D()
            actor.SetMapper(mapper)
            actor.GetProperty().SetColor(*BOX_COLOR)
            actor.GetProperty().SetLineWidth(2)
            view.first_renderer().AddViewProp(actor)
            self._bands[name] = actor
        poly = actor.GetMapper().GetInput()
        (x0, y0), (x1, y1) = a, b
        for i, (x, y) in enumerate(((x0, y0), (x1, y0), (x1, y1), (x0, y1))):
            poly.GetPoints().SetPoint(i, x, y, 0.0)
        poly.GetPoints().Modified()
        actor.SetVisibility(True)
        view.schedule_render()

    def _end_band(self, view) -> None:
        actor = self._bands.get(view.get_singleton_tag())
        if actor is not None:
            actor.SetVisibility(False)
            view.schedule_render()


def view_state(view) -> dict:
    """Where a slice view looks, for the status endpoint: enough to project voxels to its pixels."""
    node = view.get_view_node()
    dims = node.GetDimensions()
    return {"xy_to_ras": matrix_list(node.GetXYToRAS()), "size": [int(dims[0]), int(dims[1])],
            "normal": list(slice_normal(node)), "center": list(slice_center(node)),
            "offset": float(view.get_slice_value())}

