"""MedSAM2 module: prompt a segment in any slice view, propagate it through the volume.

This file is the Qt shell only: widgets, prompt placement, shortcuts, the worker's mailbox, the
install dialog. Everything it does to the scene goes through MedSAM2Lib (tested without Qt), and
every model call goes through the `medsam2` engine on one worker thread.
"""

import logging
import os
import sys
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # medsam2 and MedSAM2Lib ship next to this file
    sys.path.insert(0, _HERE)

from MedSAM2Lib.markers import Marker, PromptMarkers  # noqa: E402
from MedSAM2Lib.models import DEVICES, ModelHolder, ModelSettings  # noqa: E402
from MedSAM2Lib.worker import Worker  # noqa: E402

SETTINGS_URL = "MedSAM2/ServerURL"
SETTINGS_TOKEN = "MedSAM2/ServerToken"
DEFAULT_MODEL = "medsam2_latest"
DRAIN_INTERVAL_MS = 40

# (key, what it does) - shown in the help text and bound while the module is open
SHORTCUTS = (
    ("I", "include point tool"),
    ("X", "exclude point tool"),
    ("O", "box tool (click two opposite corners)"),
    ("Esc", "stop placing prompts"),
    ("Shift+P", "propagate (direction as set)"),
    ("Shift+U", "propagate up"),
    ("Shift+D", "propagate down"),
    ("Shift+R", "refine from this slice"),
    ("Shift+E", "use edited slice"),
    ("Ctrl+Z", "undo"),
    ("Ctrl+Y", "redo"),
    ("Ctrl+Shift+Z", "redo"),
)


