"""Driving `medsam2 web` in a real browser: for the browser tests and the web benchmark.

Starts the command as a user would (a child process on 127.0.0.1), drives Debian's Chromium with
Playwright (no browser download), and compares what the page shows with what the server holds:
each segment's voxels are projected through the slice view's own XY-to-RAS matrix into the view's
pixels (numpy, no VTK), and the screenshot's pixels are classed by their tint towards the
segment's colour. Views stream as JPEG, so the comparison leaves a margin along every edge and
counts fractions, not exact pixels.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # MedSAM2Slicer: medsam2, MedSAM2Lib, MedSAM2Web
CHROMIUM = os.environ.get("MEDSAM2_CHROMIUM", "/usr/bin/chromium")
URL_LINE = "MedSAM2 web page: "
GUTTER_PX = 48           # the view's own controls: slice slider at the bottom, buttons top left
INSIDE_MARGIN_PX = 4     # JPEG and resampling blur a segment's edge by a few pixels
OUTSIDE_MARGIN_PX = 8    # JPEG's chroma subsampling spreads colour up to a 16-pixel block


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebServer:
    """`medsam2 web ARGS...` on 127.0.0.1 and a free port, until stop(); `url` once it answers."""

    def __init__(self, args: list[str], log_dir: Path, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.args = [*map(str, args), "--host", "127.0.0.1", "--port", str(self.port)]
        self.stdout_path, self.stderr_path = Path(log_dir) / "web.stdout", Path(log_dir) / "web.stderr"
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(PACKAGE_ROOT)}
        self.proc = None
        self.url = None

    def start(self, timeout: float = 300.0) -> "WebServer":
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "medsam2.cli", "web", *self.args],
                                         stdout=out, stderr=err, env=self.env, cwd=str(Path(self.stdout_path).parent))
        deadline = time.monotonic() + timeout
        while self.url is None:
            for line in self.stdout_path.read_text().splitlines():
                if line.startswith(URL_LINE):
                    self.url = line[len(URL_LINE):].strip()
            if self.url is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"medsam2 web exited ({self.proc.returncode}): {self.log()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"medsam2 web did not answer within {timeout:.0f} s: {self.log()}")
                time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()[-4000:]

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def site_files(folder: Path, ct_path, first_slice: int, slices: int, token: str) -> tuple[Path, Path]:
    """A web test's inputs in `folder`: `slices` slices of the CT from `first_slice` as chest.nrrd,
    and the page token in a file only its owner reads, as `--page-token-file` wants it."""
    import SimpleITK as sitk

    volume = Path(folder) / "chest.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_path))[:, :, first_slice:first_slice + slices], str(volume))
    token_file = Path(folder) / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    return volume, token_file


def launch_chromium(playwright):
    """Debian's Chromium, headless (root needs --no-sandbox)."""
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is missing: run scripts/install_system_test_deps.sh (or set MEDSAM2_CHROMIUM)")
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


def login(page, url: str, token: str) -> None:
    page.goto(url)
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Log in").click()


def status(page, url: str, masks: bool = False) -> dict:
    """GET /medsam2/status through the page's own session (cookies included)."""
    response = page.request.get(url.rstrip("/") + "/medsam2/status" + ("?masks=1" if masks else ""))
    if not response.ok:
        raise RuntimeError(f"status: HTTP {response.status}: {response.text()}")
    return response.json()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_idle(page, url: str, timeout: float = 120.0) -> dict:
    """The status once nothing is queued or running."""
    state = {}

    def idle():
        state.update(status(page, url))
        return not state["busy"]

    wait_until(idle, timeout, what="the server to finish")
    return state


def segment_mask(segment: dict) -> np.ndarray:
    """A segment's voxels from a status?masks=1 entry: bool (k, j, i)."""
    from medsam2.masks import unpack_mask

    mask = segment["mask"]
    return unpack_mask(base64.b64decode(mask["packed"]), mask["shape_kji"])


def view_pixels_to_ijk(state: dict, view: str = "Red") -> np.ndarray:
    """Continuous IJK (h, w, 3) of every pixel of a view, pixel row 0 at the top (as on screen)."""
    v = state["views"][view]
    w, h = v["size"]
    xy_to_ras = np.asarray(v["xy_to_ras"])
    ras_to_ijk = np.linalg.inv(np.asarray(state["volume"]["ijk_to_ras"]))
    rows, cols = np.mgrid[0:h, 0:w]
    xy = np.stack([cols, h - 1 - rows, np.zeros_like(rows), np.ones_like(rows)], axis=-1).astype(float)
    return (xy @ (ras_to_ijk @ xy_to_ras).T)[..., :3]


