"""What MedSAM2 installs into Slicer's Python, and the checks the module makes before it loads."""

import os
import sys

import pytest


def test_install_plan_pins_versions_and_installs_sam2_without_touching_torch():
    from MedSAM2Lib import install

    present = {"torch": "2.5.1+cu121", "numpy": "1.26.4", "pillow": "10.0.0", "setuptools": "70.0",
               "platformdirs": "4.0", "httpx": "0.28.0", "zstandard": "0.23.0", "fastapi": "0.115.0",
               "uvicorn": "0.34.0"}
    missing = install.missing("local", version_of=present.get)
    assert [r.distribution for r in missing] == ["tqdm", "hydra-core", "iopath", "wheel", "sam2"]
    assert install.pip_arguments(missing[-1]) == "--no-build-isolation --no-deps sam2==1.1.0"
    assert missing[-1].env == {"SAM2_BUILD_CUDA": "0"}
    assert install.torch_missing("local", version_of=present.get) is None
    old_torch = dict(present, torch="2.1.0")
    assert "2.5.1 or newer" in install.torch_missing("local", version_of=old_torch.get)
    assert "PyTorch extension" in install.describe_plan("local", version_of=old_torch.get)[0]
    # a remote server needs neither torch nor sam2
    assert install.torch_missing("remote", version_of={}.get) is None
    assert [r.distribution for r in install.missing("remote", version_of={}.get)] == \
        ["numpy", "platformdirs", "httpx", "zstandard"]
    # the wrong sam2 release is replaced; build tools only come along when something is built
    assert "sam2" in [r.distribution for r in install.missing("local", version_of=dict(present, sam2="1.0").get)]
    no_sam2_needed = dict(present, sam2="1.1.0", tqdm="4.67.1", **{"hydra-core": "1.3.2"}, iopath="0.1.10")
    assert install.missing("local", version_of=no_sam2_needed.get) == []
    # pip runs in order with the package's environment, restored afterwards
    calls = []
    install.install(missing, lambda args: calls.append((args, dict(os.environ).get("SAM2_BUILD_CUDA"))))
    assert [c[0] for c in calls] == [install.pip_arguments(r) for r in missing]
    assert calls[-1][1] == "0" and "SAM2_BUILD_CUDA" not in os.environ

    def broken(args):
        raise OSError("no network")

    with pytest.raises(RuntimeError, match="Installing tqdm==4.67.1 failed: no network.*pip_install"):
        install.install(missing, broken)
    # this environment (the one the tests run in) has everything the engine needs
    assert install.missing("local") == [] and install.torch_missing("local") is None
    assert install.present("local") is None


def test_slicer_older_than_5_10_is_told_what_to_do():
    from MedSAM2Lib import install

    assert install.python_problem((3, 10, 0)) is None and install.python_problem(sys.version_info) is None
    problem = install.python_problem((3, 9, 10))
    assert "Slicer 5.10 or later" in problem and "3.9" in problem and "download.slicer.org" in problem


def test_one_error_dialog_when_slicers_pip_install_shows_its_own():
    """Slicer >= 5.11's pip_install (slicer.packaging) shows an error dialog with the log itself."""
    from MedSAM2Lib import install

    def new_style(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=True,
                  show_progress=True, requester=None, logCallback=None, completedCallback=None):
        pass

    def old_style(requirements):
        pass

    assert install.pip_shows_errors(new_style)
    assert not install.pip_shows_errors(old_style)
    import slicer.util  # the slicer-core wheel's (5.11): no packaging module, no dialog of its own

    assert install.pip_shows_errors(slicer.util.pip_install) == os.path.exists(
        os.path.join(os.path.dirname(slicer.util.__file__), "packaging.py"))


