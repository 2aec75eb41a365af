"""Benchmark of `medsam2 batch`'s runner: cases per minute in this process and on a local Ray runtime
with 1 and 2 CPU workers (one torch thread each), and what a case costs besides the engine.

    python -m medsam2.study.batch_bench [--cases 8] [--slices 10] [--image-size 512] [--repeats 3]

The cohort: `--cases` copies of slicerio's chest CT cut to `--slices` slices, each prompted by a box
from its lung label (--prompt-from-label box) and scored against it; random weights of the
MedSAM2-sized network (Hiera-tiny), so the compute is the real model's. Prints two tables:

1. the runner: start-up (Ray and the model loads, until the first case can start), then the cases:
   wall time, cases per minute, the median seconds a case takes on its worker, and the dispatch
   overhead per case (wall x workers / cases - that median: what the runner adds between cases);
2. one case in this process, by step (read and prompt, segment, write and score; medians).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_cohort(folder: Path, cases: int, slices: int) -> Path:
    """`cases` identical cases (CT cut to `slices` slices, lung label) and their manifest."""
    import numpy as np
    import SimpleITK as sitk
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    ct = sitk.ReadImage(str(data / "CTChest4.nrrd"))
    seg = slicerio.read_segmentation(str(data / "Segmentation.seg.nrrd"))
    labels = np.zeros(sitk.GetArrayFromImage(ct).shape, np.uint8)
    for value, name in ((1, "right lung"), (2, "left lung")):
        labels[slicerio.segment_mask(seg, name).transpose(2, 1, 0) > 0] = value
    label = sitk.GetImageFromArray(labels)
    label.CopyInformation(ct)
    start = max(0, (ct.GetSize()[2] - slices) // 2)
    sitk.WriteImage(ct[:, :, start:start + slices], str(folder / "ct.nrrd"))
    sitk.WriteImage(label[:, :, start:start + slices], str(folder / "label.nrrd"))
    manifest = folder / "manifest.csv"
    manifest.write_text("case,volume,label,reference\n" + "".join(
        f"case{n:03d},ct.nrrd,label.nrrd,label.nrrd\n" for n in range(cases)))
    return manifest


def run_config(manifest: Path, out: Path, options: dict, ray: str | None, workers: int) -> dict:
    """One batch through the runner; its timings."""
    import torch

    from ..batch import case as case_mod
    from ..batch.manifest import read_manifest
    from ..batch.runner import Cluster, run_tasks

    cases = read_manifest(manifest)
    settings = case_mod.CaseSettings(output_dir=str(out))
    out.mkdir()
    if ray is None:
        torch.set_num_threads(1)
    cluster = Cluster(ray=ray, workers=workers if ray else None, cpus_per_worker=1 if ray else None)
    marks, rows = {"start": time.perf_counter()}, []

    def ready(_workers):
        marks["ready"] = time.perf_counter()

    run_tasks(((c.case, (c, settings)) for c in cases), case_mod.run_case, options, cluster,
              lambda _key, row: rows.append(row), on_ready=ready)
    end = time.perf_counter()
    failed = [r for r in rows if not isinstance(r, dict) or r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"bench cases failed: {failed[:2]}")
    wall = end - marks["ready"]
    median = statistics.median(r["seconds"] for r in rows)
    return {"startup": marks["ready"] - marks["start"], "cases": len(rows), "wall": wall,
            "per_minute": 60 * len(rows) / wall, "case": median, "overhead": wall * workers / len(rows) - median}


def steps(manifest: Path, out: Path, options: dict, repeats: int) -> dict:
    """Medians of one case's steps in this process (one thread)."""
    import torch

    from ..batch import case as case_mod
    from ..batch.manifest import read_manifest
    from ..batch.runner import load_model

    torch.set_num_threads(1)
    case = read_manifest(manifest)[0]
    settings = case_mod.CaseSettings(output_dir=str(out))
    out.mkdir()
    model = load_model(options)
    times = {"read": [], "segment": [], "write": []}
    for _ in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        inputs = case_mod.read_case(case, settings)
        t1 = time.perf_counter()
        results = case_mod.segment_inputs(model, inputs, settings)
        t2 = time.perf_counter()
        case_mod.finish_case(case, inputs, results, settings)
        t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(value)
    return {key: statistics.median(v[1:]) for key, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m medsam2.study.batch_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=8,
                   help="cases per runner (several per worker: each worker's first case is slower)")
    p.add_argument("--slices", type=int, default=10)
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="cases timed by step in table 2 (after a warm-up)")
    args = p.parse_args(argv)

    from ..testing import write_random_checkpoint

    with tempfile.TemporaryDirectory(prefix="mbb") as tmp:
        folder = Path(tmp)
        checkpoint = write_random_checkpoint(folder / "random.pt", "sam2.1_hiera_tiny", seed=0,
                                             image_size=args.image_size)
        options = {"model": "sam2.1_hiera_tiny", "checkpoint": str(checkpoint), "device": "cpu",
                   "image_size": args.image_size, "precision": "float32"}
        manifest = make_cohort(folder, args.cases, args.slices)
        print(f"{args.cases} cases of {args.slices} slices (128 x 128) at {args.image_size} px, Hiera-tiny, "
              "2 lungs each, CPU, one torch thread per worker")
        print(f"{'runner':<22} {'startup s':>9} {'cases':>5} {'wall s':>7} {'cases/min':>9} {'case s':>7} "
              f"{'overhead s/case':>15}")
        for name, ray, workers in (("in this process", None, 1), ("Ray local, 1 worker", "local", 1),
                                   ("Ray local, 2 workers", "local", 2)):
            r = run_config(manifest, folder / f"out-{ray}-{workers}", options, ray, workers)
            print(f"{name:<22} {r['startup']:9.1f} {r['cases']:5d} {r['wall']:7.1f} {r['per_minute']:9.2f} "
                  f"{r['case']:7.2f} {r['overhead']:15.2f}", flush=True)
        s = steps(manifest, folder / "out-steps", options, args.repeats)
        total = sum(s.values())
        print(f"\none case in this process (median of {args.repeats}): read + prompt {s['read']:.2f} s, "
              f"segment {s['segment']:.2f} s, write + score {s['write']:.2f} s "
              f"({100 * (s['read'] + s['write']) / total:.0f}% of the case is not the engine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