def project(state: dict, mask_kji: np.ndarray, view: str = "Red") -> np.ndarray:
    """Which view pixels show a voxel of `mask_kji` (nearest voxel): bool (h, w)."""
    ijk = np.floor(view_pixels_to_ijk(state, view) + 0.5).astype(int)
    k_n, j_n, i_n = mask_kji.shape
    i, j, k = ijk[..., 0], ijk[..., 1], ijk[..., 2]
    inside = (i >= 0) & (i < i_n) & (j >= 0) & (j < j_n) & (k >= 0) & (k < k_n)
    out = np.zeros(i.shape, dtype=bool)
    out[inside] = mask_kji[k[inside], j[inside], i[inside]]
    return out


def ijk_to_view_point(state: dict, ijk, view: str = "Red") -> tuple[float, float]:
    """Where a voxel centre lies in the view, in page pixels from the view's top-left corner."""
    v = state["views"][view]
    h = v["size"][1]
    ras = np.asarray(state["volume"]["ijk_to_ras"]) @ np.append(np.asarray(ijk, float), 1.0)
    m = np.asarray(v["xy_to_ras"])
    x, y, _ = np.linalg.solve(m[:3, :3], ras[:3] - m[:3, 3])
    return float(x) + 0.5, float(h - 1 - y) + 0.5


def view_size_on_page(locator) -> list[int] | None:
    """The size a view element gives its image: whole pixels (an element can be 248.67 px high)."""
    box = locator.bounding_box()
    if box is None:  # not laid out yet (e.g. just after a layout change)
        return None
    return [int(box["width"]), int(box["height"])]


def keep_page_screenshot(page, name: str) -> Path | None:
    """Save the whole page as JPEG under $MEDSAM2_SCREENSHOT_DIR when it is set (how the README's
    screenshot is made: by the browser test, after its checks passed); otherwise do nothing."""
    folder = os.environ.get("MEDSAM2_SCREENSHOT_DIR")
    if not folder:
        return None
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), type="jpeg", quality=85)
    return path


def screenshot_rgb(locator) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(float)


def tinted(image: np.ndarray, color_hex: str) -> np.ndarray:
    """Pixels tinted towards `color_hex` by at least a quarter of its saturation (a 50% fill gives half)."""
    target = np.array([int(color_hex.lstrip("#")[i:i + 2], 16) for i in (0, 2, 4)], float)
    chroma_target = target - target.mean()
    scale = np.linalg.norm(chroma_target)
    if scale < 1:
        raise ValueError(f"{color_hex} is grey: it cannot be told from the image")
    chroma = image - image.mean(axis=-1, keepdims=True)
    return (chroma @ (chroma_target / scale)) > 0.25 * scale


class OverlayCheck:
    """Where a segment should show in a view, with margins, ready to test many screenshots."""

    def __init__(self, expected: np.ndarray, color_hex: str):
        from scipy import ndimage

        self.shape, self.color = expected.shape, color_hex
        h, w = expected.shape
        usable = np.ones_like(expected)
        usable[h - GUTTER_PX:, :] = False
        usable[:GUTTER_PX, :GUTTER_PX] = False
        self.inner = ndimage.binary_erosion(expected, iterations=INSIDE_MARGIN_PX) & usable
        self.outer = ~ndimage.binary_dilation(expected, iterations=OUTSIDE_MARGIN_PX) & usable
        self.expected_px = int(expected.sum())

    def agreement(self, image: np.ndarray) -> dict:
        """inside: fraction of pixels well inside the projection that show the colour (want ~1);
        outside: fraction of pixels well away from it that show the colour (want ~0)."""
        h, w = self.shape
        if not (0 <= image.shape[0] - h <= 1 and 0 <= image.shape[1] - w <= 1):
            raise ValueError(f"screenshot {image.shape[:2]} and view {self.shape} differ in size")
        image = image[:h, :w]  # an element of fractional size screenshots one pixel larger
        colour = tinted(image, self.color)
        return {"inside": float(colour[self.inner].mean()) if self.inner.any() else float("nan"),
                "inside_px": int(self.inner.sum()), "expected_px": self.expected_px,
                "outside": float(colour[self.outer].mean()) if self.outer.any() else 0.0,
                "outside_px": int(self.outer.sum())}

    def matches(self, image: np.ndarray, inside_min: float = 0.97, outside_max: float = 0.01) -> bool:
        got = self.agreement(image)
        return (got["inside_px"] == 0 or got["inside"] >= inside_min) and got["outside"] <= outside_max


def overlay_check(state: dict, segment_id: str, view: str = "Red") -> OverlayCheck:
    """The check for one segment from a status?masks=1 answer."""
    seg = next(s for s in state["segments"] if s["id"] == segment_id)
    return OverlayCheck(project(state, segment_mask(seg), view), seg["color"])
