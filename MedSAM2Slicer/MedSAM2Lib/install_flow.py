"""The first-use install conversation, without Qt: what to ask, what to install, what to say.

The shell passes its dialogs in (`InstallUI`: Slicer's slicer.util dialogs, or a test's record),
so the order of questions and the one-error-dialog rule are tested here, not only inside Slicer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import install


@dataclass
class InstallUI:
    confirm: Callable[[str, str], bool]   # (text, title) -> OK pressed
    inform: Callable[[str], None]
    error: Callable[[str, str], None]     # (text, title)
    offer_restart: Callable[[str], None]  # asks "Restart now?" and restarts if yes
    status: Callable[[str], None]         # a status bar line
    pip_install: Callable                 # slicer.util.pip_install
    install_torch: Callable[[], None]     # through the PyTorch extension


def ensure_installed(mode: str, ui: InstallUI, force_dialog: bool = False,
                     version_of=install.installed_version) -> bool:
    """Install what `mode` ('local' or 'remote') is missing, asking first. True when the engine
    can run now; False when the user declined, an install failed, or Slicer must restart."""
    problem = install.python_problem()
    if problem:
        ui.error(problem, "MedSAM2")
        return False
    plan = install.describe_plan(mode, version_of)
    if not plan:
        problem = install.present(mode)  # looks without importing: the engine's child imports them
        if problem is None:
            if force_dialog:
                ui.inform("Everything MedSAM2 needs is installed.")
            return True
        ui.offer_restart(f"MedSAM2's packages are installed but cannot be found yet ({problem}). Slicer needs a "
                         "restart to see them.")
        return False
    text = ("MedSAM2 needs these Python packages in Slicer (a few GB with PyTorch; needs network; may take several "
            "minutes):\n\n" + "\n".join(plan) + "\n\nInstall now?")
    if not ui.confirm(text, "MedSAM2: install packages"):
        return False
    # Slicer >= 5.11's pip_install shows a failure (with pip's log) in its own dialog: one is enough
    own_dialog = install.pip_shows_errors(ui.pip_install)
    pip = (lambda args: ui.pip_install(args, requester="MedSAM2")) if own_dialog else ui.pip_install
    try:
        if install.torch_missing(mode, version_of):
            ui.install_torch()
        install.install(install.missing(mode, version_of), pip,
                        on_step=lambda n, total, req: ui.status(f"MedSAM2: installing {req.pin} ({n + 1}/{total})"))
    except Exception as exc:
        ui.status(f"MedSAM2: installation failed: {exc}")
        if not own_dialog:
            ui.error(str(exc), "MedSAM2: installation failed")
        return False
    problem = install.present(mode)
    if problem is not None:
        ui.offer_restart(f"Installation finished, but Slicer must restart to find the packages ({problem}).")
        return False
    ui.status("MedSAM2: packages installed.")
    return True
