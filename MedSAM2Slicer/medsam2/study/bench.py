"""Benchmark: the official SAM2VideoPredictor vs this engine on the same volume, prompts and weights.

Each variant runs in its own process (`python -m medsam2.study.bench --worker ...`) so that its peak
memory is its own. The work, identical for all variants:
  1. first prompt: a click on the middle slice (official: building its frame tensor, init_state
     and the click; ours: opening the session and the click);
  2. bidirectional propagation from that slice;
  3. a correction click three quarters up the volume and re-propagation of its span (forward to the
     end, backward to just after the first prompt; the official predictor is given the same span);
  4. (ours) a second click on an already encoded slice: the interactive latency.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("official", "sam2", "self-sorting")  # the official predictor, then ours in each of options.MEMORY_MODES
# a lung voxel of slicerio's CTChest4 (i, j), used as the click on every slice count
CLICK = (40.0, 64.0)
CORRECTION = (88.0, 64.0)


def chest_volume(slices: int) -> np.ndarray:
    """slicerio's CTChest4 resampled (nearest slice) to `slices` slices, 128 x 128 in-plane."""
    import nrrd  # pynrrd, slicerio's own reader: the bench needs no SimpleITK (a large wheel on GPU hosts)
    import slicerio

    ct, _ = nrrd.read(str(Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"), index_order="C")
    index = np.round(np.linspace(0, ct.shape[0] - 1, slices)).astype(int)
    return np.ascontiguousarray(ct[index])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(variant, model_name, checkpoint, image_size, slices, device, masks_out, precision="auto",
                compile=False) -> dict:
    """One variant in this process; returns its timings and writes its final masks to `masks_out`."""
    import warnings

    import torch

    warnings.simplefilter("ignore")
    import medsam2
    from medsam2.models.compilation import warm_up
    from medsam2.models.cpu_support import has_bf16_units

    volume = chest_volume(slices)
    mid, fix = slices // 2, (3 * slices) // 4
    ours = variant != "official"
    # the official predictor runs as its demos run it (bf16 autocast on CUDA, float32 on CPU), or in
    # float32 when float32 is asked for: the way to check equality on a GPU
    official_precision = "float32" if precision == "float32" else "auto"
    model = medsam2.load_model(model_name, checkpoint=checkpoint, device=device, image_size=image_size,
                               precision=precision if ours else official_precision, compile=compile if ours else False)
    dev = model.device
    # compiled: compile first, on the same slices in reverse order (their own feature cache), so
    # the table shows the compiled speed and the compile time apart
    compile_s = warm_up(model, volume[::-1].copy(), memory=variant) if model.compiled else None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = _peak_rss_mb()
    result = {"variant": variant, "slices": slices, "image_size": model.image_size, "device": str(dev),
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "random_weights": model.weights_are_random, "precision": model.precision,
              "compiled": model.compiled or "-", "compile_s": compile_s,
              "cpu_bf16_units": has_bf16_units() if dev.type == "cpu" else None}

    if variant == "official":
        # only what the official predictor needs: our model's memory is freed before it loads
        spec, path, size, amp = model.spec, model.checkpoint_path, model.image_size, model.autocast()
        del model
        timings, stack = _time_official(spec, path, size, amp, dev, volume, slices, mid, fix)
    else:
        timings, stack = _time_engine(model, variant, volume, mid, fix)
    result.update(timings)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["rss_after_load_mb"] = rss_loaded
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    result["slices_per_s"] = slices / result["propagate_s"]
    result["mask_fraction"] = float(stack.mean())
    np.save(masks_out, np.packbits(stack))
    return result


def _time_official(spec, checkpoint_path, image_size, amp, dev, volume, slices, mid, fix):
    """The official predictor on our frames and weights, under `amp` (the precision setting of
    run_variant): a click, propagation, a correction."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2.models.build import official_overrides
    from medsam2.tracking.frames import FrameSource

    official = build_sam2_video_predictor(
        spec.config, str(checkpoint_path), device=str(dev),
        hydra_overrides_extra=official_overrides(image_size, spec.hydra_overrides))
    with amp, tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        for i in range(2):  # init_state reads a JPEG folder; its frames are replaced by ours
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(Path(tmp) / f"{i:05d}.jpg")
        frames = FrameSource(volume, official.image_size)  # the frames our engine builds
        t0 = time.perf_counter()
        state = official.init_state(tmp)
        state["images"] = torch.stack([frames[i] for i in range(slices)]).to(dev)
        state["num_frames"], (state["video_height"], state["video_width"]) = slices, volume.shape[1:]
        state["cached_features"] = {}
        official.add_new_points_or_box(state, mid, 1, points=[CLICK], labels=[1])
        _sync(dev)
        t1 = time.perf_counter()
        masks = {}
        for reverse in (False, True):
            for f, _, logits in official.propagate_in_video(state, reverse=reverse):
                masks[f] = (logits[0, 0] > 0).cpu().numpy()
        _sync(dev)
        t2 = time.perf_counter()
        official.add_new_points_or_box(state, fix, 1, points=[CORRECTION], labels=[1])
        for reverse, count in ((False, slices - 1 - fix), (True, fix - mid - 1)):
            for f, _, logits in official.propagate_in_video(state, start_frame_idx=fix,
                                                             max_frame_num_to_track=count, reverse=reverse):
                masks[f] = (logits[0, 0] > 0).cpu().numpy()
        _sync(dev)
        t3 = time.perf_counter()
    timings = dict(first_prompt_s=t1 - t0, propagate_s=t2 - t1, correction_s=t3 - t2, cached_click_s=None)
    return timings, np.stack([masks[f] for f in range(slices)])


def _time_engine(model, variant, volume, mid, fix):
    """This engine in one memory mode: the same work, then a click on a cached slice."""
    dev = model.device
    t0 = time.perf_counter()
    session = model.open(volume, memory=variant)
    session.add_prompt(mid, obj_id=1, points=[CLICK], labels=[1])
    _sync(dev)
    t1 = time.perf_counter()
    for _ in session.propagate("both"):
        pass
    _sync(dev)
    t2 = time.perf_counter()
    session.add_prompt(fix, obj_id=1, points=[CORRECTION], labels=[1])
    for _ in session.propagate("both", start=fix, until="conditioning"):  # as the official predictor runs it
        pass
    _sync(dev)
    t3 = time.perf_counter()
    stack = session.mask(1)  # the result compared with the official one
    session.add_prompt(fix, obj_id=1, points=[(60.0, 40.0)], labels=[0])  # features cached
    _sync(dev)
    t4 = time.perf_counter()
    return dict(first_prompt_s=t1 - t0, propagate_s=t2 - t1, correction_s=t3 - t2, cached_click_s=t4 - t3), stack


def run_bench(model_name, checkpoint, image_size, slice_counts, device="auto", variants=VARIANTS, log=print,
              precision="auto", compile=False):
    """Run every variant for every slice count in fresh processes; returns the list of results."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint is None:
            from ..testing import write_random_checkpoint

            checkpoint = str(write_random_checkpoint(Path(tmp) / "random.pt", model_name, image_size=image_size))
            log(f"no --checkpoint: using RANDOM WEIGHTS for {model_name} (timings are real, masks are not)")
        for slices in slice_counts:
            masks = {}
            for variant in variants:
                out = Path(tmp) / f"{variant}-{slices}.npy"
                args = json.dumps([variant, model_name, str(checkpoint), image_size, slices, device, str(out),
                                   precision, compile])
                log(f"  running {variant} on {slices} slices ...")
                proc = subprocess.run([sys.executable, "-m", "medsam2.study.bench", "--worker", args],
                                      capture_output=True, text=True, env=_worker_env())
                if proc.returncode != 0:
                    raise RuntimeError(f"bench worker {variant} failed:\n{proc.stderr[-3000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                masks[variant] = np.load(out)
                results.append(result)
            if "official" in masks:
                for r in results[-len(variants):]:
                    if r["variant"] == "sam2":  # self-sorting is a different memory: not meant to match
                        r["identical_to_official"] = bool(np.array_equal(masks[r["variant"]], masks["official"]))
    return results


def _worker_env():
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def format_table(results) -> str:
    cols = ["variant", "slices", "image_size", "device_name", "precision", "compiled", "compile_s", "first_prompt_s",
            "propagate_s", "correction_s",
            "cached_click_s", "slices_per_s", "peak_rss_mb", "peak_gpu_mb", "identical_to_official"]
    head = ["variant", "slices", "size", "device", "precision", "compiled", "compile s", "first prompt s",
            "propagate both s", "correction s",
            "cached click s", "slices/s", "peak RSS MB", "peak GPU MB", "identical"]

    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "yes" if value else "NO"
        if isinstance(value, float):
            return f"{value:.2f}" if value < 100 else f"{value:.0f}"
        return str(value)

    rows = [[cell(r.get(c)) for c in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    by_slices = {}
    for r in results:
        by_slices.setdefault(r["slices"], {})[r["variant"]] = r
    notes = []
    for slices, group in by_slices.items():
        off = group.get("official")
        for name in VARIANTS[1:]:  # ours, against the official
            ours = group.get(name)
            if off and ours:
                notes.append(f"{slices} slices, {name}: propagation {ours['propagate_s'] / off['propagate_s']:.2f}x "
                             f"the official time, correction {off['correction_s'] / ours['correction_s']:.1f}x faster")
    counts = sorted(by_slices)
    if len(counts) > 1:
        for name in (*VARIANTS[1:], "official"):
            lo, hi = by_slices[counts[0]].get(name), by_slices[counts[-1]].get(name)
            if lo and hi:
                notes.append(f"{name}: peak RSS at {counts[-1]} slices is {hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x "
                             f"that at {counts[0]}")
    notes += _cpu_precision_notes(results)
    if any(r.get("random_weights") for r in results):
        notes.append("RANDOM WEIGHTS: timings and memory are real; masks are not meaningful segmentations")
    return "\n".join(out + [""] + notes)


def _cpu_precision_notes(results) -> list:
    """What bfloat16 costs on the CPU the bench ran on (cpu_support.py), when it ran on a CPU."""
    from ..models.cpu_support import BF16_FLAGS, SLOW_BF16_TEXT

    cpu = [r for r in results if str(r.get("device", "")).startswith("cpu")]
    if not cpu:
        return []
    units = cpu[0].get("cpu_bf16_units")
    if units is False:
        asked = any(r.get("precision") == "bfloat16" for r in cpu)
        return [("bfloat16 rows: " if asked else "bfloat16 here: ") + SLOW_BF16_TEXT]
    if units:
        return [f"this CPU has bf16 units ({' / '.join(BF16_FLAGS)}): --precision bfloat16 is the faster choice "
                "on it, float32 the exact one"]
    return ["whether this CPU has bf16 units is not known (not x86): measure --precision bfloat16 against float32"]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    print(json.dumps(run_variant(*json.loads(sys.argv[2]))))