class RecordingUI:
    """The dialogs the install conversation opens, recorded (Qt dialogs cannot run here)."""

    def __init__(self, answer=True, pip=None):
        self.shown = []
        self.answer = answer
        self.pip_calls = []
        self._pip = pip

    def ui(self):
        from MedSAM2Lib.install_flow import InstallUI

        return InstallUI(confirm=lambda text, title: self.shown.append(("confirm", text)) or self.answer,
                         inform=lambda text: self.shown.append(("inform", text)),
                         error=lambda text, title: self.shown.append(("error", text)),
                         offer_restart=lambda text: self.shown.append(("restart", text)),
                         status=lambda text: None,
                         pip_install=self._pip or (lambda args: self.pip_calls.append(args)),
                         install_torch=lambda: self.shown.append(("torch", "")))

    def kinds(self):
        return [kind for kind, _ in self.shown]


MISSING_TQDM = {"torch": "2.5.1", "numpy": "1.26.4", "pillow": "10.0.0", "platformdirs": "4.0", "httpx": "0.28.0",
                "zstandard": "0.23.0", "fastapi": "0.115.0", "uvicorn": "0.34.0", "sam2": "1.1.0",
                "hydra-core": "1.3.2", "iopath": "0.1.10"}


def test_install_conversation_asks_once_then_installs_in_order():
    from MedSAM2Lib.install_flow import ensure_installed

    record = RecordingUI()
    assert ensure_installed("local", record.ui(), version_of=MISSING_TQDM.get) is True
    assert record.kinds() == ["confirm"] and "tqdm==4.67.1" in record.shown[0][1]
    assert record.pip_calls == ["tqdm==4.67.1"]
    declined = RecordingUI(answer=False)
    assert ensure_installed("local", declined.ui(), version_of=MISSING_TQDM.get) is False
    assert declined.pip_calls == []
    everything = RecordingUI()
    assert ensure_installed("local", everything.ui(), force_dialog=True) is True  # this environment has it all
    assert everything.kinds() == ["inform"]


def test_a_failed_install_shows_exactly_one_error_dialog():
    from MedSAM2Lib.install_flow import ensure_installed

    def old_pip(args):
        raise OSError("no network")

    old = RecordingUI(pip=old_pip)
    assert ensure_installed("local", old.ui(), version_of=MISSING_TQDM.get) is False
    assert old.kinds() == ["confirm", "error"] and "no network" in old.shown[1][1]

    requesters = []

    def new_pip(requirements, constraints=None, blocking=True, show_progress=True, requester=None):
        requesters.append(requester)  # Slicer >= 5.11 shows its own error dialog with pip's log, then raises
        raise RuntimeError("pip failed")

    new = RecordingUI(pip=new_pip)
    assert ensure_installed("local", new.ui(), version_of=MISSING_TQDM.get) is False
    assert new.kinds() == ["confirm"] and requesters == ["MedSAM2"], "no second dialog from the module"


def _fresh_python(code):
    """Run `code` in a new interpreter with the module's folder on sys.path (as Slicer has it)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "MedSAM2Slicer"
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(root)!r})\n" + code],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_the_install_check_imports_nothing_into_slicers_process():
    """The engine runs in its child: the first click of a tool must not load torch, sam2, fastapi
    or uvicorn into Slicer (seconds of a frozen main thread, gigabytes of memory)."""
    loaded = _fresh_python(
        "from MedSAM2Lib.install_flow import InstallUI, ensure_installed\n"
        "ui = InstallUI(*[lambda *a: True] * 7)\n"
        "assert ensure_installed('local', ui) is True\n"
        "heavy = ('torch', 'sam2', 'fastapi', 'uvicorn', 'hydra', 'httpx', 'zstandard')\n"
        "print(sorted(m for m in heavy if m in sys.modules))")
    assert loaded == "[]", f"imported into Slicer's process: {loaded}"


def test_the_install_check_names_a_package_that_cannot_be_found():
    # sys.modules[name] = None is Python's way to make a module unfindable (find_spec returns None)
    said = _fresh_python(
        "sys.modules['sam2'] = None\n"
        "from MedSAM2Lib import install, selftest\n"
        "assert install.present('remote') is None\n"
        "print(install.present('local'), '|', selftest.skip_reason())")
    problem, skip = said.split(" | ")
    assert problem == "not found: sam2"
    assert skip == "MedSAM2 engine not installed here (not found: sam2): test skipped"
