"""Benchmark of the correction loop (issue 22): what a click costs after propagation, prepared or
not, and what a correction's refine costs against the first pass, stopping at agreement or not.

`medsam2 bench --correction-loop` prints both tables. Latencies are medians of repeated clicks
(the machine may be shared). The agreement sweep predicts, from one until="conditioning" refine,
where each (K, tau) would stop: the re-tracked slices of a forward pass are the same in both modes
with memory="sam2" (a frame reads only slices behind it), so the prediction is exact there.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..tracking.refine import AGREEMENT_IOU, AGREEMENT_SLICES, mask_iou
from .bench import CLICK, chest_volume

SWEEP_SLICES = (1, 2, 3, 5, 8)
SWEEP_IOU = (0.95, 0.98, 0.99)


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the work
    itself, the wall time includes waiting for the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _gflop(fn) -> float:
    """The work itself, independent of the machine's load: floating-point operations, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _measure(what: tuple, click, repeats: int, setup=lambda: None, after=lambda: None) -> dict:
    """One row: `click` once under the FLOP counter, then `repeats` timed times (setup and after
    untimed around each)."""
    setup()
    gflop = _gflop(click)
    after()
    times = []
    for _ in range(repeats):
        setup()
        times.append(_timed(click))
        after()
    (when, slice_kind, prepared) = what
    return {"when": when, "slice": slice_kind, "prepared": prepared, "gflop": gflop, "repeats": repeats,
            "median_ms": 1000 * statistics.median(t[0] for t in times), "min_ms": 1000 * min(t[0] for t in times),
            "cpu_ms": 1000 * statistics.median(t[1] for t in times)}


def click_latency(model, slices: int = 24, repeats: int = 5, memory: str = "sam2") -> list[dict]:
    """Click cost on the engine (median time, CPU time, GFLOP): before propagation, then after it on
    the prompted slice and on a propagated one, each prepared (Session.prepare first, untimed) or not."""
    volume = chest_volume(slices)
    mid, other = slices // 2, slices // 2 + slices // 4
    s = model.open(volume, memory=memory)
    s.add_prompt(mid, points=[CLICK], labels=[1])
    near = iter([(CLICK[0] + 1 + i % 3, CLICK[1]) for i in range(4 * repeats + 4)])  # points that add up

    def on_prompted():
        s.add_prompt(mid, points=[next(near)], labels=[1])

    def on_propagated():
        s.add_prompt(other, points=[(60.0, 40.0)], labels=[0])

    def fresh(frame=None):  # drop what an earlier click prepared; prepare `frame` if given
        s._tracking.memory_changed()
        if frame is not None:
            s.prepare(frame)

    rows = [_measure(("before propagation", "prompted", False), on_prompted, repeats)]
    list(s.propagate("both"))
    undo = lambda: s.clear_prompts(other, 1)  # noqa: E731 - the slice is a propagated one again
    rows += [_measure(("after propagation", "prompted", False), on_prompted, repeats, fresh),
             _measure(("after propagation", "prompted", True), on_prompted, repeats, lambda: fresh(mid)),
             _measure(("after propagation", "propagated", False), on_propagated, repeats, fresh, undo),
             _measure(("after propagation", "propagated", True), on_propagated, repeats, lambda: fresh(other), undo),
             _measure(("Session.prepare itself", "propagated", None), lambda: s.prepare(other), repeats, fresh)]
    return rows


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


