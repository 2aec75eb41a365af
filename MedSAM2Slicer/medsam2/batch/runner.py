"""Runs one function per case with the model loaded once per worker: in this process, or on Ray.

`run_tasks(tasks, work, model_options, cluster, on_done)`: `tasks` yields (key, payload) lazily (so
shipped volumes are read only as workers free up); `work(model, *payload)` runs on a worker and
returns that case's result; `on_done(key, result)` is called in this process as cases finish, in
the order they finish; a result is an exception when the case could not be run at all.

On Ray (the engine for this; no home-made pool): one actor per worker, each holding a loaded
model. One GPU per actor where the cluster has GPUs (`gpus_per_case`), else `workers` actors of
`cpus_per_worker` CPUs (torch threads) each. One Ray task per case. A worker process that dies
mid-case (killed, out of memory, its node lost) is restarted by Ray, which loads the model again
and re-runs the case (`max_restarts` / `max_task_retries`); each case's output is written
atomically, so a killed try leaves no half file. `local` starts a Ray runtime in this process
and stops it at the end; an address joins a running cluster (`ray start --head`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..errors import InputError, MedSAM2Error

RETRIES = 3  # restarts of a dead worker, and re-runs of the case it held


@dataclass(frozen=True)
class Cluster:
    """Where the cases run: ray None = this process; "local" = a Ray runtime started here; else the
    address of a running cluster (host:port, or "auto")."""

    ray: str | None = None
    workers: int | None = None            # actors; default one per GPU, or 1 without GPUs
    gpus_per_case: float | None = None    # default 1 where the cluster has GPUs (and --device is not cpu)
    cpus_per_worker: int | None = None    # default: the CPUs shared out between the workers
    ship_volumes: bool = False            # the driver reads inputs and ships them through the object store


def model_options(args) -> dict:
    """The verb's arguments as plain values (picklable) for load_model_for_cli on each worker: every
    model flag the verb has, including those common.py adds later, travels without naming them here."""
    simple = (str, int, float, bool, type(None), tuple, list)
    return {k: v for k, v in vars(args).items() if not k.startswith("_") and isinstance(v, simple)}


def load_model(options: dict, meaning: str = "results"):
    """The model as the verb loads it (banners included); `meaning`: what random weights make void."""
    import argparse

    from ..cli.common import load_model_for_cli

    return load_model_for_cli(argparse.Namespace(**options), meaning)


def run_tasks(tasks: Iterable[tuple[str, tuple]], work: Callable, options: dict, cluster: Cluster,
              on_done: Callable[[str, Any], None], on_ready: Callable[[int], None] | None = None,
              meaning: str = "results") -> None:
    """Run work(model, *payload) for every (key, payload) of `tasks`; see the module's docstring.
    on_ready(workers) is called once the models are loaded, before the first case. No case to run:
    no model is loaded and no Ray runtime started (a re-run of a finished batch takes seconds)."""
    import itertools

    tasks = iter(tasks)
    first = next(tasks, None)
    if first is None:
        return
    tasks = itertools.chain([first], tasks)
    if cluster.ray is None:
        model = load_model(options, meaning)
        if on_ready is not None:
            on_ready(1)
        for key, payload in tasks:
            try:
                result = work(model, *payload)
            except Exception as exc:  # noqa: BLE001 - reported as the case's failure
                result = exc
            on_done(key, result)
        return
    _run_on_ray(tasks, work, options, cluster, on_done, on_ready, meaning)


class CaseWorker:
    """A Ray actor: one loaded model, then one case per call."""

    def __init__(self, options: dict, threads: int, meaning: str):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.model = load_model(options, meaning)

    def ready(self) -> int:
        return os.getpid()

    def run(self, work: Callable, payload: tuple):
        return work(self.model, *payload)


def _connect(cluster: Cluster, options: dict) -> bool:
    """Join the cluster, or start the local runtime; True when this process started it."""
    import logging

    import ray  # cli/batch.py said how to install it if missing

    if cluster.ray != "local":
        try:
            ray.init(address=cluster.ray, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise InputError(f"--ray {cluster.ray}: cannot join a Ray cluster there ({exc}); start one with "
                             "`ray start --head` (docs/cli.md#medsam2-batch)") from None
        return True
    workers = cluster.workers or 1
    cpus = max(os.cpu_count() or 1, workers * (cluster.cpus_per_worker or 1))
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    # workers import medsam2 from where this process does (a source checkout too): the runtime's
    # processes inherit this environment (a runtime_env would make Ray replace its idle workers)
    os.environ["PYTHONPATH"] = path
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def plan(cluster: Cluster, resources: dict, device: str) -> tuple[int, float, int]:
    """(actors, GPUs per actor, CPUs per actor) for the cluster's resources."""
    gpus = float(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    per_case = cluster.gpus_per_case
    if per_case is None:
        per_case = 1.0 if gpus and device != "cpu" else 0.0
    if per_case < 0:
        raise InputError(f"--gpus-per-case {per_case:g}: give 0 (CPU workers) or more")
    if per_case > 0:
        if gpus < per_case:
            raise InputError(f"--gpus-per-case {per_case:g}: the Ray cluster has {gpus:g} GPU(s); "
                             "give --gpus-per-case 0 to run on CPUs")
        workers = cluster.workers or int(gpus // per_case)
        return workers, per_case, cluster.cpus_per_worker or 1
    workers = cluster.workers or 1
    return workers, 0.0, cluster.cpus_per_worker or max(1, cpus // workers)


def _start_workers(cluster: Cluster, options: dict, meaning: str) -> list:
    import ray

    workers, gpus, cpus = plan(cluster, ray.cluster_resources(), str(options.get("device", "auto")))
    actor = ray.remote(CaseWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=RETRIES,
                                           max_task_retries=RETRIES)
    actors = [actor.remote(options, cpus, meaning) for _ in range(workers)]
    try:
        ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MedSAM2Error):
            raise cause from None
        raise MedSAM2Error(f"the Ray workers could not load the model: {exc}") from None
    return actors


def _run_on_ray(tasks, work, options, cluster, on_done, on_ready, meaning) -> None:
    import ray

    started = _connect(cluster, options)
    try:
        idle = _start_workers(cluster, options, meaning)
        if on_ready is not None:
            on_ready(len(idle))
        running: dict = {}  # task ref -> (key, actor)
        pending = True
        while True:
            while idle and pending:
                item = next(tasks, None)
                if item is None:
                    pending = False
                    break
                actor = idle.pop()
                ref = actor.run.remote(work, ray.put(tuple(item[1])))
                running[ref] = (item[0], actor)
            if not running:
                break
            done, _ = ray.wait(list(running), num_returns=1)
            key, actor = running.pop(done[0])
            try:
                result = ray.get(done[0])
                idle.append(actor)
            except ray.exceptions.ActorDiedError as exc:  # restarts used up: this worker is gone
                result = MedSAM2Error(f"its worker died while running it, and Ray's {RETRIES} restart(s) and "
                                      f"re-run(s) are used up ({_first_line(exc)})")
            except ray.exceptions.RayError as exc:
                result = getattr(exc, "cause", None) or MedSAM2Error(_first_line(exc))
                idle.append(actor)
            on_done(key, result)
            if not idle and not running and pending:
                for key, _payload in tasks:  # every worker is gone: say so for each case left
                    on_done(key, MedSAM2Error("not run: every Ray worker died (see the errors above)"))
                break
    finally:
        if started:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__
