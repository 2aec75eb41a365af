"""Prompt placement against Slicer's own Markups logic (slicer-core's vtkSlicerMarkupsLogic on the
test scene, as in Slicer): our markups nodes never take placement from the user, and turning a tool
off gives back exactly the user's place state, with the events the Markups toolbar follows."""

import vtk

import slicer_fixtures as sf

AXIAL = (0.0, 0.0, 1.0)


def _users_landmarks(scene):
    """The user's own point list, active for placement as Slicer's Markups logic leaves it."""
    users = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "my landmarks")
    selection = sf.selection_node(scene)
    assert selection.GetActivePlaceNodeID() == users.GetID(), "the test scene lacks Slicer's Markups logic"
    return users, selection


def _active(selection):
    return selection.GetActivePlaceNodeID(), selection.GetActivePlaceNodeClassName()


def test_creating_the_modules_markups_nodes_leaves_the_users_active_place_node():
    from MedSAM2Lib.prompt_nodes import PromptNodes

    scene = sf.new_scene()
    users, selection = _users_landmarks(scene)
    nodes = PromptNodes(scene)
    nodes.node("points")
    nodes.box((0, 0, 0), (10, 10, 0), AXIAL)
    assert _active(selection) == (users.GetID(), "vtkMRMLMarkupsFiducialNode")


def test_a_box_prompt_leaves_placement_on_the_points_node():
    """After a box, the next click must still land in "MedSAM2 points" (else _onMarkupPlaced never
    fires and the ROI collects the clicks)."""
    import slicer

    from MedSAM2Lib.prompt_nodes import PlacementState, PromptNodes

    scene = sf.new_scene()
    interaction = sf.interaction_node(scene)
    placement = PlacementState(interaction, sf.selection_node(scene))
    nodes = PromptNodes(scene)
    points = nodes.node("points")
    placement.begin(points)
    nodes.box((0, 0, 0), (10, 10, 0), AXIAL)
    assert _active(sf.selection_node(scene)) == (points.GetID(), "vtkMRMLMarkupsFiducialNode")
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.Place
    assert placement.ours(nodes.nodes())


def test_turning_a_tool_off_restores_exactly_the_users_place_state_and_the_toolbar_hears_it():
    import slicer

    from MedSAM2Lib.prompt_nodes import PlacementState, PromptNodes

    scene = sf.new_scene()
    users, selection = _users_landmarks(scene)
    curve = scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "my curve")  # now the active place node
    assert _active(selection) == (curve.GetID(), "vtkMRMLMarkupsCurveNode")
    interaction = sf.interaction_node(scene)
    interaction.SetPlaceModePersistence(0)
    heard = []
    for event in (slicer.vtkMRMLSelectionNode.ActivePlaceNodeIDChangedEvent,
                  slicer.vtkMRMLSelectionNode.ActivePlaceNodeClassNameChangedEvent):
        selection.AddObserver(event, lambda caller, e: heard.append(_active(caller)))
    placement = PlacementState(interaction, selection)
    ours = PromptNodes(scene).node("points")  # the shell makes the node, then turns the tool on
    placement.begin(ours)
    assert _active(selection) == (ours.GetID(), "vtkMRMLMarkupsFiducialNode") and heard
    heard.clear()
    placement.end()
    assert _active(selection) == (curve.GetID(), "vtkMRMLMarkupsCurveNode")
    assert interaction.GetPlaceModePersistence() == 0
    assert interaction.GetCurrentInteractionMode() == slicer.vtkMRMLInteractionNode.ViewTransform
    assert heard and heard[-1] == (curve.GetID(), "vtkMRMLMarkupsCurveNode"), "the Markups toolbar was not told"


def test_no_active_place_node_before_the_tool_means_none_after():
    from MedSAM2Lib.prompt_nodes import PlacementState, PromptNodes

    scene = sf.new_scene()
    selection = sf.selection_node(scene)
    assert _active(selection) == (None, None)
    placement = PlacementState(sf.interaction_node(scene), selection)
    placement.begin(PromptNodes(scene).node("points"))
    placement.end()
    assert _active(selection) == (None, None)


def test_a_box_corner_left_pending_is_removed_when_the_tool_changes():
    from MedSAM2Lib.prompt_nodes import BoxCorners, PromptNodes

    scene = sf.new_scene()
    points = PromptNodes(scene).node("points")
    kept = points.AddControlPoint(vtk.vtkVector3d(1, 2, 3))  # an include point placed earlier
    corners = BoxCorners()
    corner = points.AddControlPoint(vtk.vtkVector3d(5, 5, 0))
    assert corners.place(points, corner, (5.0, 5.0, 0.0)) is None and corners.pending
    corners.discard()  # the tool changed between the two corners
    assert points.GetNumberOfControlPoints() == 1 and points.GetNthControlPointPositionVector(kept)[0] == 1
    assert not corners.pending
    first = points.AddControlPoint(vtk.vtkVector3d(0, 0, 0))
    assert corners.place(points, first, (0.0, 0.0, 0.0)) is None
    second = points.AddControlPoint(vtk.vtkVector3d(9, 9, 0))
    assert corners.place(points, second, (9.0, 9.0, 0.0)) == ((0.0, 0.0, 0.0), (9.0, 9.0, 0.0))
    assert points.GetNumberOfControlPoints() == 1 and not corners.pending  # both corners became a box
