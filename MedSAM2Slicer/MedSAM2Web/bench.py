"""Benchmark the web page as a user meets it: click-to-overlay and propagation, in Chromium.

    PYTHONPATH=MedSAM2Slicer python -m MedSAM2Web.bench [--slices 15] [--repeat 3]
        [--model sam2.1_hiera_tiny --checkpoint FILE --image-size 256]

Starts `medsam2 web` on 127.0.0.1 with a crop of slicerio's chest CT (random weights unless
--checkpoint is given: the timings are the real network's, the masks are not segmentations),
drives Debian's Chromium with Playwright and prints a table. Each time runs from the mouse event
(or button press) until the page's view image shows the result, checked the way the browser tests
check it (segment colour where its voxels project); "server" is the part until the server had the
result in the scene, from its status endpoint. "no page" runs the same actions through the same
adapter (the module logic and its engine process) in this process without a page, alternating with
the page's runs so that the machine's other load falls on both alike. Needs the [web] and [test]
extras.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from . import testing as web

GREEN = "#00ff00"
VIEWPORT = {"width": 1280, "height": 800}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m MedSAM2Web.bench", description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=15, help="slices of the chest CT to use (default 15, at most 34)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--model", default="sam2.1_hiera_tiny")
    p.add_argument("--checkpoint", help="checkpoint file (default: random weights written for the run)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def prepare(folder: Path, args) -> tuple[Path, str]:
    import SimpleITK as sitk
    import slicerio

    ct = sitk.ReadImage(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"))
    first = max(0, (ct.GetSize()[2] - args.slices) // 2)
    volume = folder / "chest.nrrd"
    sitk.WriteImage(ct[:, :, first:first + args.slices], str(volume))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from medsam2.testing import write_random_checkpoint

        checkpoint = str(write_random_checkpoint(folder / "random.pt", args.model, seed=0, image_size=args.image_size))
    return volume, checkpoint


class Page:
    def __init__(self, page, url):
        self.page, self.url = page, url
        self.view = page.locator('[data-view="Red"]')

    def status(self, masks=False):
        return web.status(self.page, self.url, masks)

    def button(self, name):
        return self.page.get_by_role("button", name=name, exact=True)

    def new_segment(self):
        for seg in self.status()["segments"]:
            self.button(f"Delete {seg['name']}").click()
        web.wait_until(lambda: not self.status()["segments"], 10)
        self.button("Add segment").click()
        seg = web.wait_until(lambda: self.status()["segments"], 10)[0]
        self.page.get_by_label(f"Colour of {seg['name']}").fill(GREEN)
        web.wait_until(lambda: self.status()["segments"][0]["color"] == GREEN, 10)
        return seg["id"]

    def timed(self, act, server_done, segment_id):
        """(seconds until the server has the result, seconds until the page shows it)."""
        start = time.perf_counter()
        act()
        web.wait_until(server_done, 300, interval=0.02, what="the server")
        server = time.perf_counter() - start
        check = web.overlay_check(self.status(masks=True), segment_id)
        web.wait_until(lambda: check.matches(web.screenshot_rgb(self.view)), 60, interval=0.0, what="the overlay")
        return server, time.perf_counter() - start


ROWS = ("first click on a new segment (opens its engine session, encodes the slice)",
        "second click, same segment (slice cached)", "propagate both", "undo the propagation")
PROMPT_IJK = (84, 64)  # the right lung of the chest CT, on the middle slice


class PageRun:
    """One run of the actions through the browser: {row: (server s, page s)}."""

    def __init__(self, page: Page):
        self.page = page
        state = page.status()
        self.x, self.y = web.ijk_to_view_point(state, (*PROMPT_IJK, state["volume"]["dims"][2] // 2))

    def __call__(self) -> dict:
        page, x, y = self.page, self.x, self.y

        def prompt_taken(after):
            def taken():
                s = page.status()
                return not s["busy"] and s["last_prompt"] and s["last_prompt"]["number"] > after
            return taken

        def filled():
            return len(page.status()["segments"][0]["voxels_per_slice"])

        segment_id = page.new_segment()
        if page.button("Include point").get_attribute("aria-pressed") != "true":
            page.button("Include point").click()
        n = (page.status()["last_prompt"] or {"number": 0})["number"]
        out = {ROWS[0]: page.timed(lambda: page.view.click(position={"x": x, "y": y}), prompt_taken(n), segment_id)}
        page.button("Exclude point").click()
        out[ROWS[1]] = page.timed(lambda: page.view.click(position={"x": x + 40, "y": y + 40}), prompt_taken(n + 1),
                                  segment_id)
        page.button("Include point").click()
        one = filled()
        out[ROWS[2]] = page.timed(lambda: page.button("Propagate").click(),
                                  lambda: not page.status()["busy"] and filled() > one, segment_id)
        out[ROWS[3]] = page.timed(lambda: page.button("Undo").click(), lambda: filled() == one, segment_id)
        return out


class EngineRun:
    """One run of the same actions on the same adapter in this process, without a page: {row: s}."""

    def __init__(self, volume: Path, checkpoint: str, args):
        import slicer

        from . import scene
        from .segmenter import ModelSettings, Segmenter

        self.scene = scene
        self.mrml = slicer.vtkMRMLScene()
        self._logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self._logic.SetMRMLScene(self.mrml)
        self.loaded = scene.load_volume(self.mrml, volume)
        self.segmentation = scene.new_segmentation(self.mrml, self.loaded.node)
        self.seg = Segmenter(ModelSettings(name=args.model, checkpoint=checkpoint, device=args.device,
                                           image_size=args.image_size or 0, allow_random=True))
        self.seg.start()
        k = self.loaded.volume.array.shape[0] // 2
        self.ras = _ijk_to_ras(self.loaded.node, (*PROMPT_IJK, k))
        self.other = _ijk_to_ras(self.loaded.node, (PROMPT_IJK[0] - 7, PROMPT_IJK[1] + 7, k))  # near the page's
        self.previous = None

    def _timed(self, act):
        start = time.perf_counter()
        act()
        while self.seg.busy:
            self.seg.poll()
        return time.perf_counter() - start

    def __call__(self) -> dict:
        seg, scene = self.seg, self.scene
        if self.previous is not None:  # as on the page: the previous segment goes, a new one comes
            scene.remove_segment(self.segmentation, self.previous)
            seg.forget_segment(self.previous)
        self.previous = scene.add_segment(self.segmentation)
        seg.select(self.loaded.node, self.segmentation, self.previous)
        return {ROWS[0]: self._timed(lambda: seg.place_point(self.ras, (0, 0, 1))),
                ROWS[1]: self._timed(lambda: seg.place_point(self.other, (0, 0, 1), include=False)),
                ROWS[2]: self._timed(lambda: seg.propagate("both")),
                ROWS[3]: self._timed(seg.undo)}

    def close(self):
        self.seg.shutdown()


def _ijk_to_ras(volume_node, ijk):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return tuple(m.MultiplyPoint((*map(float, ijk), 1.0))[:3])


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medsam2-web-bench-") as tmp:
        folder = Path(tmp)
        volume, checkpoint = prepare(folder, args)
        server = web.WebServer([volume, "--model", args.model, "--checkpoint", checkpoint, "--device", args.device,
                                "--image-size", args.image_size, "--output", folder / "out.seg.nrrd"], log_dir=folder)
        started = time.perf_counter()
        with server, sync_playwright() as p:
            up = time.perf_counter() - started
            browser = web.launch_chromium(p)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(server.url)
            bench = Page(page, server.url)
            bench.view.wait_for(timeout=60_000)
            web.wait_until(lambda: bench.status()["views"]["Red"]["size"] == web.view_size_on_page(bench.view), 30)
            # alternate the two, so that the machine's other load falls on both alike
            engine, page_run = EngineRun(volume, checkpoint, args), PageRun(bench)
            engine_runs, page_runs = {row: [] for row in ROWS}, {row: [] for row in ROWS}
            for _ in range(args.repeat):
                for row, seconds in engine().items():
                    engine_runs[row].append(seconds)
                for row, seconds in page_run().items():
                    page_runs[row].append(seconds)
            engine.close()
            browser.close()
    print(f"medsam2 web: {args.model} at {args.image_size} px on {args.device}, "
          f"{'random weights' if args.checkpoint is None else args.checkpoint}, chest CT {args.slices} slices x "
          f"128 x 128; server up (model loaded, page answering) in {up:.1f} s; medians\n")
    print("| action | no page s | server has it s | page shows it s | runs |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        if not page_runs[row]:
            continue
        label = f"{row} ({args.slices} slices)" if row == ROWS[2] else row
        print(f"| {label} | {statistics.median(engine_runs[row]):.2f} | "
              f"{statistics.median(s for s, _ in page_runs[row]):.2f} | "
              f"{statistics.median(p for _, p in page_runs[row]):.2f} | {len(page_runs[row])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
