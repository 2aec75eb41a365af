"""MedSAM2 module: prompt a segment in any slice view, propagate it through the volume.

The Qt shell only: widgets, prompt placement, shortcuts, the install dialog and a 40 ms timer.
What the module does lives in MedSAM2Lib's ModuleController (no Qt; tested on slicer-core and
shared with the web front end). The engine runs in a child process (or on a server): Slicer's
main thread keeps Python's GIL while Qt idles, so nothing here computes on a Python thread; the
timer only picks up what the engine has finished.
"""

import logging
import os
import sys
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
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

from MedSAM2Lib import install  # noqa: E402  (no torch, no engine: safe before installing)
from MedSAM2Lib.geometry import slice_view_center, slice_view_normal  # noqa: E402
from MedSAM2Lib.models import DEFAULT_MODEL, DEVICES  # noqa: E402
from MedSAM2Lib.shortcuts import help_rows  # noqa: E402

# QSettings keys. The token is stored as plain text in Slicer's settings file (readable by the
# user's account); the docs say so, and a shared machine should use a per-user account.
SETTINGS_URL = "MedSAM2/ServerURL"
SETTINGS_TOKEN = "MedSAM2/ServerToken"
POLL_INTERVAL_MS = 40
DOCS_URL = "https://github.com/medsam2-slicer/SlicerMedSAM2/blob/main/docs/slicer.md"

# (key, what it does) - shown in the help text and bound while the module is open; the one table
# both shells share (MedSAM2Lib/shortcuts.py)
SHORTCUTS = help_rows()


class MedSAM2(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSAM2")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSAM2 for 3D Slicer contributors (SlicerMedSAM2 project)"]
        keys = "".join(f"<li><b>{k}</b>: {_(what)}</li>" for k, what in SHORTCUTS)
        problem = install.python_problem()
        warning = f"<p><b>{problem}</b></p>" if problem else ""
        self.parent.helpText = warning + _("""
Interactive 3D segmentation with MedSAM2 / SAM2: place include/exclude points or a box on a slice
in any slice view aligned with the volume; the slice is segmented at once. Then propagate the
segment through the volume (both ways, up or down, optionally within a slice range). Correct any
slice with more points and <i>Refine from this slice</i>, or paint it in Segment Editor and
<i>Use edited slice</i>. Every action can be undone.""") + f"<p>{_('Keyboard shortcuts (while this module is open):')}</p><ul>{keys}</ul>" + _("""
<p>The first use installs PyTorch (through the PyTorch extension), sam2 and a few packages, then
downloads the model into Slicer's cache. The model runs in a separate process (or on a MedSAM2
server: Settings), so Slicer stays responsive.</p>""") + f'<p><a href="{DOCS_URL}">{_("Documentation")}</a></p>'
        self.parent.acknowledgementText = _("""
Uses SAM 2 (Ravi et al., Meta AI, 2024), MedSAM2 (Ma et al., 2025, bowang-lab) and the self-sorting
memory bank of MedSAM-2 (Zhu et al., 2024). Built on 3D Slicer's ScriptedLoadableModule.""")
        if problem:
            logging.error(f"MedSAM2: {problem}")


@parameterNodeWrapper
class MedSAM2ParameterNode:
    """Module state saved with the scene (the server token is not: it lives in application settings)."""

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
    idleUnloadMinutes: float = 30.0


