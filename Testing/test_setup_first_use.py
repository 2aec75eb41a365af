"""After the README's setup, in a new shell (issue 20.1-2): `medsam2` is on PATH (install.sh's last
step, scripts/link_command.sh, run here for real in a temporary HOME), the web extra is part of the
default install, and a missing optional part says in one line the command that installs it into
this environment (a real virtual environment without it, not a mock)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _link(home, path, **extra):
    env = {"HOME": str(home), "PATH": path, "MEDSAM2_PYTHON": sys.executable, **extra}
    return subprocess.run(["bash", str(ROOT / "scripts" / "link_command.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def _new_shell(home, path, command):
    return subprocess.run(["bash", "-c", command], env={"HOME": str(home), "PATH": path}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture()
def home(tmp_path):
    if not (VENV_BIN / "medsam2").exists():
        pytest.skip("this Python has no medsam2 command (pip install -e . makes it)")
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_install_links_medsam2_into_a_folder_on_path_and_a_new_shell_runs_it(home):
    path = f"{home}/.local/bin:/usr/bin:/bin"  # as Debian's ~/.profile sets it once ~/.local/bin exists
    assert _new_shell(home, path, "medsam2 --version").returncode == 127  # command not found, before
    done = _link(home, path)
    assert done.returncode == 0, done.stderr
    assert os.readlink(home / ".local" / "bin" / "medsam2") == str(VENV_BIN / "medsam2")
    assert "works in new shells" in done.stdout
    shell = _new_shell(home, path, "medsam2 --version")
    assert shell.returncode == 0 and shell.stdout.startswith("medsam2 "), shell.stderr
    assert _link(home, path).returncode == 0  # again: the same link, no complaint


def test_without_a_writable_folder_on_path_it_says_how_to_add_one(home):
    done = _link(home, "/usr/bin:/bin")
    assert done.returncode == 0 and (home / ".local" / "bin" / "medsam2").is_symlink()
    assert f"{home}/.local/bin is not on your PATH: add it" in done.stdout


def test_a_medsam2_that_is_not_ours_is_left_alone(home):
    bin_dir = home / ".local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "medsam2").write_text("#!/bin/sh\necho mine\n")
    done = _link(home, f"{bin_dir}:/usr/bin:/bin")
    assert done.returncode == 0 and "Left" in done.stderr
    assert (bin_dir / "medsam2").read_text() == "#!/bin/sh\necho mine\n"


def test_install_sh_installs_the_web_extra_by_default_and_links_last():
    lines = [line.strip() for line in (ROOT / "scripts" / "install.sh").read_text().splitlines()]
    assert 'pip_install -e ".[web]"' in lines and 'pip_install -e ".[test,web,batch]"' in lines
    assert lines[-1] == "bash scripts/link_command.sh"


def test_medsam2_web_without_the_web_extra_names_the_install_command(tmp_path, ct_path):
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    python = tmp_path / "bare" / "bin" / "python"
    run = subprocess.run([str(python), "-m", "medsam2.cli", "web", str(ct_path)], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "MedSAM2Slicer")}, timeout=120)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert f"{python} -m pip install -e '{ROOT}[web]'" in run.stderr and "scripts/install.sh" in run.stderr


def test_the_readme_screenshot_is_credited_to_the_test_that_takes_it():
    readme = (ROOT / "README.md").read_text()
    shot = "web-page-after-click-and-propagation.jpg"
    caption = readme[readme.index(shot):readme.index(shot) + 600]
    assert "Testing/test_web.py -k propagate_scroll" in caption
    assert f'web.keep_page_screenshot(page, "{shot}")' in (ROOT / "Testing" / "test_web.py").read_text()
    performance = (ROOT / "docs" / "performance.md").read_text()
    assert "screenshot in the README is from this run" not in performance
    assert shot not in (ROOT / "MedSAM2Slicer" / "MedSAM2Web" / "bench.py").read_text()
