"""What MedSAM2 needs in Slicer's Python, and the pip commands that install it.

No Qt here: the module's install dialog shows `describe_plan()` and runs `install()` with
slicer.util.pip_install. torch itself is left to the PyTorch extension (PyTorchUtils), which picks
the CUDA build that matches the installed driver; everything else is pinned, so every user gets
the versions the engine was tested with.
"""

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass, field

TORCH_MINIMUM = "2.5.1"  # sam2 1.1.0 requires torch>=2.5.1
PYTHON_MINIMUM = (3, 10)  # sam2 1.1.0 requires Python >= 3.10: Slicer 5.10 or later


@dataclass(frozen=True)
class Requirement:
    distribution: str            # name on PyPI
    module: str                  # what `import` needs
    pin: str                     # installed when missing or too old
    minimum: str = None          # an installed version at least this old is accepted
    pip_args: tuple = ()         # extra pip arguments
    env: dict = field(default_factory=dict)  # environment for the pip run
    needed_for: tuple = ("local", "remote")
    build_tool: bool = False     # only needed to build a package that is itself being installed


# Order matters: build tools and sam2's own dependencies before sam2 (installed without build
# isolation and without deps so pip neither builds against nor replaces the PyTorch extension's
# torch); SAM2_BUILD_CUDA=0 skips the optional CUDA extension (it only fills small holes).
REQUIREMENTS = (
    Requirement("numpy", "numpy", "numpy<3", minimum="1.24"),
    Requirement("tqdm", "tqdm", "tqdm==4.67.1", minimum="4.66.1", needed_for=("local",)),
    Requirement("hydra-core", "hydra", "hydra-core==1.3.2", minimum="1.3.2", needed_for=("local",)),
    Requirement("iopath", "iopath", "iopath==0.1.10", minimum="0.1.10", needed_for=("local",)),
    Requirement("pillow", "PIL", "pillow==11.1.0", minimum="9.4.0", needed_for=("local",)),
    Requirement("platformdirs", "platformdirs", "platformdirs==4.3.6", minimum="3.0"),
    # the engine runs in a child process in both modes; locally it holds the model itself, remotely
    # the project's HTTP client (httpx) of a server; zstandard packs masks for either wire
    Requirement("httpx", "httpx", "httpx==0.29.0", minimum="0.27", needed_for=("remote",)),
    Requirement("zstandard", "zstandard", "zstandard==0.25.0", minimum="0.22"),
    Requirement("setuptools", "setuptools", "setuptools>=64", minimum="64", needed_for=("local",), build_tool=True),
    Requirement("wheel", "wheel", "wheel>=0.37", minimum="0.37", needed_for=("local",), build_tool=True),
    Requirement("sam2", "sam2", "sam2==1.1.0", minimum="1.1.0",
                pip_args=("--no-build-isolation", "--no-deps"), env={"SAM2_BUILD_CUDA": "0"},
                needed_for=("local",)),
)


def version_tuple(text):
    """'2.5.1+cu121' -> (2, 5, 1); unparsable parts count as 0."""
    parts = []
    for piece in re.split(r"[.+-]", str(text))[:4]:
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def installed_version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _satisfied(req, version_of):
    version = version_of(req.distribution)
    if version is None:
        return False
    if req.minimum is not None and version_tuple(version) < version_tuple(req.minimum):
        return False
    if req.distribution == "sam2":  # the engine is tested against exactly this release
        return version_tuple(version) == version_tuple("1.1.0")
    return True


def missing(mode="local", version_of=installed_version):
    """Requirements (besides torch) not satisfied for mode 'local' (model in Slicer) or 'remote'."""
    if mode not in ("local", "remote"):
        raise ValueError(f"mode must be 'local' or 'remote', got {mode!r}")
    todo = [r for r in REQUIREMENTS if mode in r.needed_for and not _satisfied(r, version_of)]
    if not any(r.pip_args and "--no-build-isolation" in r.pip_args for r in todo):
        todo = [r for r in todo if not r.build_tool]  # nothing to build: no build tools needed
    return todo