class MedSAM2Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        # Attributes first: without a parent, ScriptedLoadableModuleWidget.__init__ calls setup()
        # itself. Its super().__init__() initialises VTKObservationMixin (next in the MRO) before
        # that; calling VTKObservationMixin.__init__ afterwards would forget setup's observers.
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._tools = None           # PromptTools: include / exclude / box
        self._observedSegmentation = None
        self._shownSegments = None   # (id, name) pairs in the segment list now
        self._updatingSegments = False
        self._lastTickError = None
        self._reviewStrip = None     # MedSAM2Qt.review_strip.ReviewStrip, made in setup()
        ScriptedLoadableModuleWidget.__init__(self, parent)

    # --- setup ----------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        from MedSAM2Qt.review_strip import ReviewStrip

        self._reviewStrip = ReviewStrip(self.ui.reviewStripWidget.layout())
        # the timer runs while the module is entered or the engine is busy (enter() and _onChanged start it)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._onTick)
        self.logic = MedSAM2Logic(on_error=self._showErrorLater, on_message=self._showMessage,
                                  on_changed=self._onChanged)
        from MedSAM2Lib.prompt_tools import PromptTools
        from MedSAM2Lib.view_watch import SliceViewWatch

        appLogic = slicer.app.applicationLogic()
        self._tools = PromptTools(self.logic.controller, appLogic.GetInteractionNode(), appLogic.GetSelectionNode())
        self._views = SliceViewWatch(self.logic.controller.viewing)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # leaving Place mode (Esc in a view, another module's tool) releases our tool buttons
        self.addObserver(appLogic.GetInteractionNode(), slicer.vtkMRMLInteractionNode.InteractionModeChangedEvent,
                         self._onInteractionModeChanged)

        for tool, button in (("include", self.ui.includePointButton), ("exclude", self.ui.excludePointButton),
                             ("box", self.ui.boxButton)):
            button.connect("toggled(bool)", lambda on, tool=tool: self._setTool(tool if on else None))
        c = self.logic.controller
        for button, handler in ((self.ui.useEditedSliceButton, self.onUseEditedSlice),
                                (self.ui.propagateButton, lambda: self.onPropagate(None)),
                                (self.ui.refineButton, self.onRefine), (self.ui.cancelButton, c.cancel),
                                (self.ui.undoButton, c.undo), (self.ui.redoButton, c.redo),
                                (self.ui.addSegmentButton, self.onAddSegment),
                                (self.ui.setRangeFromViewButton, self.onRangeFromView),
                                (self.ui.checkpointBrowseButton, self.onBrowseCheckpoint),
                                (self.ui.installButton, lambda: self.ensureDependencies(force_dialog=True)),
                                (self.ui.downloadButton, self.onDownloadModel), (self.ui.unloadButton, self.onUnloadModel),
                                (self.ui.nextUncertainButton, self.onNextUncertainSlice)):
            button.connect("clicked()", handler)
        self.ui.segmentComboBox.connect("currentIndexChanged(int)", self.onSegmentSelected)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        # editingFinished fires on every focus-out: the controller acts only on a real change
        self.ui.serverUrlLineEdit.connect("editingFinished()", self._applySettings)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self._applySettings)
        # not bound to the parameter node: its connector follows textChanged, and each keystroke
        # would close the sessions and stop the engine
        self.ui.checkpointLineEdit.connect("editingFinished()", self._onCheckpointEdited)

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = settings.value(SETTINGS_URL, "")
        self.ui.serverTokenLineEdit.text = settings.value(SETTINGS_TOKEN, "")
        self.ui.serverTokenLineEdit.echoMode = qt.QLineEdit.Password
        self._fillModelList()
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.initializeParameterNode()

    def cleanup(self):
        self._removeShortcuts()
        self._views.stop()
        if self._tools is not None:
            self._tools.close()
        self.removeObservers()
        self._timer.stop()
        if self.logic is not None:
            self.logic.controller.shutdown()  # the engine's child process stops with the module

    def enter(self):
        self.initializeParameterNode()
        self._installShortcuts()
        self._views.watch(slicer.util.getNodesByClass("vtkMRMLSliceNode"))  # the engine prepares their slices
        self._timer.start()

    def exit(self):
        self._removeShortcuts()
        self._views.stop()
        self._setTool(None)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event):
        self._setTool(None)
        self.setParameterNode(None)  # the controller itself cancels and waits for running jobs
        self._observeSegmentation(None)  # Clear() restarts node IDs: nothing of this scene stays watched

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
        checkpoint = self.ui.checkpointLineEdit
        if not checkpoint.hasFocus() and checkpoint.text != p.checkpointFile:  # never under the user's typing
            checkpoint.text = p.checkpointFile
        index = self.ui.modelComboBox.findData(p.modelName)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.currentIndex = index
        self.ui.windowLowSpinBox.enabled = not p.useDisplayWindow
        self.ui.windowHighSpinBox.enabled = not p.useDisplayWindow
        self.ui.rangeFirstSpinBox.enabled = p.limitRange
        self.ui.rangeLastSpinBox.enabled = p.limitRange
        self._applySettings()
        self._updateButtons()

    def _applySettings(self):
        """Hand the panel's current settings to the controller (it ignores repeats)."""
        p = self._parameterNode
        if p is None or self.logic is None:
            return
        url, token = self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip()
        settings = qt.QSettings()
        if settings.value(SETTINGS_URL, "") != url or settings.value(SETTINGS_TOKEN, "") != token:
            settings.setValue(SETTINGS_URL, url)
            settings.setValue(SETTINGS_TOKEN, token)
        allow_random = slicer.util.settingsValue("Developer/DeveloperMode", False, converter=slicer.util.toBool)
        from MedSAM2Lib import ModelSettings

        c = self.logic.controller
        try:
            c.set_settings(ModelSettings(name=p.modelName or DEFAULT_MODEL, checkpoint=p.checkpointFile.strip(),
                                         device=p.device, server_url=url, token=token, allow_random=bool(allow_random),
                                         idle_unload_minutes=p.idleUnloadMinutes))
            window = None if p.useDisplayWindow else (p.windowLow, p.windowHigh)
            c.set_options(memory=p.memory, window=window, axes=p.axes, image_set=p.imageSet)
        except ValueError as exc:
            self._showMessage(str(exc))
        c.select(p.volume, p.segmentation, p.segmentId)

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
        self._fillSegmentList()  # SegmentModified comes ~25 times a second while propagating

    def _fillSegmentList(self):
        p = self._parameterNode
        combo = self.ui.segmentComboBox
        segmentationNode = p.segmentation if p else None
        segments = []
        if segmentationNode is not None:
            segmentation = segmentationNode.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                segments.append((segmentId, segmentation.GetSegment(segmentId).GetName()))
        self._updatingSegments = True
        try:
            if segments != self._shownSegments:  # rebuilt only on a real change: an open list stays open
                self._shownSegments = segments
                combo.clear()
                for segmentId, name in segments:
                    combo.addItem(name, segmentId)
            index = combo.findData(p.segmentId) if p else -1
            combo.currentIndex = 0 if index < 0 and combo.count > 0 else index
        finally:
            self._updatingSegments = False
        if p is not None:
            current = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else ""
            if (current or "") != p.segmentId:
                p.segmentId = current or ""

    def onSegmentSelected(self, index):
        if not self._updatingSegments and self._parameterNode is not None:
            self._parameterNode.segmentId = self.ui.segmentComboBox.itemData(index) or ""

    def onAddSegment(self):
        p = self._parameterNode
        if p.volume is None:
            slicer.util.errorDisplay(_("Select the volume to segment first."))
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
        for label, name, note in self.logic.controller.model_choices() or [(DEFAULT_MODEL, DEFAULT_MODEL, "")]:
            combo.addItem(label, name)
            combo.setItemData(combo.count - 1, note, qt.Qt.ToolTipRole)

    def onModelSelected(self, index):
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.modelName = self.ui.modelComboBox.itemData(index)

    def _onCheckpointEdited(self):
        text = self.ui.checkpointLineEdit.text.strip()
        if self._parameterNode is not None and text != self._parameterNode.checkpointFile:
            self._parameterNode.checkpointFile = text

    def onBrowseCheckpoint(self):
        path = qt.QFileDialog.getOpenFileName(self.parent, _("MedSAM2 / SAM2 checkpoint"), "",
                                              _("PyTorch checkpoint (*.pt *.pth);;All files (*)"))
        if path:
            self._parameterNode.checkpointFile = path

    def onDownloadModel(self):
        if self.ensureDependencies():
            self.logic.controller.start_engine()  # downloads if needed; progress shows below

    def onUnloadModel(self):
        unloaded = self.logic.controller.unload_model()
        self._showMessage(_("Model unloaded; its memory is free.") if unloaded else _("No model is loaded."))

    # --- dependencies (MedSAM2Qt.dependencies shows the dialogs) ----------------------------
    def ensureDependencies(self, force_dialog=False):
        """Install what is missing (asking first). Returns True when the engine can run now."""
        from MedSAM2Qt.dependencies import ensure_dependencies

        return ensure_dependencies("remote" if self.ui.serverUrlLineEdit.text.strip() else "local", force_dialog)

    # --- prompt placement (MedSAM2Lib.prompt_tools turns clicks into prompts) --------------
    def _setTool(self, tool):
        self._uncheckTools(keep=tool)
        if tool is not None and not self._readyForPrompts():
            tool = None
            self._uncheckTools()
        if self._tools is not None:
            self._tools.set(tool)  # off: the user's own place mode and active markups node come back

    def _onInteractionModeChanged(self, caller, event):
        if self._tools.interaction_changed():
            self._uncheckTools()

    def _uncheckTools(self, keep=None):
        for name, button in (("include", self.ui.includePointButton), ("exclude", self.ui.excludePointButton),
                             ("box", self.ui.boxButton)):
            if name != keep and button.checked:
                button.blockSignals(True)
                button.checked = False
                button.blockSignals(False)

    def _readyForPrompts(self):
        p = self._parameterNode
        if p is None or p.volume is None:
            slicer.util.errorDisplay(_("Select the volume to segment first."))
            return False
        if p.segmentation is None or not p.segmentId:
            self.onAddSegment()
        return self.ensureDependencies()

    # --- actions --------------------------------------------------------------------------
    def _currentSliceNode(self):
        """The view of the last prompt, else the Red view."""
        node = self._tools.last_slice_node
        if node is not None and node.GetScene() is slicer.mrmlScene:
            return node
        layoutManager = slicer.app.layoutManager()
        widget = layoutManager.sliceWidget("Red") if layoutManager else None
        return widget.mrmlSliceNode() if widget else None

    def _range(self):
        p = self._parameterNode
        return (p.rangeFirst, p.rangeLast) if p.limitRange else None

    def onUseEditedSlice(self):
        sliceNode = self._currentSliceNode()
        if sliceNode is not None and self._readyForPrompts():
            self.logic.controller.use_edited_slice(slice_view_center(sliceNode), slice_view_normal(sliceNode))

    def onPropagate(self, direction=None):
        if self._parameterNode is not None and self._readyForPrompts():
            self.logic.controller.propagate(direction or self._parameterNode.direction, self._range())

    def onRefine(self):
        sliceNode = self._currentSliceNode()
        if sliceNode is not None and self._readyForPrompts():
            self.logic.controller.refine(slice_view_center(sliceNode), slice_view_normal(sliceNode), self._range())

    # --- review: the slices worth a look (docs/review.md) -----------------------------------
    def onNextUncertainSlice(self, backwards=False):
        c = self.logic.controller
        c.attach_view(self._currentSliceNode())
        if c.next_uncertain_slice(backwards=backwards) is None:
            self._showMessage("No uncertain slices")

    def _updateReviewStrip(self):
        c = self.logic.controller
        c.attach_view(self._currentSliceNode())
        self._reviewStrip.show(c.review_cells(), c.show_frame)

    def onRangeFromView(self):
        sliceNode = self._currentSliceNode()
        around = sliceNode and self.logic.controller.slice_range_around(slice_view_center(sliceNode), slice_view_normal(sliceNode))
        if around:
            p = self._parameterNode
            p.limitRange, (p.rangeFirst, p.rangeLast) = True, around

    # --- the timer and feedback -------------------------------------------------------------
    def _onTick(self):
        c = self.logic.controller
        try:
            c.poll()
            self._lastTickError = None
        except Exception as exc:  # never a traceback every 40 ms: log and show it once
            if str(exc) != self._lastTickError:
                self._lastTickError = str(exc)
                logging.exception("MedSAM2: error while polling the engine")
                self._showErrorLater(exc)
        progress = c.progress
        if progress is None and not c.busy and not self.parent.isEntered:
            self._timer.stop()  # idle and out of sight; enter() or the next job starts it again
        visible = progress is not None
        self.ui.progressBar.setVisible(visible)
        self.ui.cancelButton.setVisible(visible)
        self.ui.statusLabel.text = progress.text if visible else ""
        if visible:
            self.ui.progressBar.maximum = progress.maximum
            self.ui.progressBar.value = progress.value

    def _showMessage(self, text):
        slicer.util.showStatusMessage(f"MedSAM2: {text}", 8000)
        logging.info(f"MedSAM2: {text}")

    def _showErrorLater(self, exc):
        """Errors can arise inside VTK/markups callbacks: open the dialog from the event loop."""
        qt.QTimer.singleShot(0, lambda: self._showError(exc))

    def _showError(self, exc):
        from MedSAM2Lib.messages import describe_error

        title, text = describe_error(exc)
        logging.error(f"{title}: {text}")
        slicer.util.errorDisplay(text, windowTitle=title)

    def _onChanged(self):
        """The controller's on_changed: a job was queued or finished, undo state changed."""
        if self.logic is not None and self.logic.controller.busy and not self._timer.isActive():
            self._timer.start()  # a job queued while the module is not entered still runs
        self._updateButtons()

    def _updateButtons(self):
        c = self.logic.controller if self.logic is not None else None
        p = self._parameterNode
        ready = bool(c and p and p.volume and p.segmentation and p.segmentId)
        for button in (self.ui.propagateButton, self.ui.refineButton, self.ui.useEditedSliceButton):
            button.enabled = ready
        self.ui.undoButton.enabled = bool(ready and c.can_undo)
        self.ui.redoButton.enabled = bool(ready and c.can_redo)
        self.ui.nextUncertainButton.enabled = ready
        if c is not None:
            self._updateReviewStrip()

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
            "Ctrl+Z": self.logic.controller.undo,
            "Ctrl+Y": self.logic.controller.redo,
            "Ctrl+Shift+Z": self.logic.controller.redo,
            "N": self.onNextUncertainSlice,
            "Shift+N": lambda: self.onNextUncertainSlice(backwards=True),
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
    """The module's logic for the Python console and the widget: `logic.controller` is
    MedSAM2Lib's ModuleController on Slicer's scene (see docs/slicer.md):

        logic = slicer.util.getModuleLogic("MedSAM2")
        c = logic.controller
        c.select(volumeNode, segmentationNode, segmentId); c.place_point(ras, (0, 0, 1)); c.propagate()
    """

    def __init__(self, on_error=None, on_message=None, on_changed=None):
        ScriptedLoadableModuleLogic.__init__(self)
        from MedSAM2Lib.controller import ModuleController

        # keep checkpoints in Slicer's cache folder unless the user chose another place
        if getattr(slicer, "app", None) is not None and "MEDSAM2_CACHE_DIR" not in os.environ:
            os.environ["MEDSAM2_CACHE_DIR"] = os.path.join(slicer.app.cachePath, "MedSAM2")
        self.controller = ModuleController(slicer.mrmlScene, on_error=on_error, on_message=on_message,
                                           on_changed=on_changed)

    def getParameterNode(self):
        return MedSAM2ParameterNode(super().getParameterNode())


class MedSAM2Test(ScriptedLoadableModuleTest):
    """MedSAM2Lib.selftest on CTChest: prompt, propagation, correction and undo through the engine
    process. Skipped where the engine is not installed (e.g. the extensions build machines)."""

    def setUp(self):
        # slicer.testing.runUnitTest (ctest) loads this class by name: it runs setUp and the test_
        # methods, never runTest, so the skip lives here
        from MedSAM2Lib.selftest import skip_reason

        reason = skip_reason()
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        """Reload and Test calls this (an exception shows 'Test failed'): a skip is a message."""
        from MedSAM2Lib.selftest import skip_reason

        reason = skip_reason()
        if reason:
            self.delayDisplay(reason)
            return
        self.setUp()
        self.test_MedSAM2_prompt_propagate_correct_undo()

    def test_MedSAM2_prompt_propagate_correct_undo(self):
        import SampleData

        from MedSAM2Lib.selftest import run_self_test

        volume = SampleData.SampleDataLogic().downloadCTChest()
        run_self_test(slicer.mrmlScene, volume, say=self.delayDisplay)
