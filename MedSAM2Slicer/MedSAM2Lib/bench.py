"""python -m MedSAM2Lib.bench: the module's logic under Slicer's GIL policy against the engine alone.

Runs on slicer-core (no Slicer application): slicerio's chest CT, its slices upsampled to 512 x 512
(a CT's usual size), a random-weight Hiera-tiny checkpoint at each model input size. For each size:

- engine alone: `medsam2.load_model` in this process, called directly;
- through the module: a real volume and segmentation node, SegmentationSession, the engine in its
  child process (LocalEngine), polled from a loop that keeps the GIL between 40 ms ticks as
  Slicer's main thread does (slicer_loop.py).

Columns: first click (volume upload and encoding included), a click on a slice whose features are
cached (after propagation), a click after propagation on a slice prepared for it (Session.prepare;
through the module: the engine session's prepare, the call the child's idle task makes for the
slice a view shows), propagation throughput for both directions, and the slowest poll().
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time
import warnings

import numpy as np

from medsam2.prompt import Prompt

AXIAL = (0.0, 0.0, 1.0)
WINDOW = (-1000.0, 400.0)


def _ct_slab(slices: int, upsample: int) -> np.ndarray:
    import SimpleITK as sitk
    import slicerio

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(pathlib.Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd")))
    first = max(0, (ct.shape[0] - slices) // 2)
    slab = ct[first:first + slices].astype(np.int16)
    return np.ascontiguousarray(slab.repeat(upsample, axis=1).repeat(upsample, axis=2))


def _scene(values: np.ndarray):
    import slicer

    from .volume import add_volume_node

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    spacing = (0.7 * 128 / values.shape[2], 0.7 * 128 / values.shape[1], 2.5)
    volume = add_volume_node(scene, values, np.diag([*spacing, 1.0]), "CT")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("s", "s")
    return scene, volume, segmentation, segment_id, logic


def _ras(volume, ijk):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m.MultiplyPoint((*ijk, 1.0))[:3]


def bench_size(size: int, values: np.ndarray, workdir: pathlib.Path) -> dict:
    import medsam2
    from medsam2.testing import write_random_checkpoint

    from .engine_process import LocalEngine
    from .geometry import VolumeGeometry
    from .session import SegmentationSession
    from .slicer_loop import run_main_loop, slowest_tick
    from .volume import volume_array

    ckpt = write_random_checkpoint(workdir / f"tiny_{size}.pt", "sam2.1_hiera_tiny", image_size=size)
    k = values.shape[0] // 2
    first_ijk, cached_ijk = (values.shape[2] // 3, values.shape[1] // 2, k), (values.shape[2] // 2, values.shape[1] // 3, k + 2)
    prepared_ijk = (values.shape[2] // 2, values.shape[1] // 3, k - 2)
    row = {"size": size, "slices": values.shape[0], "frame": f"{values.shape[1]}x{values.shape[2]}"}

    # the engine alone, in this process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = medsam2.load_model("sam2.1_hiera_tiny", checkpoint=ckpt, device="cpu", image_size=size)
    scene, volume, segmentation, segment_id, _ = _scene(values)
    geometry = VolumeGeometry(volume)
    layout, frame, x, y = geometry.locate(_ras(volume, first_ijk), AXIAL)
    frames = layout.frames(volume_array(volume))
    model.open(frames[:2], memory="sam2", window=WINDOW).add_prompt(0, points=[[x, y]], labels=[1])  # warm-up
    began = time.perf_counter()
    alone = model.open(frames, memory="sam2", window=WINDOW)
    alone.add_prompt(frame, obj_id=1, points=[[x, y]], labels=[1])
    row["alone_first_click_s"] = time.perf_counter() - began
    began = time.perf_counter()
    n = sum(1 for _ in alone.propagate("both"))
    row["alone_fps"] = n / (time.perf_counter() - began)
    _, frame2, x2, y2 = geometry.locate(_ras(volume, cached_ijk), AXIAL)
    began = time.perf_counter()
    alone.add_prompt(frame2, obj_id=1, points=[[x2, y2]], labels=[1])
    row["alone_cached_click_s"] = time.perf_counter() - began
    _, frame3, x3, y3 = geometry.locate(_ras(volume, prepared_ijk), AXIAL)
    alone.prepare(frame3)
    began = time.perf_counter()
    alone.add_prompt(frame3, obj_id=1, points=[[x3, y3]], labels=[1])
    row["alone_prepared_click_s"] = time.perf_counter() - began
    del alone, model

    # through the module, the engine in its child process, under Slicer's GIL policy
    engine = LocalEngine("sam2.1_hiera_tiny", checkpoint=ckpt, device="cpu", image_size=size, allow_random_weights=True)
    try:
        engine.wait_ready(timeout=300)
        warm = engine.open(frames[:2], memory="sam2", window=WINDOW)
        engine.wait(warm.add_prompt(Prompt.make(0, points=[[x, y]], labels=[1])), 300)
        session = SegmentationSession(volume, segmentation, segment_id, engine, memory="sam2", window=WINDOW)
        ticks = []

        def timed(job):
            began = time.perf_counter()
            ticks.extend(run_main_loop(session.poll, lambda: job.done, timeout=1800))
            if job.error is not None:
                raise job.error
            return time.perf_counter() - began

        row["module_first_click_s"] = timed(session.submit_point(_ras(volume, first_ijk), slice_normal=AXIAL))
        job = session.submit_propagate("both", slice_normal=AXIAL)
        row["module_fps"] = job.total / timed(job)
        row["module_cached_click_s"] = timed(session.submit_point(_ras(volume, cached_ijk), slice_normal=AXIAL))
        handle = session._axes[layout.axis].engine
        engine.wait(handle.prepare(frame3, now=True), 600)
        row["module_prepared_click_s"] = timed(session.submit_point(_ras(volume, prepared_ijk), slice_normal=AXIAL))
        row["slowest_poll_ms"] = slowest_tick(ticks) * 1000
        session.close()
    finally:
        engine.close()
    return row


def format_table(rows) -> str:
    head = ("| model input | slices | first click: alone / module (+ms) | click on a cached slice: alone / module (+ms) "
            "| click on a prepared slice: alone / module (+ms) | propagation, slices/s: alone / module | slowest poll |")
    lines = [head, "|---|---|---|---|---|---|---|"]

    def pair(alone, module):
        return f"{alone:.2f} s / {module:.2f} s ({(module - alone) * 1000:+.0f} ms)"

    for r in rows:
        lines.append(f"| {r['size']} px ({r['frame']} frames) | {r['slices']} "
                     f"| {pair(r['alone_first_click_s'], r['module_first_click_s'])} "
                     f"| {pair(r['alone_cached_click_s'], r['module_cached_click_s'])} "
                     f"| {pair(r['alone_prepared_click_s'], r['module_prepared_click_s'])} "
                     f"| {r['alone_fps']:.2f} / {r['module_fps']:.2f} ({r['module_fps'] / r['alone_fps']:.2f}x) "
                     f"| {r['slowest_poll_ms']:.1f} ms |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSAM2Lib.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="model input sizes in pixels (default 256,512)")
    parser.add_argument("--slices", type=int, default=16, help="slices of the chest CT (default 16)")
    parser.add_argument("--upsample", type=int, default=4, help="frame upsampling of the 128 px CT (default 4: 512 px)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size; the table shows medians (default 3)")
    args = parser.parse_args(argv)
    values = _ct_slab(args.slices, args.upsample)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            runs = [bench_size(size, values, pathlib.Path(tmp)) for _ in range(max(1, args.repeat))]
            row = {k: (statistics.median(r[k] for r in runs) if isinstance(v, float) else v)
                   for k, v in runs[0].items()}
            row["slowest_poll_ms"] = max(r["slowest_poll_ms"] for r in runs)
            rows.append(row)
    print(format_table(rows))
    print(f"(medians of {max(1, args.repeat)} runs; the slowest poll is the largest of all runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
