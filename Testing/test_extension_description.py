"""The extension's description as the Slicer Extensions Index checks it, offline.

The index (github.com/Slicer/ExtensionsIndex, scripts/check_description_files.py) validates
`<Name>.json` against the schema its `$schema` names, wants the file name to equal the CMake
project name, reads EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS from the top-level
CMakeLists.txt with its own regular expressions and downloads them, wants a LICENSE file, a
repository named Slicer*, an extension name not starting with Slicer, and a repository under
100 MB. Here the schema is the vendored copy (Testing/data/README.md) and the URLs, which cannot be
downloaded offline, must name files of this repository at the revision the description pins.
"""

import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
SCREENSHOT_SCRIPT = ROOT / "scripts" / "make_screenshot.py"
# the index checker's patterns for the top-level CMakeLists.txt
PROJECT = re.compile(r"project\s*\(\s*([^\s\)\n\r]+)", re.IGNORECASE)
ICON_URL = re.compile(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', re.IGNORECASE)
SCREENSHOT_URLS = re.compile(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', re.IGNORECASE)
CMAKE_SET = re.compile(r'set\s*\(\s*(EXTENSION_\w+)\s+"([^"]*)"\s*\)')
PLACEHOLDER = "REPLACE_WITH" + "_OWNER"  # spelt in two parts so that this file does not contain it
REPOSITORY_URL = re.compile(r"https?://[^\s\"'<>)\]]*SlicerMedSAM2[^\s\"'<>)\]]*")


def _cmake():
    return (ROOT / "CMakeLists.txt").read_text()


def _cmake_vars():
    return dict(CMAKE_SET.findall(_cmake()))


def _extension_name():
    return PROJECT.findall(_cmake())[0].strip("\"'")


def _description_path():
    return ROOT / f"{_extension_name()}.json"


def _description():
    return json.loads(_description_path().read_text())


def _s4ext():
    fields = {}
    for line in (ROOT / f"{_extension_name()}.s4ext").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def _repository():
    """The repository URL: the homepage of CMakeLists.txt without its section anchor."""
    return _cmake_vars()["EXTENSION_HOMEPAGE"].split("#")[0]


def _raw_base():
    owner_repo = urlsplit(_repository()).path.strip("/")
    return f"https://raw.githubusercontent.com/{owner_repo}/{_description()['scm_revision']}/"


def _repository_files():
    """Files a clone of this repository has (tracked, and new ones not ignored)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        return [ROOT / p for p in listed.stdout.splitlines() if (ROOT / p).is_file()]
    skip = {".git", ".venv", "__pycache__", "build", "demo_output"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_description_validates_against_the_index_schema():
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    description = _description()
    # the vendored file is the schema the description names
    assert description["$schema"].split("#")[0] == schema["$id"].split("#")[0]
    assert Path(urlsplit(description["$schema"]).path).name == SCHEMA.name
    validator = jsonschema.Draft7Validator(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    assert [e.message for e in validator.iter_errors(description)] == []
    # the check has teeth: the schema's rules reject what the index rejects
    for broken in ({k: v for k, v in description.items() if k != "scm_url"}, {**description, "homepage": "x"},
                   {**description, "build_dependencies": "PyTorch"}):
        assert not validator.is_valid(broken)
    assert description["build_dependencies"] == ["PyTorch"]
    assert b"\r" not in _description_path().read_bytes(), "the index wants LF line endings"


def test_file_and_repository_names_follow_the_index_rules():
    name = _extension_name()
    assert name == "MedSAM2" and _description_path().is_file(), "file name = CMake project name"
    assert not name.lower().startswith("slicer")
    repository_name = Path(urlsplit(_description()["scm_url"]).path).stem
    assert repository_name.startswith("Slicer")
    assert urlsplit(_description()["scm_url"]).scheme in ("https", "git")


def test_urls_live_in_cmakelists_and_every_copy_agrees():
    cmake = _cmake_vars()
    description, s4ext = _description(), _s4ext()
    repository, raw = _repository(), _raw_base()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/SlicerMedSAM2", repository)
    assert description["scm_url"] == s4ext["scmurl"] == repository
    assert description["scm_revision"] == s4ext["scmrevision"]
    assert s4ext["homepage"] == cmake["EXTENSION_HOMEPAGE"]

    # the checker's own patterns find the icon and screenshots; each is a file here, a PNG
    icon_urls = ICON_URL.findall(_cmake())
    screenshot_urls = SCREENSHOT_URLS.findall(_cmake())[0].split()
    assert icon_urls == [cmake["EXTENSION_ICONURL"]] == [s4ext["iconurl"]]
    assert screenshot_urls == s4ext["screenshoturls"].split() and screenshot_urls
    for url in icon_urls + screenshot_urls:
        assert url.startswith(raw), f"{url} is not a file of {repository} at {description['scm_revision']}"
        path = ROOT / url[len(raw):]
        assert path.is_file(), f"{url} names {path.relative_to(ROOT)}, which is not in this repository"
        _png_size(path)
    assert _png_size(ROOT / icon_urls[0][len(raw):]) == (128, 128), "the index shows a 128 x 128 icon"

    # no placeholder left, and no file points at another home of the project
    for path in _repository_files():
        if path.suffix in (".png", ".pt", ".nrrd", ".gz"):
            continue
        text = path.read_text(errors="ignore")
        assert PLACEHOLDER not in text, path
        for url in REPOSITORY_URL.findall(text):
            assert url.startswith((repository, raw)), f"{path.relative_to(ROOT)}: {url} disagrees with {repository}"


def test_s4ext_describes_the_same_extension_as_cmakelists():
    cmake, s4ext, description = _cmake_vars(), _s4ext(), _description()
    assert s4ext["category"] == cmake["EXTENSION_CATEGORY"] == description["category"]
    assert s4ext["depends"].split() == cmake["EXTENSION_DEPENDS"].split() == description["build_dependencies"]
    assert s4ext["contributors"] == cmake["EXTENSION_CONTRIBUTORS"]
    assert s4ext["description"] == cmake["EXTENSION_DESCRIPTION"]
    assert "Slicer 5.10 or later" in cmake["EXTENSION_DESCRIPTION"], "sam2 needs Python 3.10: Slicer 5.8 has 3.9"


def test_license_file_is_the_declared_apache_license_and_the_repository_is_small():
    declared = re.findall(r'^license\s*=\s*\{\s*text\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared == ["Apache-2.0"]
    text = (ROOT / "LICENSE").read_text()
    assert re.match(r"\s*Apache License\s+Version 2\.0, January 2004\s+http://www\.apache\.org/licenses/", text)
    assert "END OF TERMS AND CONDITIONS" in text
    size = sum(p.stat().st_size for p in _repository_files())
    assert size < 100 * 2**20, f"the index refuses repositories over 100 MB ({size / 2**20:.1f} MB)"


def test_the_screenshot_is_what_its_script_renders(tmp_path):
    """The published screenshot is reproducible: scripts/make_screenshot.py renders it again."""
    from PIL import Image

    raw = _raw_base()
    (url,) = SCREENSHOT_URLS.findall(_cmake())[0].split()
    published = ROOT / url[len(raw):]
    out = tmp_path / "screenshot.png"
    run = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), "--output", str(out)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    again, before = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (out, published))
    assert again.shape == before.shape
    # same picture; a different Mesa may round a few pixels differently
    assert np.abs(again - before).mean() < 1.0 and (np.abs(again - before).max(axis=-1) > 40).mean() < 0.005


@pytest.mark.parametrize("doc", ["README.md", "docs/slicer.md"])
def test_docs_show_the_published_screenshot(doc):
    (url,) = SCREENSHOT_URLS.findall(_cmake())[0].split()
    relative = url[len(_raw_base()):]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / doc).read_text())
    shown = [(ROOT / doc).parent.joinpath(i).resolve() for i in images]
    assert (ROOT / relative).resolve() in shown
    assert all(p.is_file() for p in shown), f"{doc} shows an image that is not in the repository"
