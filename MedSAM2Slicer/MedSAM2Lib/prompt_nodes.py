"""The markups nodes that show prompts in the views, and the place mode the prompt tools use.

Both are scene state, so they live here (no Qt): a shell turns a tool on and off; these make sure
the nodes are never saved with the scene (their display nodes neither) and that the user's own
place-mode settings come back when a tool is turned off.

Slicer's Markups logic makes every markups node added to the scene the active place node
(vtkSlicerMarkupsLogic::OnMRMLSceneNodeAdded -> SetActiveListID). Our nodes are display-only, so
adding one must not take placement from the user's node, nor from "MedSAM2 points" while a tool
is on: `_placement_kept` puts the selection node's active place node and class back.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

INCLUDE_COLOR = (0.2, 0.9, 0.2)  # a selected control point: include
EXCLUDE_COLOR = (0.95, 0.2, 0.2)


def _not_saved(node) -> None:
    """Temporary display-only nodes: neither they nor their display nodes go into a saved scene."""
    node.SetSaveWithScene(False)
    for i in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            display.SetSaveWithScene(False)


def selection_node(scene):
    """The scene's selection node (Slicer's application logic adds it as a singleton)."""
    node = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    return node if node is not None else scene.GetFirstNodeByClass("vtkMRMLSelectionNode")


def set_active_place(selection, node_id, class_name) -> None:
    """Set the active place node and class with the Reference setters, which fire the events the
    Markups toolbar and logic follow (the plain setters only mark the node modified)."""
    if selection.GetActivePlaceNodeClassName() != class_name:
        selection.SetReferenceActivePlaceNodeClassName(class_name)
    if selection.GetActivePlaceNodeID() != node_id:
        selection.SetReferenceActivePlaceNodeID(node_id)


@contextmanager
def _placement_kept(scene):
    """Add nodes inside this block: the active place node and class stay as they were."""
    selection = selection_node(scene)
    if selection is None:
        yield
        return
    saved = (selection.GetActivePlaceNodeID(), selection.GetActivePlaceNodeClassName())
    try:
        yield
    finally:
        set_active_place(selection, *saved)


class PromptNodes:
    """The "MedSAM2 points" markups node (include points selected/green, exclude red) and box ROIs."""

    def __init__(self, scene):
        self.scene = scene
        self._nodes: dict = {}

    def node(self, kind: str = "points"):
        """The markups node that shows prompts of this kind ('points' or 'box' corners)."""
        node = self._nodes.get(kind)
        if node is not None and node.GetScene() is self.scene:
            return node
        with _placement_kept(self.scene):
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"MedSAM2 {kind}")
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(*INCLUDE_COLOR)
        display.SetColor(*EXCLUDE_COLOR)
        display.SetPointLabelsVisibility(False)
        display.SetGlyphScale(2.0)
        _not_saved(node)
        self._nodes[kind] = node
        return node

    def nodes(self) -> list:
        return [n for n in self._nodes.values() if n.GetScene() is self.scene]

    def box(self, ras_a, ras_b, normal):
        """An ROI outlining a box prompt (display only), flat on the slice of the first corner."""
        a, b, n = np.asarray(ras_a, float), np.asarray(ras_b, float), np.asarray(normal, float)
        n = n / np.linalg.norm(n)
        b = b - np.dot(b - a, n) * n
        with _placement_kept(self.scene):  # the next click still goes to "MedSAM2 points"
            roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedSAM2 box")
            roi.CreateDefaultDisplayNodes()
        _not_saved(roi)
        roi.SetXYZ(*((a + b) / 2))
        roi.SetRadiusXYZ(*np.maximum(np.abs(b - a) / 2, 0.5))
        roi.SetLocked(True)
        roi.SetNthControlPointVisibility(0, False)  # its centre dot would look like a point prompt
        display = roi.GetDisplayNode()  # an outline only: the mask inside stays visible, no handles or name
        display.SetFillVisibility(False)
        display.SetHandlesInteractive(False)
        display.SetPropertiesLabelVisibility(False)
        return roi

    def point(self, ras, include: bool) -> tuple:
        """A click's marker where it was placed, for a shell whose clicks are not markups placements
        (the web page): (node, control point index). Include points are selected (green), exclude
        points not (red), as a placed point is marked; locked, so no drag moves a prompt."""
        node = self.node("points")
        index = node.AddControlPoint(*(float(v) for v in ras))
        node.SetNthControlPointSelected(index, bool(include))
        node.SetNthControlPointLocked(index, True)
        return node, index


class PlacementState:
    """Place mode on our node while a prompt tool is on; the user's own settings put back after.

    Turning a tool on makes every click place a point in "MedSAM2 points" (persistent place mode,
    our node active). Without restoring, later clicks of the Markups toolbar would keep landing in
    MedSAM2's node (not saved with the scene) and place mode would stay persistent. begin() saves
    the user's state as it is when the tool turns on; PromptNodes never changes it by adding a node.
    """

    def __init__(self, interaction_node, selection_node):
        self.interaction, self.selection = interaction_node, selection_node
        self._saved = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def begin(self, node) -> None:
        if self._saved is None:
            self._saved = (self.interaction.GetPlaceModePersistence(), self.selection.GetActivePlaceNodeID(),
                           self.selection.GetActivePlaceNodeClassName())
        set_active_place(self.selection, node.GetID(), node.GetClassName())
        self.interaction.SetPlaceModePersistence(1)
        self.interaction.SetCurrentInteractionMode(self.interaction.Place)

    def end(self) -> None:
        """Leave place mode (if still in it) and restore what begin() found."""
        if self._saved is None:
            return
        persistence, node_id, class_name = self._saved
        self._saved = None
        if self.interaction.GetCurrentInteractionMode() == self.interaction.Place:
            self.interaction.SetCurrentInteractionMode(self.interaction.ViewTransform)
        self.interaction.SetPlaceModePersistence(persistence)
        set_active_place(self.selection, node_id, class_name)

    def ours(self, nodes) -> bool:
        """Whether place mode is on and places into one of `nodes`."""
        placing = self.interaction.GetCurrentInteractionMode() == self.interaction.Place
        return placing and self.selection.GetActivePlaceNodeID() in {n.GetID() for n in nodes}

