"""The summary table of `medsam2 batch`, and what a re-run takes from earlier runs.

DIR/summary.csv (DIR/summary-I-of-N.csv for `--part I/N`) has one row per case, in manifest order:
case, status (`ok`: segmented now; `failed`: see error; `skipped`: its output was complete from an
earlier run, not run again), error, slices, seconds (the case on its worker: read, prompt, segment,
write, score), peak_memory_mb (GPU: the peak torch allocated during the case; CPU: the worker
process's peak resident memory so far), and dice / hd95_mm when the case has a reference (means
over the reference's objects; hd95_mm is inf when an object was not found at all). A skipped row
keeps the figures of the earlier row that made its output. The table is rewritten (atomically)
after every case, so a crash loses no row.

A run without --part reads summary.csv and every summary-I-of-N.csv in DIR: that is how the
shares of a split run are merged.
"""

from __future__ import annotations

import csv
import glob
import os
import re

from ..io.files import atomic_output

COLUMNS = ("case", "status", "error", "slices", "seconds", "peak_memory_mb", "dice", "hd95_mm")
FIGURES = ("slices", "seconds", "peak_memory_mb", "dice", "hd95_mm")
OUTPUT_SUFFIX = ".seg.nrrd"
PART_SUMMARY = re.compile(r"summary-(\d+)-of-(\d+)\.csv")


def summary_name(part: tuple[int, int] | None) -> str:
    return "summary.csv" if part is None else f"summary-{part[0]}-of-{part[1]}.csv"


def output_path(folder: str, case: str) -> str:
    return os.path.join(folder, case + OUTPUT_SUFFIX)


def write_summary(path: str, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in COLUMNS})


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def earlier_rows(folder: str) -> dict[str, dict]:
    """{case: row} from DIR's summary.csv and summary-I-of-N.csv files; where several files have a row
    for a case, an `ok` row wins over the others (it describes the output that is there)."""
    found: dict[str, dict] = {}
    paths = sorted(glob.glob(os.path.join(glob.escape(folder), "summary-*-of-*.csv")))
    paths = [p for p in paths if PART_SUMMARY.fullmatch(os.path.basename(p))]
    for path in [os.path.join(folder, "summary.csv")] + paths:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, csv.Error, UnicodeDecodeError):
            continue  # no table, or not ours: nothing to carry over
        for row in rows:
            case = row.get("case")
            if case and (case not in found or row.get("status") in ("ok", "skipped")):
                found[case] = row
    return found


def skipped_row(case: str, earlier: dict | None) -> dict:
    """The row of a case whose output was complete before this run: the earlier figures, kept."""
    row = {"case": case, "status": "skipped", "error": ""}
    if earlier and earlier.get("status") in ("ok", "skipped"):
        row.update({k: earlier.get(k, "") for k in FIGURES})
    return row


def output_complete(path: str, volume_path: str) -> bool:
    """Whether `path` is a whole segmentation of that volume: it reads back to the end (a truncated
    or half-copied file does not) and its voxel grid has the volume's size (a file header, read
    cheaply; not checked for a DICOM folder). Being there is not enough."""
    if not os.path.isfile(path):
        return False
    import slicerio

    try:
        seg = slicerio.read_segmentation(path)
    except Exception:  # whatever slicerio or pynrrd raise for a damaged file: not complete
        return False
    size = _volume_size(volume_path)
    return size is None or tuple(seg["voxels"].shape[-3:]) == size


def _volume_size(volume_path: str):
    """(i, j, k) size from the image file's header, or None when it cannot be had cheaply."""
    if os.path.isdir(volume_path) or not os.path.isfile(volume_path):
        return None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(volume_path)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return tuple(int(n) for n in reader.GetSize())
