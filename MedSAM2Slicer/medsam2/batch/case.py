"""One case of `medsam2 batch`: read, prompt, segment, write atomically, score -> a summary row.

The work is split where --ship-volumes splits it between machines: `read_case` (the volume, the
prompts, the reference; on the worker, or on the driver when volumes are shipped),
`segment_inputs` (the model; always on a worker) and `finish_case` (write DIR/<case>.seg.nrrd
and score; where the output folder is). `run_case` does all three on a worker. Any error of a
case becomes its `failed` row: a bad case never stops the others.
"""

from __future__ import annotations

import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, MedSAM2Error
from .manifest import Case
from .summary import output_path

PROMPT_KINDS = {"box": "box", "point": "click"}  # --prompt-from-label -> the study's prompt kind


@dataclass(frozen=True)
class CaseSettings:
    """What every case of a batch shares (besides the model)."""

    output_dir: str
    memory: str = "self-sorting"
    window: tuple | None = None
    prompt_from_label: str = "box"


@dataclass
class CaseInputs:
    """Everything a case reads from disk, ready for the model (picklable: it crosses Ray's object store)."""

    volume: object                  # io.volume_io.Volume
    objects: list                   # prompts_io.ObjectPrompts
    frame_prompts: list             # prompts_io.FramePrompt
    reference: list | None = None   # [(label value, name, bool mask (k, j, i))]


@dataclass
class Segmented:
    """A worker's answer for shipped inputs: the masks, packed, and what the case cost."""

    masks: list                     # np.packbits of each object's mask, in object order
    slices: int
    seconds: float
    peak_memory_mb: float


# -- read ------------------------------------------------------------------------------------------
def read_case(case: Case, settings: CaseSettings) -> CaseInputs:
    """Read the case's files and make its prompts; InputError says what is wrong with which file."""
    from ..io import prompts_io, volume_io

    volume = volume_io.read_volume(case.volume)
    if case.label is not None:
        objects, frame_prompts = _label_prompts(case.label, volume, settings.prompt_from_label)
    else:
        objects = prompts_io.read_prompts(list(case.prompts))
        frame_prompts = prompts_io.to_frame_prompts(objects, volume, 0)
    reference = _read_reference(case.reference, volume) if case.reference else None
    return CaseInputs(volume=volume, objects=objects, frame_prompts=frame_prompts, reference=reference)


def _read_reference(path: str, volume):
    from ..cli.evaluate import read_reference  # one reader of reference labels, shared with `evaluate`

    return read_reference(path, volume)


def _label_prompts(path: str, volume, kind: str):
    """One object per labelled value of `path`, prompted on the slice where it is largest."""
    from ..io.prompts_io import FramePrompt, ObjectPrompts
    from ..study.evaluate import reference_prompt

    objects, frame_prompts = [], []
    for value, name, mask in _read_reference(path, volume):
        if not mask.any():
            raise InputError(f"label {path}: object {value} ({name}) has no voxel on this volume's grid; "
                             "nothing to put a prompt on")
        p = reference_prompt(mask, PROMPT_KINDS[kind], axis=0, slice_rule="largest")
        objects.append(ObjectPrompts(id=value, name=name))
        frame_prompts.append(FramePrompt(
            obj_id=value, frame=p["frame"], box=None if p.get("box") is None else np.asarray(p["box"], float),
            points=None if p.get("points") is None else np.asarray(p["points"], float),
            labels=None if p.get("labels") is None else np.asarray(p["labels"], np.int64)))
    return objects, frame_prompts


# -- segment ---------------------------------------------------------------------------------------
def segment_inputs(model, inputs: CaseInputs, settings: CaseSettings) -> list:
    """[(object, index, bool mask)] exactly as `medsam2 segment` makes them (tracking/volume_job.py)."""
    from ..tracking.volume_job import open_prompted, propagate_objects

    session = open_prompted(model, inputs.volume, inputs.frame_prompts, memory=settings.memory,
                            window=settings.window)
    try:
        return propagate_objects(session, inputs.objects)
    finally:
        session.close()


