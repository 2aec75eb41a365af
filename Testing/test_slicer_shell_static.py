"""Static checks of the Qt shell (MedSAM2.py + MedSAM2.ui), which only runs inside Slicer.

Checked against real Slicer code where this machine has it: `slicer.util` names against the
util.py that the slicer-core wheel ships (Slicer's own file), MRML classes, events and methods
against slicer-core's wrapped classes. Qt/CTK/Slicer-widget names that slicer-core lacks are
checked against lists recorded here, each verified by reading Slicer/Slicer (and CTK, Qt 5,
fepegar/SlicerPyTorch) sources; the comment on each list says where.
"""

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MedSAM2Slicer" / "MedSAM2.py"
UI = ROOT / "MedSAM2Slicer" / "Resources" / "UI" / "MedSAM2.ui"

# Qt 5 classes (and enum members) the module uses, as PythonQt exposes them in Slicer's `qt`.
# Verified against the Qt 5 class reference (doc.qt.io/qt-5/classes.html).
QT5 = {
    "QTimer", "QSettings", "QFileDialog", "QShortcut", "QKeySequence", "QLineEdit", "Qt", "QWidget",
    "QLabel", "QPushButton", "QToolButton", "QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox",
    "QProgressBar", "QGridLayout", "QVBoxLayout", "QHBoxLayout", "QFormLayout", "QMessageBox",
}
QT5_MEMBERS = {"QFileDialog.getOpenFileName", "QLineEdit.Password", "Qt.ToolTipRole", "QTimer.singleShot"}
# CTK widgets in the .ui: ctkCollapsibleButton (CTK Libs/Widgets/ctkCollapsibleButton.h; also used
# by Slicer's Utilities/Templates/Modules/Scripted/Resources/UI/TemplateKey.ui).
CTK = {"ctkCollapsibleButton"}
# Slicer Qt widgets in the .ui: Libs/MRML/Widgets/qMRMLWidget.h, Libs/MRML/Widgets/qMRMLNodeComboBox.h.
SLICER_WIDGETS = {"qMRMLWidget", "qMRMLNodeComboBox"}
# slicer.app members: Base/QTCore/qSlicerCoreApplication.h (applicationLogic, cachePath),
# Base/QTGUI/qSlicerApplication.h (layoutManager), QCoreApplication (processEvents).
SLICER_APP = {"applicationLogic", "cachePath", "layoutManager", "processEvents"}
# Python modules of Slicer that the slicer-core wheel lacks (Base/Python/slicer/...):
SLICER_PY_MODULES = {
    "ScriptedLoadableModule": {"ScriptedLoadableModule", "ScriptedLoadableModuleWidget",
                               "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"},
    "parameterNodeWrapper": {"parameterNodeWrapper", "Choice", "WithinRange"},  # __init__ re-exports
    # Base/Python/slicer/i18n.py: tr (aliased `_` as in Slicer's module template) and translate
    "i18n": {"tr", "translate"},
}
# Other Slicer names the module reaches: slicer.app, slicer.mrmlScene, slicer.util (application
# globals set up by Base/Python/slicer/__init__.py).
SLICER_GLOBALS = {"app", "mrmlScene", "util"}
# Widget methods called on qMRMLLayoutManager / qMRMLSliceWidget results:
# Libs/MRML/Widgets/qMRMLLayoutManager.h sliceWidget(name), qMRMLSliceWidget.h mrmlSliceNode().
QT_SIDE_METHODS = {"sliceWidget", "mrmlSliceNode"}
# PyTorchUtilsLogic.installTorch(self, askConfirmation=False, forceComputationBackend=None,
# torchVersionRequirement=None, torchvisionVersionRequirement=None) in fepegar/SlicerPyTorch
# PyTorchUtils/PyTorchUtils.py; SampleDataLogic.downloadCTChest() in Slicer
# Modules/Scripted/SampleData/SampleData.py.
INSTALL_TORCH_KWARGS = {"askConfirmation", "forceComputationBackend", "torchVersionRequirement",
                        "torchvisionVersionRequirement"}
