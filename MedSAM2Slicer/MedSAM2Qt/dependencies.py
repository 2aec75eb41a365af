"""The install dialogs: what is missing in Slicer's Python is listed and installed after asking
(MedSAM2Lib.install_flow decides; this file only shows Slicer's dialogs and calls its installers)."""

import qt  # noqa: F401  (Slicer's Qt: this module runs inside Slicer only)
import slicer
from slicer.i18n import tr as _

from MedSAM2Lib import install


def ensure_dependencies(mode: str, force_dialog: bool = False) -> bool:
    """Install what is missing for `mode` (local | remote), asking first. True when the engine can run now."""
    from MedSAM2Lib.install_flow import InstallUI, ensure_installed

    def offer_restart(text):
        if slicer.util.confirmYesNoDisplay(text + "\n\n" + _("Restart now?")):
            slicer.util.restart()

    ui = InstallUI(confirm=lambda text, title: slicer.util.confirmOkCancelDisplay(text, title),
                   inform=slicer.util.infoDisplay,
                   error=lambda text, title: slicer.util.errorDisplay(text, windowTitle=title),
                   offer_restart=offer_restart, status=lambda text: slicer.util.showStatusMessage(text, 5000),
                   pip_install=slicer.util.pip_install, install_torch=install_torch)
    return ensure_installed(mode, ui, force_dialog)


def install_torch() -> None:
    """torch through the PyTorch extension (the build that matches the user's GPU driver)."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise RuntimeError(_("MedSAM2 installs PyTorch through the PyTorch extension, which is missing. Install "
                             "'PyTorch' from the Extensions Manager, restart Slicer, then try again."))
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=f">={install.TORCH_MINIMUM}")
    if torch is None:
        raise RuntimeError(_("PyTorch was not installed. Open the 'PyTorch Utils' module to install it, then "
                             "try again."))