def _start_peak(model) -> None:
    if getattr(model, "device", None) is not None and model.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(model.device)


def _peak_mb(model) -> float:
    if getattr(model, "device", None) is not None and model.device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(model.device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


# -- write and score -------------------------------------------------------------------------------
def finish_case(case: Case, inputs: CaseInputs, results: list, settings: CaseSettings) -> dict:
    """Write DIR/<case>.seg.nrrd atomically (after removing what a killed worker left of an earlier
    try) and score it against the reference; the row's figures besides time and memory."""
    from ..io.files import leftover_temporaries
    from ..tracking.volume_job import write_result
    from .summary import OUTPUT_SUFFIX

    path = output_path(settings.output_dir, case.case)
    for stale in leftover_temporaries(path, OUTPUT_SUFFIX):
        os.remove(stale)
    write_result(path, results, inputs.volume, overwrite=True)
    row = {"case": case.case, "status": "ok", "error": "", "slices": int(inputs.volume.array.shape[0])}
    if inputs.reference is not None:
        row.update(score(results, inputs.reference, inputs.volume.spacing[::-1]))
    return row


def score(results: list, reference: list, spacing_kji) -> dict:
    """Mean Dice and HD95 over the reference's objects; each matched to the result object of the same
    name, else of the same id (as `evaluate` matches prompt files); an unmatched one scores as empty."""
    from ..study.evaluate import dice, hd95

    dices, hds = [], []
    for value, name, ref in reference:
        match = [m for o, _i, m in results if o.name == name] or [m for o, _i, m in results if o.id == value]
        pred = match[0] if match else np.zeros_like(ref)
        dices.append(dice(pred, ref))
        hds.append(hd95(pred, ref, spacing_kji))
    return {"dice": float(np.mean(dices)), "hd95_mm": float(np.mean(hds))}


# -- the whole case --------------------------------------------------------------------------------
def failed_row(case: Case, exc: BaseException, seconds: float | None = None) -> dict:
    """A `failed` row whose error says what went wrong: the message of our own errors, the type and
    message (and where) of anything else."""
    if isinstance(exc, MedSAM2Error):
        error = str(exc)
    else:
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame else ""
        error = f"{type(exc).__name__}: {exc}{where}"
    row = {"case": case.case, "status": "failed", "error": " ".join(error.split())}
    if seconds is not None:
        row["seconds"] = round(seconds, 2)
    return row


def run_case(model, case: Case, settings: CaseSettings) -> dict:
    """Read, segment, write and score one case on this worker; its summary row, `failed` on any error."""
    started = time.perf_counter()
    try:
        _start_peak(model)
        inputs = read_case(case, settings)
        results = segment_inputs(model, inputs, settings)
        row = finish_case(case, inputs, results, settings)
    except Exception as exc:  # noqa: BLE001 - a case's failure is its row, never the batch's end
        return failed_row(case, exc, time.perf_counter() - started)
    row.update(seconds=round(time.perf_counter() - started, 2), peak_memory_mb=round(_peak_mb(model), 1))
    return row


def segment_shipped(model, inputs: CaseInputs, settings: CaseSettings) -> Segmented:
    """--ship-volumes, on the worker: segment inputs read by the driver; the packed masks go back."""
    started = time.perf_counter()
    _start_peak(model)
    results = segment_inputs(model, inputs, settings)
    return Segmented(masks=[np.packbits(m, axis=None) for _o, _i, m in results],
                     slices=int(inputs.volume.array.shape[0]), seconds=time.perf_counter() - started,
                     peak_memory_mb=_peak_mb(model))


def unpack(segmented: Segmented, inputs: CaseInputs) -> list:
    """The driver's [(object, index, bool mask)] of a worker's packed answer."""
    shape = inputs.volume.array.shape
    size = int(np.prod(shape))
    return [(obj, index, np.unpackbits(bits, count=size).astype(bool).reshape(shape))
            for (index, obj), bits in zip(enumerate(inputs.objects), segmented.masks)]
