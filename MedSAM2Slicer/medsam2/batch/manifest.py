"""The manifest of `medsam2 batch`: a CSV with one case per row, checked before anything slow.

Columns: `case` (the output's name: DIR/<case>.seg.nrrd), `volume` (an image file or a DICOM series
folder), and per case `prompts` (prompt files as `medsam2 segment --prompts` reads; several joined
with `;`) or `label` (a label map or .seg.nrrd: one prompt per labelled object), and optionally
`reference` (a label map or .seg.nrrd the result is scored against). Relative paths are relative to
the manifest's folder, so a manifest travels with its data. Whether each file exists and reads is
the case's business (a bad file fails that case, not the batch); the manifest's own shape is
checked here.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

from ..errors import InputError

REQUIRED = ("case", "volume")
OPTIONAL = ("prompts", "label", "reference")
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Case:
    """One row of the manifest, paths made absolute."""

    case: str
    volume: str
    prompts: tuple = ()           # prompt files, or () when the prompts come from `label`
    label: str | None = None
    reference: str | None = None
    row: int = 0                  # the CSV line, for messages


def _path(value: str, folder: str) -> str:
    value = os.path.expanduser(value.strip())
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(folder, value))


def _read_rows(path: str) -> tuple[list, list]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        raise InputError(f"MANIFEST {path}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"MANIFEST {path}: cannot read it as a CSV file ({exc})") from None


def _check_header(path: str, header: list) -> None:
    names = [h.strip() for h in header]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise InputError(f"MANIFEST {path}: no column {', '.join(missing)}; the first line must name the columns "
                         f"case,volume and prompts or label (optional: reference); it has {', '.join(names) or 'none'}")
    unknown = [h for h in names if h not in REQUIRED + OPTIONAL]
    if unknown:
        raise InputError(f"MANIFEST {path}: unknown column(s) {', '.join(unknown)}; "
                         f"the columns are {', '.join(REQUIRED + OPTIONAL)}")
    if "prompts" not in names and "label" not in names:
        raise InputError(f"MANIFEST {path}: give a prompts column (prompt files) or a label column "
                         "(label maps to take the prompts from)")


def _case(row: dict, line: int, path: str, folder: str) -> Case:
    where = f"MANIFEST {path} line {line}"
    values = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    if None in row:
        raise InputError(f"{where}: more fields than columns (a comma inside a path? quote the field)")
    name = values.get("case", "")
    if not CASE_NAME.fullmatch(name) or name.endswith(".seg.nrrd"):
        raise InputError(f"{where}: case {name!r} cannot name an output file: use letters, digits, and _ . + - "
                         "(no folders, not starting with a dot)")
    if not values.get("volume"):
        raise InputError(f"{where}: case {name}: the volume is empty")
    prompts, label = values.get("prompts", ""), values.get("label", "")
    if bool(prompts) == bool(label):
        raise InputError(f"{where}: case {name}: give either prompts or a label to take the prompts from"
                         f"{', not both' if prompts else ''}")
    reference = values.get("reference", "")
    return Case(case=name, volume=_path(values["volume"], folder),
                prompts=tuple(_path(p, folder) for p in prompts.split(";") if p.strip()),
                label=_path(label, folder) if label else None,
                reference=_path(reference, folder) if reference else None, row=line)


def read_manifest(path) -> list[Case]:
    """The manifest's cases in file order; InputError naming the line and what to change."""
    path = os.fspath(path)
    header, rows = _read_rows(path)
    _check_header(path, header)
    folder = os.path.dirname(os.path.abspath(path))
    cases, seen = [], {}
    for n, row in enumerate(rows, start=2):
        if not any((v or "").strip() for k, v in row.items() if k is not None):
            continue  # a blank line
        case = _case(row, n, path, folder)
        if case.case in seen:
            raise InputError(f"MANIFEST {path} line {n}: case {case.case} is also on line {seen[case.case]}; "
                             "each case writes DIR/<case>.seg.nrrd, so case names must be unique")
        seen[case.case] = n
        cases.append(case)
    if not cases:
        raise InputError(f"MANIFEST {path}: lists no cases (one line per case below the column names)")
    return cases


def parse_part(text: str) -> tuple[int, int]:
    """--part I/N -> (I, N), 1 <= I <= N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise InputError(f"--part {text}: give I/N with 1 <= I <= N, e.g. --part 2/4 for the second of four shares")
    return int(match[1]), int(match[2])


def part_of(cases: list, part: int, parts: int) -> list:
    """The part-th of `parts` interleaved shares (1-based): cases part, part + N, part + 2N, ...
    Interleaved rather than in blocks, so that a manifest sorted by size spreads its big cases."""
    return cases[part - 1::parts]