class MedSAM2(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM2 for 3D Slicer contributors"]
        keys = "".join(f"<li><b>{k}</b>: {what}</li>" for k, what in SHORTCUTS)
        self.parent.helpText = f"""
Interactive 3D segmentation with MedSAM2 / SAM2: place include/exclude points or a box on a slice
in any slice view (Red, Yellow or Green, aligned with the volume); the slice is segmented at once.
Then propagate the segment through the volume (both ways, up or down, optionally within a slice
range). Correct any slice with more points and <i>Refine from this slice</i>, or paint it in
Segment Editor and <i>Use edited slice</i>. Every action can be undone.
<p>Keyboard shortcuts (while this module is open):</p><ul>{keys}</ul>
<p>The first use installs PyTorch (through the PyTorch extension), sam2 and a few packages, then
downloads the model into Slicer's cache. A MedSAM2 server can run the model instead (Settings).</p>
"""
        self.parent.acknowledgementText = """
Uses SAM 2 (Ravi et al., Meta AI, 2024), MedSAM2 (Ma et al., 2025, bowang-lab) and the self-sorting
memory bank of MedSAM-2 (Zhu et al., 2024). Built on 3D Slicer's ScriptedLoadableModule.
"""


@parameterNodeWrapper
class MedSAM2ParameterNode:
    """Module state saved with the scene (the server token is not: it lives in app settings)."""

    volume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    segmentId: str = ""
    modelName: str = DEFAULT_MODEL
    checkpointFile: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    memory: Annotated[str, Choice(["self-sorting", "sam2"])] = "self-sorting"
    axes: Annotated[str, Choice(["one", "all"])] = "one"
    imageSet: bool = False
    useDisplayWindow: bool = True
    windowLow: float = -160.0
    windowHigh: float = 240.0
    direction: Annotated[str, Choice(["both", "up", "down"])] = "both"
    limitRange: bool = False
    rangeFirst: Annotated[int, WithinRange(0, 100000)] = 0
    rangeLast: Annotated[int, WithinRange(0, 100000)] = 0


def _slice_normal(sliceNode):
    m = sliceNode.GetSliceToRAS()
    return (m.GetElement(0, 2), m.GetElement(1, 2), m.GetElement(2, 2))


def _slice_center(sliceNode):
    m = sliceNode.GetSliceToRAS()
    return (m.GetElement(0, 3), m.GetElement(1, 3), m.GetElement(2, 3))


class MedSAM2Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._tool = None            # "include" | "exclude" | "box" | None
        self._boxCorner = None       # (ras, sliceNode) of the first box corner
        self._pending = []           # actions waiting for the worker to be free
        self._propagation = None     # (job, task) while propagating
        self._frameBuffer = {}
        self._lastSliceNode = None
        self._timer = None
        self._observedSegmentation = None
        self._updatingSegments = False

    # --- setup ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSAM2Logic()

        self._timer = qt.QTimer()
        self._timer.setInterval(DRAIN_INTERVAL_MS)
        self._timer.connect("timeout()", self._drain)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # leaving Place mode (Esc in a view, another module's tool) releases our tool buttons
        self.addObserver(slicer.app.applicationLogic().GetInteractionNode(),
                         slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent, self._onInteractionModeChanged)

        self.ui.includePointButton.connect("toggled(bool)", lambda on: self._setTool("include" if on else None))
        self.ui.excludePointButton.connect("toggled(bool)", lambda on: self._setTool("exclude" if on else None))
        self.ui.boxButton.connect("toggled(bool)", lambda on: self._setTool("box" if on else None))
        self.ui.useEditedSliceButton.connect("clicked()", self.onUseEditedSlice)
        self.ui.propagateButton.connect("clicked()", lambda: self.onPropagate(None))
        self.ui.refineButton.connect("clicked()", self.onRefine)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.undoButton.connect("clicked()", self.onUndo)
        self.ui.redoButton.connect("clicked()", self.onRedo)
        self.ui.addSegmentButton.connect("clicked()", self.onAddSegment)
        self.ui.segmentComboBox.connect("currentIndexChanged(int)", self.onSegmentSelected)
        self.ui.checkpointBrowseButton.connect("clicked()", self.onBrowseCheckpoint)
        self.ui.installButton.connect("clicked()", lambda: self.ensureDependencies(force_dialog=True))
        self.ui.downloadButton.connect("clicked()", self.onDownloadModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onServerSettingsChanged)
        self.ui.setRangeFromViewButton.connect("clicked()", self.onRangeFromView)

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS_URL, "")
        self.ui.serverTokenLineEdit.text = settings.value(SETTINGS_TOKEN, "")
        self.ui.serverTokenLineEdit.echoMode = qt.QLineEdit.Password
        self._fillModelList()
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self):
        self._removeShortcuts()
        self._stopPlacing()
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self):
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self):
        self._removeShortcuts()
        self._stopPlacing()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self._stopPlacing()
        self.setParameterNode(None)
        self.logic.closeSessions()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node -------------------------------------------------------------------
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.volume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.volume = first

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # widgets carry a "SlicerParameterName" property in the .ui: connectGui binds them
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        self._observeSegmentation(p.segmentation)
        self._fillSegmentList()
        index = self.ui.modelComboBox.findData(p.modelName)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = index
        self.ui.windowLowSpinBox.enabled = not p.useDisplayWindow
        self.ui.windowHighSpinBox.enabled = not p.useDisplayWindow
        self.ui.rangeFirstSpinBox.enabled = p.limitRange
        self.ui.rangeLastSpinBox.enabled = p.limitRange
        self._updateButtons()

    # --- segments -------------------------------------------------------------------------
    _SEGMENT_EVENTS = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                       slicer.vtkSegmentation.SegmentModified)  # the node forwards its segmentation's events

    def _observeSegmentation(self, segmentationNode):
        if segmentationNode is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            for event in self._SEGMENT_EVENTS:
                self.removeObserver(self._observedSegmentation, event, self._onSegmentsChanged)
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            for event in self._SEGMENT_EVENTS:
                self.addObserver(segmentationNode, event, self._onSegmentsChanged)

    def _onSegmentsChanged(self, caller=None, event=None):
        self._fillSegmentList()

    def _fillSegmentList(self):
        p = self._parameterNode
        combo = self.ui.segmentComboBox
        self._updatingSegments = True
        try:
            combo.clear()
            segmentationNode = p.segmentation if p else None
            if segmentationNode is not None:
                segmentation = segmentationNode.GetSegmentation()
                for i in range(segmentation.GetNumberOfSegments()):
                    segmentId = segmentation.GetNthSegmentID(i)
                    combo.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)
            index = combo.findData(p.segmentId) if p else -1
            if index < 0 and combo.count > 0:
                index = 0
            combo.currentIndex = index
        finally:
            self._updatingSegments = False
        if p is not None:
            current = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else ""
            if (current or "") != p.segmentId:
                p.segmentId = current or ""

    def onSegmentSelected(self, index):
        if self._updatingSegments or self._parameterNode is None:
            return
        self._parameterNode.segmentId = self.ui.segmentComboBox.itemData(index) or ""

    def onAddSegment(self):
        p = self._parameterNode
        if p.volume is None:
            slicer.util.errorDisplay("Select the volume to segment first.")
            return
        if p.segmentation is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", p.volume.GetName() + " MedSAM2")
            node.CreateDefaultDisplayNodes()
            node.SetReferenceImageGeometryParameterFromVolumeNode(p.volume)
            p.segmentation = node
        segmentation = p.segmentation.GetSegmentation()
        p.segmentId = segmentation.AddEmptySegment("", f"Segment_{segmentation.GetNumberOfSegments() + 1}")
        self._fillSegmentList()

    # --- models and settings --------------------------------------------------------------
    def _fillModelList(self):
        combo = self.ui.modelComboBox
        combo.clear()
        try:
            import medsam2

            specs = medsam2.list_models()
        except Exception as exc:  # registry unavailable: the custom-checkpoint path still works
            logging.warning(f"MedSAM2: model registry unavailable: {exc}")
            specs = []
        for spec in specs:
            combo.addItem(f"{spec['name']}  ({spec['image_size']} px)", spec["name"])
            combo.setItemData(combo.count - 1, spec.get("note") or "", qt.Qt.ToolTipRole)
        if combo.count == 0:
            combo.addItem(DEFAULT_MODEL, DEFAULT_MODEL)

    def onModelSelected(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index)

    def onBrowseCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, "MedSAM2 / SAM2 checkpoint", "",
                                              "PyTorch checkpoint (*.pt *.pth);;All files (*)")
        if path:
            self._parameterNode.checkpointFile = path

    def onServerSettingsChanged(self):
        settings = qt.QSettings()
        settings.setValue(SETTINGS_URL, self.ui.serverUrlLineEdit.text.strip())
        settings.setValue(SETTINGS_TOKEN, self.ui.serverTokenLineEdit.text.strip())
        self.logic.closeSessions()  # the next prompt opens them on the new backend

    def modelSettings(self):
        p = self._parameterNode
        allow_random = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        return ModelSettings(name=p.modelName or DEFAULT_MODEL, checkpoint=p.checkpointFile.strip(),
                             device=p.device, server_url=self.ui.serverUrlLineEdit.text.strip(),
                             token=self.ui.serverTokenLineEdit.text.strip(), allow_random=bool(allow_random))

    def _window(self):
        p = self._parameterNode
        if p.useDisplayWindow:
            return None
        if p.windowHigh <= p.windowLow:
            raise ValueError(f"The intensity window {p.windowLow} .. {p.windowHigh} is empty: make the "
                             "upper value larger than the lower one, or use the volume's display window.")
        return (p.windowLow, p.windowHigh)

    # --- dependencies ---------------------------------------------------------------------
    def ensureDependencies(self, force_dialog=False):
        """Install what is missing (asking first). Returns True when the engine can run now."""
        from MedSAM2Lib import install

        mode = "remote" if self.ui.serverUrlLineEdit.text.strip() else "local"
        plan = install.describe_plan(mode)
        if not plan:
            problem = install.importable(mode)
            if problem is None:
                if force_dialog:
                    slicer.util.infoDisplay("Everything MedSAM2 needs is installed.")
                return True
            if slicer.util.confirmYesNoDisplay(
                    f"MedSAM2's packages are installed but cannot be loaded yet ({problem}). Slicer needs "
                    "a restart to load them. Restart now?"):
                slicer.util.restart()
            return False
        text = ("MedSAM2 needs these Python packages in Slicer (a few GB with PyTorch; needs network; "
                "may take several minutes):\n\n" + "\n".join(plan) + "\n\nInstall now?")
        if not slicer.util.confirmOkCancelDisplay(text, "MedSAM2: install packages"):
            return False
        try:
            with slicer.util.tryWithErrorDisplay("MedSAM2: installation failed.", waitCursor=True):
                if install.torch_missing(mode):
                    self._installTorch()
                install.install(install.missing(mode), slicer.util.pip_install,
                                on_step=lambda n, total, req: slicer.util.showStatusMessage(
                                    f"MedSAM2: installing {req.pin} ({n + 1}/{total})"))
        except Exception:
            return False
        problem = install.importable(mode)
        if problem is not None:
            if slicer.util.confirmYesNoDisplay(
                    f"Installation finished, but Slicer must restart to load the packages ({problem}). "
                    "Restart now?"):
                slicer.util.restart()
            return False
        slicer.util.showStatusMessage("MedSAM2: packages installed.", 3000)
        return True

    def _installTorch(self):
        from MedSAM2Lib.install import TORCH_MINIMUM

        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("MedSAM2 installs PyTorch through the PyTorch extension, which is missing. "
                               "Install 'PyTorch' from the Extensions Manager, restart Slicer, then try again.")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}")
        if torch is None:
            raise RuntimeError("PyTorch was not installed. Open the 'PyTorch Utils' module to install it, "
                               "then try again.")

    def onDownloadModel(self):
        if not self.ensureDependencies():
            return
        try:
            holder = self.logic.modelHolder(self.modelSettings())
        except Exception as exc:
            self._showError(exc)
            return
        if holder.loaded:
            slicer.util.showStatusMessage("MedSAM2: model ready.", 3000)
            return
        self._loadModel(holder, then=None)

    # --- prompt placement -----------------------------------------------------------------
    def _setTool(self, tool):
        self._uncheckTools(keep=tool)
        self._tool = tool
        self._boxCorner = None
        if tool is None:
            self._stopPlacing()
            return
        if not self._readyForPrompts():
            self._setTool(None)
            return
        self._tool = tool  # (the checks above may have reset it)
        node = self.logic.promptNode("box" if tool == "box" else "points")
        if not self.hasObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onMarkupPlaced):
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onMarkupPlaced)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def _onInteractionModeChanged(self, caller, event):
        placing = caller.GetCurrentInteractionMode() == caller.Place
        ours = slicer.app.applicationLogic().GetSelectionNode().GetActivePlaceNodeID() in {
            n.GetID() for n in self.logic.promptNodes()}
        if self._tool is not None and not (placing and ours):
            self._uncheckTools()
            self._tool = None
            self._boxCorner = None

    def _uncheckTools(self, keep=None):
        for name, button in (("include", self.ui.includePointButton), ("exclude", self.ui.excludePointButton),
                             ("box", self.ui.boxButton)):
            if name != keep and button.checked:
                button.blockSignals(True)
                button.checked = False
                button.blockSignals(False)

    def _stopPlacing(self):
        app_logic = slicer.app.applicationLogic() if slicer.app else None
        interaction = app_logic.GetInteractionNode() if app_logic else None
        if interaction is not None and interaction.GetCurrentInteractionMode() == interaction.Place:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)

    def _readyForPrompts(self):
        p = self._parameterNode
        if p is None or p.volume is None:
            slicer.util.errorDisplay("Select the volume to segment first.")
            return False
        if p.segmentation is None or not p.segmentId:
            self.onAddSegment()
        return self.ensureDependencies()

    def _onMarkupPlaced(self, caller, event):
        n = caller.GetNumberOfControlPoints()
        if n == 0 or self._tool is None:
            return
        ras = [0.0, 0.0, 0.0]
        caller.GetNthControlPointPositionWorld(n - 1, ras)
        sliceNode = self._sliceNodeUnderCursor()
        if sliceNode is None:
            caller.RemoveNthControlPoint(n - 1)
            slicer.util.errorDisplay("Place MedSAM2 prompts in a slice view (Red, Yellow or Green), "
                                     "not in the 3D view.")
            return
        if self._tool in ("include", "exclude"):
            include = self._tool == "include"
            caller.SetNthControlPointSelected(n - 1, include)  # selected colour = include (green)
            caller.SetNthControlPointLocked(n - 1, True)
            self.placePoint(ras, sliceNode, include, marker=Marker.for_point(caller, n - 1))
        elif self._boxCorner is None:
            self._boxCorner = (ras, sliceNode)
        else:
            first, _ = self._boxCorner
            self._boxCorner = None
            caller.RemoveAllControlPoints()
            self.placeBox(first, ras, sliceNode)

    def _sliceNodeUnderCursor(self):
        """The slice view the mouse is in (where the prompt was just placed)."""
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is None:
            return None
        xyz = [0.0, 0.0, 0.0]
        return crosshair.GetCursorPositionXYZ(xyz)

    # --- actions (each runs its engine part on the worker) --------------------------------
    def placePoint(self, ras, sliceNode, include=True, marker=None):
        normal = _slice_normal(sliceNode)
        self._lastSliceNode = sliceNode
        self._enqueue(lambda: self._runPrompt(lambda s: s.prepare_point(ras, include, normal), marker))

    def placeBox(self, ras_a, ras_b, sliceNode):
        normal = _slice_normal(sliceNode)
        self._lastSliceNode = sliceNode
        roi = self.logic.showBox(ras_a, ras_b, normal)
        self._enqueue(lambda: self._runPrompt(lambda s: s.prepare_box(ras_a, ras_b, normal), Marker(roi)))

    def onUseEditedSlice(self):
        sliceNode = self._currentSliceNode()
        if sliceNode is None or not self._readyForPrompts():
            return
        center, normal = _slice_center(sliceNode), _slice_normal(sliceNode)
        self._enqueue(lambda: self._runPrompt(lambda s: s.prepare_edited_slice(self._onSlice(s, center, normal), normal),
                                              None))

    def onPropagate(self, direction=None):
        p = self._parameterNode
        if p is None:
            return
        direction = direction or p.direction
        rng = (p.rangeFirst, p.rangeLast) if p.limitRange else None
        self._enqueue(lambda: self._runPropagation(direction, None, rng))

    def onRefine(self):
        sliceNode = self._currentSliceNode()
        if sliceNode is None:
            return
        center, normal = _slice_center(sliceNode), _slice_normal(sliceNode)
        p = self._parameterNode
        rng = (p.rangeFirst, p.rangeLast) if p.limitRange else None
        self._enqueue(lambda: self._runPropagation("both", (center, normal), rng))

    def onRangeFromView(self):
        sliceNode = self._currentSliceNode()
        session = self._session() if sliceNode is not None else None
        if session is None:
            return
        try:
            layout = session.layout(_slice_normal(sliceNode))
            frame = session.frame_index(_slice_center(sliceNode), _slice_normal(sliceNode))
        except ValueError as exc:
            self._showError(exc)
            return
        p = self._parameterNode
        p.limitRange = True
        p.rangeFirst, p.rangeLast = max(0, frame - 10), min(layout.num_frames - 1, frame + 10)

    def _currentSliceNode(self):
        """The view of the last prompt, else the Red view."""
        node = getattr(self, "_lastSliceNode", None)
        if node is not None and node.GetScene() is slicer.mrmlScene:
            return node
        layoutManager = slicer.app.layoutManager()
        widget = layoutManager.sliceWidget("Red") if layoutManager else None
        return widget.mrmlSliceNode() if widget else None

    @staticmethod
    def _onSlice(session, center, normal):
        """A point on the current slice inside the volume (the slice centre may be panned away)."""
        return session.point_on_slice(center, normal)

    def onUndo(self):
        session = self._session(create=False)
        if session is None or self.logic.worker.busy:
            return
        action = session.undo()
        if action is not None:
            self.logic.markers.undone(session, action)  # hidden: redo shows it again
        self._updateButtons()

    def onRedo(self):
        session = self._session(create=False)
        if session is None or self.logic.worker.busy:
            return
        action = session.redo()
        if action is not None:
            self.logic.markers.redone(session, action)
        self._updateButtons()

    def onCancel(self):
        for task in self.logic.runningTasks():
            task.cancel.set()
        self._pending.clear()

    # --- the worker path ------------------------------------------------------------------
    def _session(self, create=True, quiet=False):
        p = self._parameterNode
        if p is None or p.volume is None or p.segmentation is None or not p.segmentId:
            return None
        try:
            return self.logic.session(p.volume, p.segmentation, p.segmentId, self.modelSettings(),
                                      p.memory, self._window(), create=create, axes=p.axes, image_set=p.imageSet)
        except Exception as exc:
            if not quiet:
                self._showError(exc)
            return None

    def _enqueue(self, action):
        self._pending.append(action)
        self._startNext()

    def _startNext(self):
        if self.logic.worker.busy or not self._pending:
            self._updateButtons()
            return
        action = self._pending.pop(0)
        action()
        self._updateButtons()
        if not self.logic.worker.busy:  # the action failed before reaching the worker
            self._startNext()

    def _ensureModel(self, then):
        """Run `then` now if the model is loaded, else after loading it on the worker."""
        session = self._session()
        if session is None:
            return
        holder = session.model
        if holder.loaded:
            then(session)
        else:
            self._loadModel(holder, then=lambda: then(session))

    def _loadModel(self, holder, then):
        self._showProgress(f"Loading {holder.settings.describe()}...", 0, 0)

        def load(emit, cancel):
            holder.get(on_progress=lambda done, total: emit((done, total)), cancel=cancel)

        def progress(item):
            done, total = item
            if total:
                self._showProgress(f"Downloading the model: {done / 2**20:.0f} of {total / 2**20:.0f} MB",
                                   done // 2**20, total // 2**20)

        def done(_):
            self._hideProgress()
            if then is not None:
                then()

        self._submit(load, done, progress, name="load model")

    def _runPrompt(self, prepare, marker):
        def start(session):
            try:
                job = prepare(session)
            except Exception as exc:
                self._removeMarker(marker)
                self._showError(exc)
                return

            def done(_):
                action = job.commit()
                if action is not None:
                    self.logic.markers.attach(session, action, marker)
                self.logic.markers.prune(session)  # a new action ends the redo history
                self._updateButtons()

            def failed(exc):
                job.commit()  # forgets the refused prompt
                self._removeMarker(marker)
                self._showError(exc)

            self._submit(lambda emit, cancel: job.compute(), done, None, name="prompt", on_error=failed)

        self._ensureModel(start)

    def _runPropagation(self, direction, refine_at, slice_range):
        def start(session):
            try:
                start_frame = None
                normal = None
                if refine_at is not None:
                    center, normal = refine_at
                    start_frame = session.frame_index(center, normal)
                job = session.prepare_propagation(direction, start=start_frame, slice_range=slice_range,
                                                  slice_normal=normal)
            except Exception as exc:
                self._showError(exc)
                return
            self._frameBuffer = {}

            def run(emit, cancel):
                for frame, mask in job.frames(cancel):
                    emit((frame, mask))

            def item(payload):
                frame, mask = payload
                self._frameBuffer[frame] = mask

            def finish(exc=None):
                self._flushFrames()
                job.commit()
                self.logic.markers.prune(session)
                self._propagation = None
                self._hideProgress()
                if exc is not None:
                    self._showError(exc)
                self._updateButtons()

            self._showProgress("Propagating...", 0, max(job.steps_total, 1))
            task = self._submit(run, lambda _: finish(), item, name="propagate", on_error=finish)
            self._propagation = (job, task)

        self._ensureModel(start)

    def _submit(self, fn, on_done, on_item, name, on_error=None):
        def failed(exc):
            self._hideProgress()
            (on_error or self._showError)(exc)

        task = self.logic.worker.submit(fn, on_done=on_done, on_error=failed, on_item=on_item, name=name)
        self.logic.track(task)
        self._timer.start()
        return task

    def _drain(self):
        self.logic.worker.drain()
        self._flushFrames()
        self._showPropagationProgress()
        if not self.logic.worker.busy:
            self._timer.stop()
            self._startNext()
        self._updateButtons()

    def _flushFrames(self):
        """Write the frames finished since the last tick in one go (results appear as they come)."""
        if not self._frameBuffer or self._propagation is None:
            return
        job, _ = self._propagation
        frames, self._frameBuffer = self._frameBuffer, {}
        try:
            job.apply(frames)
        except Exception as exc:
            self._propagation[1].cancel.set()
            self._showError(exc)

    def _showPropagationProgress(self):
        """Progress in engine steps (a fused run moves the bar through its three axes too)."""
        if self._propagation is None:
            return
        job, _ = self._propagation
        what = "three axes, then fusing" if job.steps_total != job.total else "slices"
        self._showProgress(f"Propagating... {job.steps} of about {job.steps_total} ({what})",
                           min(job.steps, job.steps_total), max(job.steps_total, 1))

    # --- feedback -------------------------------------------------------------------------
    def _removeMarker(self, marker):
        if marker is not None:
            marker.remove()

    def _showProgress(self, text, value, maximum):
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.progressBar.maximum = maximum
        self.ui.progressBar.value = value
        self.ui.statusLabel.text = text

    def _hideProgress(self):
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.ui.statusLabel.text = ""

    def _showError(self, exc):
        import medsam2

        if isinstance(exc, medsam2.CheckpointError):
            title, what = "MedSAM2: model problem", str(exc)
        elif isinstance(exc, medsam2.ServerError):
            title, what = "MedSAM2: server problem", f"{exc}\n\nCheck the server URL and token in Settings."
        elif isinstance(exc, (medsam2.InputError, ValueError)):
            title, what = "MedSAM2", str(exc)
        else:
            title, what = "MedSAM2: unexpected error", f"{exc.__class__.__name__}: {exc}"
        detail = getattr(exc, "medsam2_traceback", None)
        logging.error(f"{title}: {what}" + (f"\n{detail}" if detail else ""))
        slicer.util.errorDisplay(what, windowTitle=title, detailedText=detail or "")

    def _updateButtons(self):
        busy = self.logic is not None and self.logic.worker.busy
        p = self._parameterNode
        ready = bool(p and p.volume and p.segmentation and p.segmentId)
        session = self._session(create=False, quiet=True) if ready else None
        self.ui.propagateButton.enabled = ready and not busy
        self.ui.refineButton.enabled = ready and not busy
        self.ui.useEditedSliceButton.enabled = ready and not busy
        self.ui.undoButton.enabled = bool(session and session.can_undo) and not busy
        self.ui.redoButton.enabled = bool(session and session.can_redo) and not busy

    # --- shortcuts ------------------------------------------------------------------------
    def _installShortcuts(self):
        if self._shortcuts:
            return
        handlers = {
            "I": lambda: self.ui.includePointButton.click(),
            "X": lambda: self.ui.excludePointButton.click(),
            "O": lambda: self.ui.boxButton.click(),
            "Esc": lambda: self._setTool(None),
            "Shift+P": lambda: self.onPropagate(None),
            "Shift+U": lambda: self.onPropagate("up"),
            "Shift+D": lambda: self.onPropagate("down"),
            "Shift+R": self.onRefine,
            "Shift+E": self.onUseEditedSlice,
            "Ctrl+Z": self.onUndo,
            "Ctrl+Y": self.onRedo,
            "Ctrl+Shift+Z": self.onRedo,
        }
        assert set(handlers) == {k for k, _ in SHORTCUTS}, "help text and bindings must agree"
        for key, handler in handlers.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.connect("activated()", handler)
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self):
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []


