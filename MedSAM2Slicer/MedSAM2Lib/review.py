"""The review strip and "Next uncertain slice": the rules both shells draw and follow (no Qt, no VTK).

The records are the engine's (`Session.review`, docs/review.md): one per slice and object with a
result. A strip has one cell per slice of the segment's axis, coloured by confidence (red at 0,
yellow at 0.5, green at 1; grey where the slice has no result) and marked where flagged.
"""

from __future__ import annotations

import colorsys

from medsam2.tracking.review import flagged_frames  # noqa: F401  (the one definition; shells use it from here)

NO_RESULT = "#5a5a5a"


def confidence_color(confidence: float) -> str:
    """#rrggbb from red (0.0) through yellow (0.5) to green (1.0)."""
    c = min(max(float(confidence), 0.0), 1.0)
    r, g, b = colorsys.hsv_to_rgb(c / 3.0, 0.8, 0.85)  # hue 0 (red) .. 1/3 (green)
    return "#" + "".join(f"{round(255 * v):02x}" for v in (r, g, b))


def strip_cells(records: list[dict], num_frames: int) -> list[dict]:
    """One cell per slice 0..num_frames-1: frame, color, flagged, and a title saying what the cell
    stands for. `records`: one object's review records."""
    by_frame = {int(r["frame"]): r for r in records}
    cells = []
    for frame in range(int(num_frames)):
        r = by_frame.get(frame)
        if r is None:
            cells.append({"frame": frame, "color": NO_RESULT, "flagged": False, "title": f"slice {frame}: no result"})
            continue
        why = f", flagged: {r['reason']}" if r["flagged"] else ""
        cells.append({"frame": frame, "color": confidence_color(r["confidence"]), "flagged": bool(r["flagged"]),
                      "title": f"slice {frame}: confidence {r['confidence']:.2f}, {r['area']} px, {r['source']}{why}"})
    return cells


def next_flagged(flagged: list[int], after: int | None, backwards: bool = False) -> int | None:
    """The next flagged slice after `after` (before it, backwards), cycling round the ends; the
    first (last) flagged slice when `after` is None; None when nothing is flagged."""
    if not flagged:
        return None
    ordered = sorted(flagged)
    if after is None:
        return ordered[-1] if backwards else ordered[0]
    if backwards:
        earlier = [f for f in ordered if f < after]
        return earlier[-1] if earlier else ordered[-1]
    later = [f for f in ordered if f > after]
    return later[0] if later else ordered[0]