def torch_missing(mode="local", version_of=installed_version):
    """None if torch is fine (or not needed), else a sentence saying what is wrong."""
    if mode != "local":
        return None
    version = version_of("torch")
    if version is None:
        return "PyTorch is not installed."
    if version_tuple(version) < version_tuple(TORCH_MINIMUM):
        return f"PyTorch {version} is installed; MedSAM2 needs {TORCH_MINIMUM} or newer."
    return None


def pip_arguments(req):
    """The argument string for slicer.util.pip_install (which prepends 'pip install')."""
    return " ".join([*req.pip_args, req.pin])


def describe_plan(mode="local", version_of=installed_version):
    """Human-readable lines for the install dialog: what will be installed and how."""
    lines = []
    torch_problem = torch_missing(mode, version_of)
    if torch_problem:
        lines.append(f"{torch_problem} It will be installed by the PyTorch extension "
                     f"(torch>={TORCH_MINIMUM}, the build matching your GPU driver).")
    for req in missing(mode, version_of):
        env = " ".join(f"{k}={v}" for k, v in req.env.items())
        lines.append(f"pip install {pip_arguments(req)}" + (f"  (with {env})" if env else ""))
    return lines


def install(requirements, pip_install, on_step=None):
    """Install `requirements` in order with pip_install(args_string) (slicer.util.pip_install).

    Raises RuntimeError naming the package and what to do when pip fails.
    """
    for n, req in enumerate(requirements):
        if on_step is not None:
            on_step(n, len(requirements), req)
        saved = {k: os.environ.get(k) for k in req.env}
        os.environ.update(req.env)
        try:
            pip_install(pip_arguments(req))
        except Exception as exc:
            raise RuntimeError(
                f"Installing {req.pin} failed: {exc}. Check the network connection (and proxy settings), "
                "then try again; the full pip output is in the Python console. To install by hand, "
                f"run in Slicer's Python console: slicer.util.pip_install('{pip_arguments(req)}')") from exc
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    importlib.invalidate_caches()


def present(mode="local"):
    """None if every package the engine's child imports is there; else what is missing.

    Only looks (importlib.util.find_spec on top-level names, which imports nothing): the engine runs
    in its child process, so importing torch or sam2 here would freeze Slicer's main thread for
    seconds and load gigabytes it never uses. A package that is there but fails to import is
    reported by the child when it starts."""
    names = [r.module for r in REQUIREMENTS if mode in r.needed_for and not r.build_tool]
    names += ["torch"] if mode == "local" else []
    importlib.invalidate_caches()  # packages pip installed a moment ago are seen
    lacking = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken entry in sys.modules
            found = False
        if not found:
            lacking.append(name)
    return f"not found: {', '.join(lacking)}" if lacking else None


def python_problem(version_info=None):
    """None if this Python can run the engine; else what to do (Slicer 5.8 has Python 3.9)."""
    v = tuple(version_info or sys.version_info)[:2]
    if v >= PYTHON_MINIMUM:
        return None
    return (f"MedSAM2 needs Slicer 5.10 or later: its Python is {v[0]}.{v[1]}, and sam2 needs Python "
            f"{PYTHON_MINIMUM[0]}.{PYTHON_MINIMUM[1]} or newer. Install a current Slicer from download.slicer.org.")


def pip_shows_errors(pip_install) -> bool:
    """Whether this Slicer's pip_install reports a failure in its own dialog (Slicer >= 5.11:
    slicer.packaging, with `requester` and `show_progress`), so the module must not show a second."""
    try:
        params = inspect.signature(pip_install).parameters
    except (TypeError, ValueError):
        return False
    if "show_progress" in params or "requester" in params:
        return True
    try:  # slicer.util.pip_install(requirements, **kwargs) forwards to slicer.packaging.pip_install
        import slicer.packaging  # noqa: F401
    except ImportError:
        return False
    return any(p.kind is p.VAR_KEYWORD for p in params.values())
