"""One volume segmented from its prompts and written out: what `medsam2 segment` does to its one
case and `medsam2 batch` to each case of a manifest, written once so both give the same voxels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..io import volume_io


def open_prompted(model, volume, frame_prompts, *, axis: int = 0, memory: str = "self-sorting", window=None):
    """A session on `volume`'s frames along `axis` with every FramePrompt added (not yet propagated)."""
    frames = volume_io.to_frames(volume.array, axis)
    session = model.open(frames, memory=memory, window=tuple(window) if window is not None else None)
    for fp in frame_prompts:
        session.add_prompt(fp.frame, obj_id=fp.obj_id, points=fp.points, labels=fp.labels, box=fp.box)
    return session


def propagate_objects(session, objects, *, axis: int = 0, axes: str = "one",
                      on_step: Callable[[], None] | None = None) -> list:
    """Propagate forward from the first prompted frame to the end, then back from it to frame 0 (each
    frame yielded once; a fused run also counts the frames of the other two axes); return
    [(object, index, bool mask (k, j, i))] in the order of `objects` (prompts_io.ObjectPrompts).

    on_step: called once per propagated frame (a progress bar's update).
    """
    for _frame, _masks in session.propagate(direction="both", axes=axes):
        if on_step is not None:
            on_step()
    return [(obj, index, volume_io.from_frames(session.mask(obj.id), axis)) for index, obj in enumerate(objects)]


def write_result(path, results, volume, overwrite: bool = False) -> str:
    """Write segment_volume's results: a .seg.nrrd (one named, coloured segment per object) or a label
    map (the object ids; a later object wins where objects overlap), chosen by the name of `path`."""
    if volume_io.output_kind(path) == "segmentation":
        return volume_io.write_segmentation(path, [
            {"name": obj.name, "color": obj.color or volume_io.palette_color(index), "mask": mask}
            for obj, index, mask in results], volume, overwrite=overwrite)
    labels = np.zeros(volume.array.shape, np.uint16)
    for obj, _index, mask in results:
        labels[mask] = obj.id
    return volume_io.write_labelmap(path, labels, volume, overwrite=overwrite)