# MRML/VTK classes whose methods the shell calls (checked through slicer-core below)
MRML_CLASSES = ("vtkMRMLScene", "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode", "vtkMRMLMarkupsDisplayNode",
                "vtkMRMLSliceNode", "vtkMRMLCrosshairNode", "vtkMRMLInteractionNode", "vtkMRMLSelectionNode",
                "vtkMRMLSegmentationNode", "vtkSegmentation", "vtkSegment", "vtkSlicerApplicationLogic",
                "vtkMRMLScalarVolumeNode", "vtkMatrix4x4")


@pytest.fixture(scope="module")
def tree():
    return ast.parse(MODULE.read_text(), str(MODULE))


def _chains(tree, root):
    """Every attribute chain starting at the name `root`, e.g. ('util', 'errorDisplay')."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = []
            cur = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == root:
                out.add(tuple(reversed(parts)))
    return out


def _slicer_util_source():
    import slicer

    return Path(slicer.__file__).with_name("util.py")


def test_module_compiles_and_loads_without_the_engine_heavy_parts(tree):
    py_compile.compile(str(MODULE), doraise=True)
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top_imports |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    assert not top_imports & {"torch", "sam2", "numpy", "medsam2"}, \
        "the module must load before the install dialog has installed anything"
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"MedSAM2", "MedSAM2Widget", "MedSAM2Logic", "MedSAM2Test", "MedSAM2ParameterNode"} <= classes


def test_slicer_util_names_exist_in_slicers_util_py(tree):
    util = ast.parse(_slicer_util_source().read_text())
    defined = {n.name: n for n in util.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    used = {c[1] for c in _chains(tree, "slicer") if len(c) > 1 and c[0] == "util"}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "slicer.util"
                for a in n.names}
    assert used and not (used | imported) - set(defined), f"unknown slicer.util names: {(used | imported) - set(defined)}"
    # keyword arguments given to slicer.util functions exist in their signatures
    for call in ast.walk(tree):
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
            continue
        f = call.func
        if isinstance(f.value, ast.Attribute) and f.value.attr == "util" and isinstance(f.value.value, ast.Name) \
                and f.value.value.id == "slicer":
            fn = defined[f.attr]
            if isinstance(fn, ast.ClassDef):  # a class (e.g. WaitCursor): its __init__'s parameters
                fn = next(n for n in fn.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            if fn.args.kwarg is None:
                bad = {k.arg for k in call.keywords if k.arg} - params
                assert not bad, f"slicer.util.{f.attr} has no parameter(s) {bad}"


def test_slicer_names_exist(tree):
    import slicer

    for chain in _chains(tree, "slicer"):
        head = chain[0]
        if head in SLICER_GLOBALS:
            if head == "app" and len(chain) > 1:
                assert chain[1] in SLICER_APP, f"slicer.app.{chain[1]} not verified"
            if head == "mrmlScene" and len(chain) > 1:
                assert hasattr(slicer.vtkMRMLScene, chain[1]), f"vtkMRMLScene has no {chain[1]}"
            continue
        if head in SLICER_PY_MODULES:
            continue
        # a wrapped MRML/VTK class, and the member used on it
        cls = getattr(slicer, head, None)
        assert cls is not None, f"slicer.{head} is not a Slicer class"
        if len(chain) > 1:
            assert hasattr(cls, chain[1]), f"slicer.{head}.{chain[1]} does not exist"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slicer"):
            sub = node.module.split(".", 1)[1] if "." in node.module else None
            for alias in node.names:
                if sub is None:
                    assert hasattr(slicer, alias.name), f"from slicer import {alias.name}: not in Slicer"
                elif sub in SLICER_PY_MODULES:
                    assert alias.name in SLICER_PY_MODULES[sub], f"slicer.{sub}.{alias.name} not verified"


def test_mrml_methods_called_exist_on_the_classes_used(tree):
    """Every CamelCase method the shell calls (VTK style) exists on a class it works with."""
    import slicer
    import vtk

    classes = [getattr(slicer, n, None) or getattr(vtk, n) for n in MRML_CLASSES]
    # calls on qt (checked below), on slicer.util (checked above), on the PyTorchUtils / SampleData
    # modules (verified above) and on the standard library's unittest aside
    other_modules = {"qt", "PyTorchUtils", "SampleData", "unittest"}

    def on_util(func):
        return isinstance(func.value, ast.Attribute) and func.value.attr == "util"

    called = {n.func.attr for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr[:1].isupper()
              and not (isinstance(n.func.value, ast.Name) and n.func.value.id in other_modules)
              and not on_util(n.func)}
    missing = {m for m in called if not any(hasattr(c, m) for c in classes)}
    assert called and not missing, f"methods not found on MRML classes: {missing}"
    lower_calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {"sliceWidget", "mrmlSliceNode"} <= lower_calls | QT_SIDE_METHODS


def test_qt_and_ctk_names_are_qt5_and_ctk_classes(tree):
    for chain in _chains(tree, "qt"):
        assert chain[0] in QT5, f"qt.{chain[0]} is not a verified Qt 5 class"
        if len(chain) > 1:
            assert ".".join(chain[:2]) in QT5_MEMBERS, f"qt.{'.'.join(chain)} not verified"
    assert not _chains(tree, "ctk"), "ctk is used only from the .ui"


def test_torch_install_and_sample_data_calls_match_their_sources(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "installTorch":
            assert {k.arg for k in node.keywords} <= INSTALL_TORCH_KWARGS
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr.startswith("download"):
            assert node.func.attr in {"downloadCTChest", "download"}


def _ui():
    return ET.parse(UI).getroot()  # raises if the XML is malformed


def test_ui_is_valid_and_uses_known_widget_classes():
    root = _ui()
    assert root.tag == "ui" and root.find("class").text == "MedSAM2"
    widgets = root.iter("widget")
    names = []
    for w in widgets:
        cls = w.get("class")
        assert cls in QT5 | CTK | SLICER_WIDGETS, f"unknown widget class {cls}"
        names.append(w.get("name"))
    assert len(names) == len(set(names)), "widget names must be unique"
    for layout in root.iter("layout"):
        assert layout.get("class") in QT5
    for c in root.iter("connection"):
        assert c.find("sender").text in names and c.find("receiver").text in names


def test_every_ui_widget_the_module_looks_up_exists(tree):
    names = {w.get("name") for w in _ui().iter("widget")}
    used = {c[1] for c in _chains(tree, "self") if len(c) > 1 and c[0] == "ui"}
    assert used and not used - names, f"MedSAM2.py uses widgets missing from the .ui: {used - names}"


def test_ui_parameter_bindings_match_the_parameter_node(tree):
    params = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "MedSAM2ParameterNode":
            for item in node.body:
                if isinstance(item, ast.AnnAssign):
                    params[item.target.id] = ast.unparse(item.annotation)
    bound = {}
    for w in _ui().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert set(bound) <= set(params), f"bound to unknown parameters: {set(bound) - set(params)}"
    expected_widget = {"bool": "QCheckBox", "str": "QLineEdit", "float": "QDoubleSpinBox"}
    for name, cls in bound.items():
        annotation = params[name]
        if "Choice" in annotation:
            assert cls == "QComboBox", name
        elif annotation.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", name
        elif "int" in annotation:
            assert cls == "QSpinBox", name
        else:
            assert cls == expected_widget[annotation], name
    # parameters the widget handles by hand (dynamic model list, segment list, checkpoint on editingFinished)
    assert set(params) - set(bound) == {"segmentId", "modelName", "checkpointFile"}


def test_shortcuts_in_help_are_the_ones_bound(tree):
    from MedSAM2Lib.shortcuts import SHORTCUTS

    source = MODULE.read_text()
    assert re.search(r"^SHORTCUTS = help_rows\(\)$", source, re.M), "the Qt shell lists the shared table's keys"
    keys = {k for k, *_ in SHORTCUTS}
    handlers = re.search(r"handlers = \{(.*?)\n        \}", source, re.S).group(1)
    bound = set(re.findall(r'"([^"]+)": ', handlers))
    assert keys == bound and {"I", "X", "O", "Shift+P", "Ctrl+Z", "Ctrl+Y"} <= keys


def test_parameter_node_wrapper_api_matches_slicers_template():
    """connectGui/disconnectGui and the .ui property name, as Slicer's module template uses them."""
    source = MODULE.read_text()
    assert "connectGui(self.ui)" in source and "disconnectGui(self._parameterNodeGuiTag)" in source
    for w in _ui().iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                assert p.get("stdset") == "0"



