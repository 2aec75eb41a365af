"""Render the extension's screenshot: Slicer's three slice views of slicerio's chest CT with lung
segments, drawn by Slicer's own slice view pipeline offscreen (Testing/slice_view.py).

The segments are written into a new segmentation through MedSAM2's segment writer
(MedSAM2Lib.segment_io.SegmentFrames, the path every MedSAM2 result takes), so the picture is what
a MedSAM2 result looks like in Slicer. Their content comes from a segmentation file: by default
slicerio's reference segmentation (its right and left lung, not a MedSAM2 prediction: the tests'
weights are random); pass --segmentation with a MedSAM2 result (e.g. scripts/demo.sh's output,
made with the real weights) to show that instead.

    python scripts/make_screenshot.py [--segmentation FILE.seg.nrrd] [--segments "right lung,left lung"]
                                      [--output Resources/Screenshots/slice-views-chest-ct-lung-segments.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "Testing"), str(ROOT / "MedSAM2Slicer")]

DEFAULT_OUTPUT = ROOT / "Resources" / "Screenshots" / "slice-views-chest-ct-lung-segments.png"
VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))  # Slicer's conventional row
VIEW_SIZE = 400  # pixels, each view square
GAP = 4  # dark pixels between views, as between Slicer's view widgets
LUNG_WINDOW = (1400.0, -500.0)  # width, level: Slicer's CT-Lung preset


def _slicerio_data(name: str) -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data" / name


def render(output: Path, segmentation_file: Path, segment_names: list[str]) -> Path:
    import slice_view as sv
    import slicer_fixtures as sf
    from MedSAM2Lib import VolumeGeometry
    from MedSAM2Lib.segment_io import SegmentFrames
    from PIL import Image

    scene = sf.new_scene()
    volume = sf.load_volume_file(scene, _slicerio_data("CTChest4.nrrd"))
    display = volume.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(*LUNG_WINDOW)

    source = sf.load_segmentation_file(scene, segmentation_file, name="source")
    source.GetDisplayNode().SetVisibility(False)
    result, ids = sf.add_segmentation(scene, volume, segment_names, name="MedSAM2")
    result.CreateDefaultDisplayNodes()
    geometry = VolumeGeometry(volume)
    layout = geometry.layout(geometry.axis_for_normal((0.0, 0.0, 1.0)))
    first = None
    for name, segment_id in zip(segment_names, ids):
        source_id = source.GetSegmentation().GetSegmentIdBySegmentName(name)
        if not source_id:
            raise SystemExit(f"No segment named {name!r} in {segmentation_file}; use --segments to pick others.")
        mask = sf.segment_array(scene, source, source_id, volume)
        frames = layout.frames(mask)
        SegmentFrames(result, segment_id, geometry).write(layout, {f: frames[f] for f in range(len(frames))})
        colour = source.GetSegmentation().GetSegment(source_id).GetColor()
        result.GetSegmentation().GetSegment(segment_id).SetColor(*colour)
        first = mask if first is None else first

    # every view through the first segment's centre, as moving there with Shift held does in Slicer
    centre_ijk = np.argwhere(first).mean(axis=0)[::-1]
    centre_ras = sf.ijk_to_ras(volume, np.round(centre_ijk))
    pictures = []
    for name, orientation in VIEWS:
        view = sv.SliceView(scene, name, orientation, size=(VIEW_SIZE, VIEW_SIZE))
        view.set_background(volume)
        view.jump_to(centre_ras)
        pictures.append(view.capture())
        view.close()
    gap = np.zeros((VIEW_SIZE, GAP, 3), dtype=np.uint8)
    row = np.concatenate([p for pair in zip(pictures, [gap] * len(pictures)) for p in pair][:-1], axis=1)
    output.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(row).save(output, optimize=True)
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmentation", type=Path, default=None,
                        help="a .seg.nrrd on slicerio's CTChest4 (default: slicerio's reference segmentation)")
    parser.add_argument("--segments", default="right lung,left lung", help="comma-separated segment names")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    segmentation = args.segmentation or _slicerio_data("Segmentation.seg.nrrd")
    names = [n.strip() for n in args.segments.split(",") if n.strip()]
    print(f"Wrote {render(args.output, segmentation, names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
