"""On-screen prompt markers, kept in step with undo and redo.

A committed click leaves a control point in the include/exclude markups node, a committed box an
ROI node. Undo hides the marker and redo shows it again, so what the views show is always the
prompts the engine holds. A marker whose action can no longer be redone (a new action cleared the
redo history) is deleted. Control points are tracked by their ID, not their index: deleting one
renumbers those after it.
"""

from __future__ import annotations

from dataclasses import dataclass


class Marker:
    """One prompt's marker: a control point of a markups node, or a whole node (a box's ROI)."""

    def __init__(self, node, point_id=None):
        self.node = node
        self.point_id = point_id

    @classmethod
    def for_point(cls, node, index):
        return cls(node, node.GetNthControlPointID(index))

    def _index(self):
        return self.node.GetNthControlPointIndexByID(self.point_id)

    @property
    def alive(self):
        """False once the user (or Slicer) deleted the node or the point."""
        if self.node is None or self.node.GetScene() is None:
            return False
        return self.point_id is None or self._index() >= 0

    @property
    def visible(self):
        if self.point_id is None:
            return bool(self.node.GetDisplayVisibility())
        return bool(self.node.GetNthControlPointVisibility(self._index()))

    def show(self, visible):
        if not self.alive:
            return
        if self.point_id is None:
            self.node.SetDisplayVisibility(bool(visible))
        else:
            self.node.SetNthControlPointVisibility(self._index(), bool(visible))

    def remove(self):
        if not self.alive:
            return
        if self.point_id is None:
            self.node.GetScene().RemoveNode(self.node)
        else:
            self.node.RemoveNthControlPoint(self._index())


@dataclass(eq=False)
class PlacedMarker:
    """A marker with the session and action (compared by identity) its prompt belongs to."""

    session: object
    action: object
    marker: Marker
    undone: bool = False


class PromptMarkers:
    """Which marker belongs to which action of which SegmentationSession."""

    def __init__(self):
        self._placed: list[PlacedMarker] = []

    def attach(self, session, action, marker: Marker | None) -> None:
        if marker is not None:
            self._placed.append(PlacedMarker(session, action, marker))

    def _set_undone(self, session, action, undone: bool) -> None:
        for placed in self._placed:
            if placed.session is session and placed.action is action:
                placed.undone = undone
                placed.marker.show(not undone)

    def undone(self, session, action) -> None:
        self._set_undone(session, action, True)

    def redone(self, session, action) -> None:
        self._set_undone(session, action, False)

    def prune(self, session) -> None:
        """Delete the markers of undone actions that `session` can no longer redo. (Prompts too old
        to undo keep their markers: they still steer the engine.)"""
        keep = []
        for placed in self._placed:
            if placed.session is session and placed.undone and not session.redoable(placed.action):
                placed.marker.remove()
            elif placed.marker.alive:
                keep.append(placed)
        self._placed = keep

    def forget_session(self, session) -> None:
        """The session was closed (its prompts are gone from the engine): so are its markers."""
        for placed in self._placed:
            if placed.session is session:
                placed.marker.remove()
        self._placed = [p for p in self._placed if p.session is not session]
