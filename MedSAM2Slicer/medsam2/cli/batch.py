"""`medsam2 batch`: segment the cases of a manifest, in this process or on Ray, resumable.

The manifest's shape and the model arguments are checked before anything slow; each case's own
files are its business (a bad one is a `failed` row). The work itself: medsam2/batch/.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

from .common import (add_memory_argument, add_model_arguments, add_window_argument, check_model_inputs, say)


def add_ray_arguments(p) -> None:
    """--ray, --workers, --gpus-per-case, --cpus-per-worker, --ship-volumes: the same for every verb
    that runs cases through medsam2.batch.runner (`batch`, `evaluate`)."""
    g = p.add_argument_group("running on Ray (several workers, GPUs or machines; docs/cli.md#medsam2-batch)")
    g.add_argument("--ray", metavar="local|ADDRESS",
                   help="local: start a Ray runtime on this machine (one worker per GPU, or --workers N on a CPU); "
                        "ADDRESS (host:port, or auto): join a cluster started with `ray start --head`. "
                        "Without --ray the cases run one after another in this process")
    g.add_argument("--workers", type=int, metavar="N",
                   help="Ray workers, each with its own loaded model (default: one per GPU, or 1 without GPUs)")
    g.add_argument("--gpus-per-case", type=float, metavar="G",
                   help="GPUs each worker holds (default 1 where the cluster has GPUs; 0 runs on CPUs)")
    g.add_argument("--cpus-per-worker", type=int, metavar="C",
                   help="CPU cores (torch threads) per worker (default: the CPUs shared out between the workers; "
                        "1 with GPUs)")
    g.add_argument("--ship-volumes", action="store_true",
                   help="read the inputs here and send them to the workers through Ray's object store, and write "
                        "the outputs here (for nodes without storage shared with this machine)")


def cluster_from_args(args):
    """The checked --ray options as a runner.Cluster."""
    from ..batch.runner import Cluster
    from ..errors import InputError

    ray = getattr(args, "ray", None)
    if ray is None:
        flags = (("--workers", args.workers), ("--gpus-per-case", args.gpus_per_case),
                 ("--cpus-per-worker", args.cpus_per_worker), ("--ship-volumes", args.ship_volumes))
        given = [f for f, v in flags if v is not None and v is not False]
        if given:
            raise InputError(f"{', '.join(given)} need --ray (local, or a cluster's address)")
    elif importlib.util.find_spec("ray") is None:
        raise InputError(f"--ray {ray}: Ray is not installed here; install the batch extra into this environment: "
                         f"{sys.executable} -m pip install 'ray==2.60.0' (or, from the sources, "
                         "python -m pip install -e \".[batch]\")")
    for flag, value in (("--workers", args.workers), ("--cpus-per-worker", args.cpus_per_worker)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: give 1 or more")
    return Cluster(ray=ray, workers=args.workers, gpus_per_case=args.gpus_per_case,
                   cpus_per_worker=args.cpus_per_worker, ship_volumes=bool(args.ship_volumes))


def add_arguments(p):
    p.add_argument("manifest", metavar="MANIFEST",
                   help="CSV with columns case, volume, and prompts (prompt files, ';' between several) or label "
                        "(a label map to take one prompt per object from); optional: reference (scored)")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="folder for <case>.seg.nrrd and summary.csv (created if missing)")
    p.add_argument("--prompt-from-label", default="box", choices=("box", "point"),
                   help="for cases with a label: a box around each object on the slice where it is largest "
                        "(default), or a point at its innermost pixel there")
    p.add_argument("--part", metavar="I/N",
                   help="process only the I-th of N interleaved shares of the manifest and write summary-I-of-N.csv "
                        "(a SLURM array job, or N GPUs by hand); a later run without --part merges the summaries")
    p.add_argument("--overwrite", action="store_true",
                   help="segment every case again, also those whose output is complete from an earlier run")
    add_model_arguments(p)
    add_memory_argument(p)
    add_window_argument(p, "intensity window for every case, e.g. -160 240 for abdomen CT "
                           "(default: each volume's 0.5-99.5 percentiles)")
    add_ray_arguments(p)


def _output_folder(path: str) -> str:
    from ..errors import InputError

    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--output {path}: is a file; give a folder")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"--output {path}: the folder {parent} does not exist; create it first")
    os.makedirs(path, exist_ok=True)
    return path


def run(args):
    from ..batch import case as case_mod, manifest, summary
    from ..batch.runner import model_options, run_tasks

    # 1. inputs, before anything slow
    check_model_inputs(args)
    cluster = cluster_from_args(args)
    cases = manifest.read_manifest(args.manifest)
    part = manifest.parse_part(args.part) if args.part else None
    share = manifest.part_of(cases, *part) if part else cases
    folder = os.path.abspath(_output_folder(args.output))  # workers may run elsewhere (another cwd, node)
    settings = case_mod.CaseSettings(output_dir=folder, memory=args.memory, prompt_from_label=args.prompt_from_label,
                                     window=tuple(args.window) if args.window else None)

    # 2. what earlier runs finished: complete outputs are kept, not rewritten
    earlier = {} if args.overwrite else summary.earlier_rows(folder)
    rows, todo = {}, []
    for c in share:
        if not args.overwrite and summary.output_complete(summary.output_path(folder, c.case), c.volume):
            rows[c.case] = summary.skipped_row(c.case, earlier.get(c.case))
        else:
            todo.append(c)
    table = os.path.join(folder, summary.summary_name(part))
    where = f"part {part[0]} of {part[1]}: " if part else ""
    say(f"{args.manifest}: {where}{len(share)} case(s); {len(share) - len(todo)} complete from earlier runs "
        f"(skipped), {len(todo)} to segment")
    order = [c.case for c in share]
    summary.write_summary(table, [rows[k] for k in order if k in rows])

    # 3. the cases, as workers free up
    bar = _progress(len(todo))
    by_name = {c.case: c for c in todo}
    shipped: dict = {}  # --ship-volumes: case -> (inputs read here, seconds it took), until written

    def done(key, result):
        row = _row(by_name[key], result, settings, shipped.pop(key, (None, 0.0)))
        rows[key] = row
        if row["status"] == "failed":
            bar.write(f"{key}: failed: {row['error']}", file=sys.stderr)
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in rows.values()), refresh=False)
        bar.update(1)
        summary.write_summary(table, [rows[k] for k in order if k in rows])

    try:
        if cluster.ship_volumes:
            tasks = _shipped_tasks(todo, settings, done, shipped)
            run_tasks(tasks, case_mod.segment_shipped, model_options(args), cluster, done)
        else:
            run_tasks(((c.case, (c, settings)) for c in todo), case_mod.run_case, model_options(args), cluster, done)
    finally:
        bar.close()
    return _report(table, [rows[k] for k in order if k in rows])


def _shipped_tasks(todo, settings, done, shipped):
    """--ship-volumes: read each case here just before a worker takes it (kept in `shipped` until its
    masks come back); a case that cannot be read is finished (failed) here and never shipped."""
    from ..batch.case import read_case

    for c in todo:
        started = time.perf_counter()
        try:
            inputs = read_case(c, settings)
        except Exception as exc:  # noqa: BLE001 - the case's failed row
            done(c.case, exc)
            continue
        shipped[c.case] = (inputs, time.perf_counter() - started)
        yield c.case, (inputs, settings)


def _row(c, result, settings, shipped: tuple) -> dict:
    """A case's summary row from what its worker returned (shipped: the inputs read here, and the
    seconds that took)."""
    from ..batch.case import Segmented, failed_row, finish_case, unpack

    if isinstance(result, dict):
        return result
    inputs, read_seconds = shipped
    if isinstance(result, Segmented):  # shipped: write and score here
        started = time.perf_counter()
        try:
            row = finish_case(c, inputs, unpack(result, inputs), settings)
        except Exception as exc:  # noqa: BLE001
            return failed_row(c, exc)
        row.update(seconds=round(result.seconds + read_seconds + time.perf_counter() - started, 2),
                   peak_memory_mb=round(result.peak_memory_mb, 1))
        return row
    return failed_row(c, result)


def _report(table: str, rows: list) -> int:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    print(f"wrote {table}: {counts['ok']} segmented, {counts['skipped']} skipped (complete from earlier runs), "
          f"{counts['failed']} failed")
    for r in rows:
        if r["status"] == "failed":
            print(f"  {r['case']}: {r['error']}")
    return 1 if counts["failed"] else 0


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="case", desc="cases", file=sys.stderr, dynamic_ncols=True)
