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
    from MedSAM2Lib.prompt_nodes import PromptNodes
    from MedSAM2Lib.prompt_tools import BoxCorners

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


def _views(scene):
    """A Red (axial) slice node and the crosshair that says the mouse is in it, as Slicer has them."""
    sf.application_logic(scene)  # slice orientation presets
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetLayoutName("Red")
    red.SetOrientation("Axial")
    crosshair = scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    crosshair.SetCursorPositionXYZ([10.0, 10.0, 0.0], red)
    return red, crosshair


def test_clicks_become_prompts_and_a_box_leaves_the_next_click_to_the_points_node(model, ct_volume):
    """The tools on slicer-core with Slicer's Markups logic: two boxes (two corners each), then an
    include point; each click is a control point added to the active place node, as Slicer's
    markups widget places it. Before the fix the first box's ROI took placement: the next click
    went into the ROI and never became a prompt."""
    import warnings

    from MedSAM2Lib import InProcessEngine
    from MedSAM2Lib.controller import ModuleController
    from MedSAM2Lib.prompt_tools import PromptTools

    warnings.filterwarnings("ignore", message=".*RANDOM WEIGHTS.*")
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=4)
    users, selection = _users_landmarks(scene)
    red, crosshair = _views(scene)
    errors = []
    controller = ModuleController(scene, on_error=errors.append)
    controller.use_engine(InProcessEngine(model))
    controller.select(volume, segmentation, segment_id)
    tools = PromptTools(controller, sf.interaction_node(scene), selection)
    k = values.shape[0] // 2

    def click(ijk):
        """What the markups widget does on a click in place mode: a point in the active place node."""
        active = scene.GetNodeByID(selection.GetActivePlaceNodeID())
        active.AddControlPointWorld(*sf.ijk_to_ras(volume, ijk))
        while controller.busy:
            controller.poll()
        return active

    tools.set("box")
    points = click((30, 40, k))
    assert points.GetName() == "MedSAM2 points" and points.GetNumberOfControlPoints() == 1
    click((90, 100, k))
    assert points.GetNumberOfControlPoints() == 0, "both corners became the box"
    assert len(list(scene.GetNodesByClass("vtkMRMLMarkupsROINode"))) == 1 and not errors
    assert click((40, 50, k)) is points, "the box's ROI took the next click"  # a second box, same tool
    click((80, 90, k))
    assert len(list(scene.GetNodesByClass("vtkMRMLMarkupsROINode"))) == 2 and not errors
    tools.set("include")
    assert click((60, 70, k)) is points and points.GetNumberOfControlPoints() == 1
    assert points.GetNthControlPointSelected(0) and points.GetNthControlPointLocked(0)
    assert tools.last_slice_node is red and not errors
    assert all(controller.undo() is not None for _ in range(3)), "two boxes and a point are prompts"
    tools.set("box")
    click((20, 20, k))  # a first corner, then the user switches tool
    tools.set("exclude")
    assert points.GetNumberOfControlPoints() == 1, "the pending corner was left behind"
    crosshair.SetCursorPositionXYZ([0.0, 0.0, 0.0], None)  # the mouse in the 3D view
    click((60, 70, k))
    assert points.GetNumberOfControlPoints() == 1 and "slice view" in str(errors[-1])
    tools.close()
    assert _active(selection) == (users.GetID(), "vtkMRMLMarkupsFiducialNode")
    controller.shutdown()