def test_packaging_covers_every_module_file_and_declares_pytorch():
    cmake = (ROOT / "MedSAM2Slicer" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    assert "MedSAM2Lib/*.py" in cmake and "medsam2/*.py" in cmake  # every engine and adapter file
    for resource in re.findall(r"(Resources/[\w/${}.]+)", cmake):
        path = ROOT / "MedSAM2Slicer" / resource.replace("${MODULE_NAME}", "MedSAM2")
        assert path.is_file(), f"{path} listed in CMakeLists.txt is missing"
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "add_subdirectory(MedSAM2Slicer)" in top and 'set(EXTENSION_DEPENDS "PyTorch")' in top
    s4ext = dict(line.split(" ", 1) for line in (ROOT / "MedSAM2.s4ext").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert s4ext["depends"] == "PyTorch" and s4ext["category"] == "Segmentation"
    from PIL import Image

    for icon in (ROOT / "MedSAM2Slicer" / "Resources" / "Icons" / "MedSAM2.png", ROOT / "Resources" / "MedSAM2.png"):
        assert Image.open(icon).size == (128, 128)


def _function(tree, name):
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(node):
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_no_dialog_opens_inside_the_markups_placement_callback(tree):
    """A modal dialog inside PointPositionDefinedEvent runs while the markups widget is placing the
    point. That callback lives in MedSAM2Lib.prompt_tools (no Qt there); its errors go to the
    controller's on_error, which the shell shows from the event loop."""
    lib = (ROOT / "MedSAM2Slicer" / "MedSAM2Lib" / "prompt_tools.py").read_text()
    assert "PointPositionDefinedEvent" in lib and "self.controller.on_error(" in lib and "import qt" not in lib
    assert "PointPositionDefinedEvent" not in MODULE.read_text(), "the shell observes no placement itself"
    assert "qt.QTimer.singleShot" in _calls(_function(tree, "_showErrorLater"))
    assert "on_error=self._showErrorLater" in ast.unparse(_function(tree, "setup"))


def _self_test_class(tree, scene, shown):
    """MedSAM2Test's own code on unittest.TestCase, which Slicer's ScriptedLoadableModuleTest
    subclasses (Base/Python/slicer/ScriptedLoadableModule.py; delayDisplay shows a message)."""
    import types
    import unittest

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            shown.append(message)

    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSAM2Test")
    namespace = {"ScriptedLoadableModuleTest": ScriptedLoadableModuleTest,
                 "slicer": types.SimpleNamespace(mrmlScene=scene)}
    exec(compile(ast.Module([cls], []), str(MODULE), "exec"), namespace)
    return namespace["MedSAM2Test"]


def test_self_test_is_a_skip_under_ctest_and_a_message_in_reload_and_test(tree, monkeypatch):
    """Where the engine is not installed (the Extensions Index build machines have no torch):
    slicer.testing.runUnitTest loads the test case by name (setUp and test_ methods, never runTest)
    and must report a skip, not an error; Reload and Test calls runTest, where an exception would
    show 'Test failed'."""
    import io
    import sys
    import unittest

    import slicer_fixtures as sf

    monkeypatch.setitem(sys.modules, "sam2", None)  # Python's way to make a package unfindable
    shown = []
    cls = _self_test_class(tree, sf.new_scene(), shown)
    suite = unittest.TestLoader().loadTestsFromTestCase(cls)  # what loadTestsFromName('MedSAM2') finds
    result = unittest.TextTestRunner(stream=io.StringIO()).run(suite)
    assert not result.errors and not result.failures, (result.errors + result.failures)[0][1]
    assert result.wasSuccessful() and len(result.skipped) == 1 and "not found: sam2" in result.skipped[0][1]
    cls().runTest()  # ScriptedLoadableModule.runTest: TestCaseClass().runTest()
    assert shown and "test skipped" in shown[-1]


def test_checkpoint_file_is_applied_when_editing_finishes_not_per_keystroke(tree):
    """The parameter-node connector for a QLineEdit follows textChanged (Slicer's
    parameterNodeWrapper/guiConnectors.py): each keystroke would close every session."""
    checkpoint = next(w for w in _ui().iter("widget") if w.get("name") == "checkpointLineEdit")
    assert not [p for p in checkpoint.findall("property") if p.get("name") == "SlicerParameterName"]
    setup = ast.unparse(_function(tree, "setup"))
    assert "self.ui.checkpointLineEdit.connect('editingFinished()', self._onCheckpointEdited)" in setup
    assert "self._parameterNode.checkpointFile = text" in ast.unparse(_function(tree, "_onCheckpointEdited"))
    assert "hasFocus()" in ast.unparse(_function(tree, "_onParameterNodeModified")), "never overwrite typing"


def _widget_init(tree):
    widget = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSAM2Widget")
    return next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")


def test_widget_attributes_are_set_before_the_base_init_may_call_setup(tree):
    """Without a parent, ScriptedLoadableModuleWidget.__init__ calls setup() itself (and, through
    super(), VTKObservationMixin.__init__ before that)."""
    body = [ast.unparse(stmt) for stmt in _widget_init(tree).body]
    base = [i for i, line in enumerate(body) if line.startswith("ScriptedLoadableModuleWidget.__init__(self")]
    assert base == [len(body) - 1], "the base __init__ must come last"
    assert not any("VTKObservationMixin.__init__" in line for line in body), "it would forget setup's observers"
    assigned = {line.split(" = ")[0] for line in body if line.startswith("self.")}
    assert {"self.logic", "self._parameterNode", "self._tools", "self._observedSegmentation"} <= assigned


def test_errors_while_polling_are_shown_once_and_never_escape_the_timer(tree):
    tick = _function(tree, "_onTick")
    guarded = [t for t in ast.walk(tick) if isinstance(t, ast.Try)]
    assert guarded and "c.poll()" in ast.unparse(guarded[0].body)
    handler = guarded[0].handlers[0]
    assert ast.unparse(handler.type) == "Exception"
    assert "self._lastTickError" in ast.unparse(handler) and "self._showErrorLater(exc)" in ast.unparse(handler)


def test_the_timer_runs_only_while_the_module_is_entered_or_busy(tree):
    assert "self._timer.start()" not in ast.unparse(_function(tree, "setup"))
    assert "self._timer.start()" in ast.unparse(_function(tree, "enter"))
    tick = ast.unparse(_function(tree, "_onTick"))
    assert "self._timer.stop()" in tick and "self.parent.isEntered" in tick and "c.busy" in tick
    changed = ast.unparse(_function(tree, "_onChanged"))
    assert "self._timer.start()" in changed and "busy" in changed
    assert "on_changed=self._onChanged" in ast.unparse(_function(tree, "setup"))


def test_segment_list_is_rebuilt_only_when_segments_change(tree):
    """SegmentModified comes about 25 times a second while propagating; a rebuild closes an open list."""
    fill = _function(tree, "_fillSegmentList")
    ifs = [n for n in ast.walk(fill) if isinstance(n, ast.If) and "self._shownSegments" in ast.unparse(n.test)]
    assert ifs and "combo.clear()" in ast.unparse(ifs[0].body)
    assert ast.unparse(fill).count("combo.clear()") == 1


def test_tool_changes_go_through_prompt_tools_and_scene_close_drops_the_segment_observer(tree):
    """PromptTools (tested on slicer-core with Slicer's Markups logic) drops a pending box corner on
    any tool change; the shell only maps its buttons to it."""
    assert "self._tools.set(tool)" in ast.unparse(_function(tree, "_setTool"))
    assert "self._tools.interaction_changed()" in ast.unparse(_function(tree, "_onInteractionModeChanged"))
    assert "self._observeSegmentation(None)" in ast.unparse(_function(tree, "onSceneStartClose"))


def test_module_follows_slicers_template_conventions(tree):
    source = MODULE.read_text()
    init = ast.unparse(_function(tree, "__init__"))
    contributors = re.search(r"contributors = \[(.*?)\]", source).group(1)
    assert all(re.fullmatch(r'"[^"(]+ \([^")]+\)"', c.strip()) for c in contributors.split(",")), contributors
    assert "self.parent.title = _(" in init and "translate('qSlicerAbstractCoreModule', 'Segmentation')" in init
    assert "<a href=" in source and "DOCS_URL" in init, "the help text links to the documentation"
    assert "from slicer.i18n import tr as _" in source
    # the token lives in QSettings as plain text: the docs say so
    assert "plain text" in (ROOT / "docs" / "slicer.md").read_text()
