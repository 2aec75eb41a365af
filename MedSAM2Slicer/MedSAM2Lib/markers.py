"""On-screen prompt markers, kept in step with undo and redo.

A committed click leaves a control point in the include/exclude markups node, a committed box an
ROI node. Undo hides the marker and redo shows it again, so what the views show is always the
prompts the engine holds. A marker whose action can no longer be redone (a new action cleared the
redo history) is deleted. Control points are tracked by their ID, not their index: deleting one
renumbers those after it.
"""


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


class PromptMarkers:
    """Which marker belongs to which action of which SegmentationSession."""

    def __init__(self):
        self._entries = []  # [session, action, marker, undone]: actions compared by identity

    def attach(self, session, action, marker):
        if marker is not None:
            self._entries.append([session, action, marker, False])

    def _set_undone(self, session, action, undone):
        for entry in self._entries:
            if entry[0] is session and entry[1] is action:
                entry[3] = undone
                entry[2].show(not undone)

    def undone(self, session, action):
        self._set_undone(session, action, True)

    def redone(self, session, action):
        self._set_undone(session, action, False)

    def prune(self, session):
        """Delete the markers of undone actions that `session` can no longer redo. (Prompts too old
        to undo keep their markers: they still steer the engine.)"""
        keep = []
        for entry in self._entries:
            s, action, marker, undone = entry
            if s is session and undone and not session.redoable(action):
                marker.remove()
            elif marker.alive:
                keep.append(entry)
        self._entries = keep

    def forget_session(self, session):
        """The session was closed (its prompts are gone from the engine): so are its markers."""
        for entry in self._entries:
            if entry[0] is session:
                entry[2].remove()
        self._entries = [e for e in self._entries if e[0] is not session]