def correction_cost(model, slices: int = 200, offset: int = 15, memory: str = "sam2") -> dict:
    """First pass, then a correction `offset` slices above the prompt (at most a quarter of the
    volume above it; the slice prepared first, as the view showing it has it) refined two ways (two sessions
    on the same frames, the second reusing the first's image features): time, slices re-tracked,
    Dice between the results; and the agreement sweep."""
    volume = chest_volume(slices)
    mid = slices // 2
    fix = mid + min(offset, slices // 4)
    results = {}
    for until in ("conditioning", "agreement"):
        s = model.open(volume, memory=memory)
        s.add_prompt(mid, points=[CLICK], labels=[1])
        first_s, first_cpu = _timed(lambda: list(s.propagate("both")))
        before = s.mask(1)
        s.prepare(fix)  # the user looks at the slice before correcting it: idle time, untimed

        def correct():
            s.add_prompt(fix, points=[(88.0, 64.0)], labels=[1])
            list(s.propagate("both", start=fix, until=until))

        refine_s, refine_cpu = _timed(correct)
        report = s.last_propagation
        results[until] = {"first_pass_s": first_s, "first_cpu_s": first_cpu, "refine_s": refine_s,
                          "refine_cpu_s": refine_cpu, "retracked": report.refined,
                          "reasons": [d.reason for d in report.directions], "before": before, "after": s.mask(1),
                          "summary": report.summary()}
    cond, agree = results["conditioning"], results["agreement"]
    first, first_cpu = cond["first_pass_s"], cond["first_cpu_s"]  # the cold pass (the second session
    # reused the first's cached image features)
    rows = [{"until": u, "first_pass_s": first, "refine_s": r["refine_s"], "retracked": r["retracked"],
             "of_first_pass": r["refine_s"] / first, "first_cpu_s": first_cpu, "refine_cpu_s": r["refine_cpu_s"],
             "cpu_of_first_pass": r["refine_cpu_s"] / first_cpu, "reasons": "/".join(r["reasons"]),
             "dice_vs_conditioning": _dice(r["after"], cond["after"]), "summary": r["summary"]}
            for u, r in (("conditioning", cond), ("agreement", agree))]
    return {"slices": slices, "image_size": model.image_size, "memory": memory, "correction_at": fix,
            "prompt_at": mid, "rows": rows, "sweep": agreement_sweep(cond["before"], cond["after"], fix)}


def agreement_sweep(before: np.ndarray, after: np.ndarray, fix: int) -> list[dict]:
    """For each (K, tau): where the forward pass of a refine from `fix` would stop, the slices it would
    re-track, and the Dice of that result against the full refine (`after`)."""
    n = len(before)
    ious = [mask_iou(before[f], after[f]) for f in range(n)]
    out = []
    for k in SWEEP_SLICES:
        for tau in SWEEP_IOU:
            run, stop = 0, n - 1
            for f in range(fix + 1, n):
                run = run + 1 if ious[f] >= tau else 0
                if run >= k:
                    stop = f
                    break
            predicted = np.concatenate([after[:stop + 1], before[stop + 1:]])
            out.append({"K": k, "tau": tau, "forward_retracked": stop - fix,
                        "forward_full": n - 1 - fix, "dice_vs_conditioning": _dice(predicted, after),
                        "chosen": k == AGREEMENT_SLICES and tau == AGREEMENT_IOU})
    return out


def _fraction(x: float) -> str:
    return f"1/{1 / x:.0f}" if 0 < x < 0.5 else f"{x:.2f}x"


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def format_click_table(rows: list[dict], image_size: int) -> str:
    base = next(r["median_ms"] for r in rows if r["when"] == "before propagation")
    base_cpu = next(r["cpu_ms"] for r in rows if r["when"] == "before propagation")
    base_gflop = next(r["gflop"] for r in rows if r["when"] == "before propagation")
    body = [[r["when"], r["slice"], "-" if r["prepared"] is None else ("yes" if r["prepared"] else "no"),
             f"{r['median_ms']:.0f}", f"{r['min_ms']:.0f}", f"{r['median_ms'] / base:.1f}x", f"{r['cpu_ms']:.0f}",
             f"{r['cpu_ms'] / base_cpu:.1f}x", f"{r['gflop']:.2f}", f"{r['gflop'] / base_gflop:.1f}x"] for r in rows]
    return (f"Click cost on the engine at {image_size} px (median of {rows[0]['repeats']}; CPU: this process's "
            "CPU time, all threads; GFLOP: counted by torch, independent of the machine's load)\n"
            + _table(["click", "slice", "prepared", "median ms", "min ms", "vs before", "CPU ms", "CPU vs before",
                      "GFLOP", "GFLOP vs before"], body))


def format_correction_table(result: dict) -> str:
    body = [[r["until"], f"{r['first_pass_s']:.1f}", f"{r['refine_s']:.1f}", str(r["retracked"]),
             _fraction(r["of_first_pass"]), _fraction(r["cpu_of_first_pass"]), r["reasons"],
             f"{r['dice_vs_conditioning']:.4f}"] for r in result["rows"]]
    sweep = [[str(r["K"]), f"{r['tau']:.2f}", f"{r['forward_retracked']}/{r['forward_full']}",
              f"{r['dice_vs_conditioning']:.4f}", "<-" if r["chosen"] else ""] for r in result["sweep"]]
    return "\n".join([
        f"Correction on {result['slices']} slices at {result['image_size']} px ({result['memory']} memory; prompt "
        f"at {result['prompt_at']}, correction at {result['correction_at']})",
        _table(["until", "first pass s", "refine s", "re-tracked", "of first pass", "CPU: of first pass",
                "stopped (fwd/bwd)", "Dice vs conditioning"], body),
        "",
        "Agreement sweep (forward pass, predicted from the until='conditioning' refine)",
        _table(["K", "tau", "re-tracked", "Dice vs conditioning", "chosen"], sweep)])