class MedSAM2Logic(ScriptedLoadableModuleLogic):
    """Sessions, the model and the worker. Usable from the Python console:

    logic = slicer.util.getModuleLogic("MedSAM2")
    session = logic.session(volumeNode, segmentationNode, segmentId, ModelSettings(...))
    session.add_point(ras, slice_normal=(0, 0, 1)); session.propagate()
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.worker = Worker()
        self._holders = {}
        self._sessions = {}
        self._tasks = []
        self._promptNodes = {}
        self.markers = PromptMarkers()  # prompt markers in the views, in step with undo/redo
        # keep checkpoints in Slicer's cache folder unless the user chose another place
        if getattr(slicer, "app", None) is not None and "MEDSAM2_CACHE_DIR" not in os.environ:
            os.environ["MEDSAM2_CACHE_DIR"] = os.path.join(slicer.app.cachePath, "MedSAM2")

    def getParameterNode(self):
        return MedSAM2ParameterNode(super().getParameterNode())

    def modelHolder(self, settings):
        if settings not in self._holders:
            self._holders[settings] = ModelHolder(settings)
        return self._holders[settings]

    def useModel(self, settings, model):
        """Use an already loaded model (or remote client) for these settings (tests, console)."""
        holder = self.modelHolder(settings)
        holder._model = model
        return holder

    def session(self, volumeNode, segmentationNode, segmentId, settings, memory="self-sorting", window=None,
                create=True, axes="one", image_set=False):
        from MedSAM2Lib import SegmentationSession

        target = (volumeNode.GetID(), segmentationNode.GetID(), segmentId)
        key = (settings, memory, tuple(window) if window else None, axes, bool(image_set))
        entry = self._sessions.get(target)
        if entry is not None and entry[0] == key:
            return entry[1]
        if not create:
            return None
        if entry is not None:
            self.markers.forget_session(entry[1])
            entry[1].close()
        session = SegmentationSession(volumeNode, segmentationNode, segmentId, self.modelHolder(settings),
                                      memory=memory, window=window, axes=axes, image_set=image_set)
        self._sessions[target] = (key, session)
        return session

    def closeSessions(self):
        for _, session in self._sessions.values():
            self.markers.forget_session(session)  # its prompts leave the engine: their markers go too
            session.close()
        self._sessions.clear()
        self._promptNodes.clear()

    def track(self, task):
        self._tasks = [t for t in self._tasks if not t.cancel.is_set()][-8:] + [task]

    def runningTasks(self):
        return list(self._tasks)

    def promptNode(self, kind):
        """The markups node that shows prompts of this kind ('points' or 'box')."""
        node = self._promptNodes.get(kind)
        if node is not None and node.GetScene() is slicer.mrmlScene:
            return node
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"MedSAM2 {kind}")
        node.SetSaveWithScene(False)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetSelectedColor(0.2, 0.9, 0.2)  # include points
        display.SetColor(0.95, 0.2, 0.2)         # exclude points
        display.SetPointLabelsVisibility(False)
        display.SetGlyphScale(2.0)
        self._promptNodes[kind] = node
        return node

    def promptNodes(self):
        return [n for n in self._promptNodes.values() if n.GetScene() is slicer.mrmlScene]

    def showBox(self, ras_a, ras_b, normal):
        """An ROI outlining a box prompt (display only)."""
        import numpy as np

        a, b, n = np.asarray(ras_a, float), np.asarray(ras_b, float), np.asarray(normal, float)
        n = n / np.linalg.norm(n)
        b = b - np.dot(b - a, n) * n  # both corners on the slice of the first
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "MedSAM2 box")
        roi.SetSaveWithScene(False)
        roi.CreateDefaultDisplayNodes()
        roi.SetXYZ(*((a + b) / 2))
        roi.SetRadiusXYZ(*np.maximum(np.abs(b - a) / 2, 0.5))
        roi.SetLocked(True)
        return roi

    def shutdown(self):
        self.closeSessions()
        for holder in self._holders.values():
            try:
                holder.close()
            except Exception:  # the server may be gone; nothing to save
                pass
        self.worker.stop(timeout=1.0)


class MedSAM2Test(ScriptedLoadableModuleTest):
    """On CTChest: prompts in each of the three views, propagation, a correction, undo.

    Runs the real engine with random test weights (no download): it checks the plumbing, not the
    anatomy. Run it from the module's Reload & Test button or with Slicer's test runner.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_MedSAM2_three_views_propagate_correct_undo()
        self.setUp()
        self.test_MedSAM2_widget_prompt_through_worker()

    def _scene(self):
        import SampleData

        volume = SampleData.SampleDataLogic().downloadCTChest()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAM2 test")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "lesion")
        return volume, segmentation, segmentId

    def _model(self):
        import tempfile

        import medsam2
        from medsam2.testing import write_random_checkpoint

        path = write_random_checkpoint(os.path.join(tempfile.mkdtemp(), "random.pt"), image_size=256)
        return medsam2.load_model("sam2.1_hiera_tiny", checkpoint=str(path), device="auto", image_size=256)

    def _center(self, volume):
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        return [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]

    def test_MedSAM2_three_views_propagate_correct_undo(self):
        import numpy as np

        from MedSAM2Lib import SegmentationSession

        self.delayDisplay("Loading CTChest and a random-weight test model")
        volume, segmentation, segmentId = self._scene()
        session = SegmentationSession(volume, segmentation, segmentId, self._model())
        center = self._center(volume)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *center)
        layoutManager = slicer.app.layoutManager()

        def segment():
            return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume).astype(bool)

        for view in ("Red", "Yellow", "Green"):
            sliceNode = layoutManager.sliceWidget(view).mrmlSliceNode()
            before = segment()
            action = session.add_point(center, include=True, slice_normal=_slice_normal(sliceNode))
            changed = np.flatnonzero((segment() != before).reshape(-1))
            self.assertEqual(len(action.frames), 1 if len(changed) else 0, view)
            self.delayDisplay(f"Point in the {view} view changed {len(changed)} voxels on one slice")

        red = layoutManager.sliceWidget("Red").mrmlSliceNode()
        frame = session.frame_index(center, _slice_normal(red))
        session.add_point(center, include=True, slice_normal=_slice_normal(red))
        before = segment()
        action = session.propagate("both", slice_range=(frame - 3, frame + 3), slice_normal=_slice_normal(red))
        self.assertTrue(action.frames, "propagation wrote other slices")
        after = segment()
        corrected = session.add_point(center, include=False, slice_normal=_slice_normal(red))
        self.assertEqual(corrected.kind, "point")
        session.undo()
        np.testing.assert_array_equal(segment(), after)
        session.undo()
        np.testing.assert_array_equal(segment(), before)
        self.delayDisplay("Three views, propagation, correction and undo: OK")

    def test_MedSAM2_widget_prompt_through_worker(self):
        import time

        self.delayDisplay("Prompt through the module's worker thread")
        volume, segmentation, segmentId = self._scene()
        slicer.util.selectModule("MedSAM2")
        widget = slicer.util.getModuleWidget("MedSAM2")
        p = widget._parameterNode
        p.volume, p.segmentation, p.segmentId = volume, segmentation, segmentId
        widget.logic.useModel(widget.modelSettings(), self._model())
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        center = self._center(volume)
        widget.placePoint(center, red, include=True)
        deadline = time.time() + 300
        while (widget.logic.worker.busy or widget._pending) and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        session = widget._session(create=False)
        self.assertTrue(session is not None and session.can_undo, "the prompt was committed")
        widget.onUndo()
        self.assertFalse(session.can_undo)
        self.delayDisplay("Widget path: OK")
