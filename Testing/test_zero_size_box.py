"""A box with no width or no height is refused with a clear message everywhere a box enters (issue
20.8): the engine, the remote server (a 400 the client re-raises as InputError), the prompts file
reader (naming the file and the box), and the module logic both shells use. Corners in any order
stay fine. The web page's drag is checked in Chromium in test_web_first_use.py."""

import json

import numpy as np
import pytest

import medsam2
from medsam2.errors import InputError
from medsam2.io.prompts_io import read_prompts, to_frame_prompts
from medsam2.io.volume_io import read_volume

VOLUME = np.random.default_rng(0).integers(0, 255, size=(5, 64, 64), dtype=np.uint8)


@pytest.mark.parametrize("box, side", [([10, 12, 10, 40], "width"), ([10, 30, 40, 30], "height"),
                                       ([20, 20, 20, 20], "width")])
def test_the_engine_refuses_a_box_without_width_or_height(model, box, side):
    session = model.open(VOLUME, memory="sam2")
    with pytest.raises(InputError, match=f"zero {side}"):
        session.add_prompt(2, obj_id=1, box=box)
    assert session.add_prompt(2, obj_id=1, box=[40, 40, 10, 12]).shape == (64, 64)  # corners in any order


def test_the_server_answers_a_zero_width_box_with_the_engines_message(model):
    from remote_fixtures import TOKEN, ServerThread

    from medsam2.remote.server import create_app

    server = ServerThread(create_app(model, token=TOKEN, max_sessions=2, session_ttl=60, max_upload_mb=4))
    try:
        session = medsam2.connect(server.url, TOKEN).open(VOLUME, memory="sam2")
        with pytest.raises(InputError, match=r"zero width \(x0 == x1\)"):
            session.add_prompt(2, obj_id=1, box=[10, 12, 10, 40])
        assert session.add_prompt(2, obj_id=1, box=[10, 12, 30, 40]).shape == (64, 64)  # the session goes on
        session.close()
    finally:
        server.stop()


def _write(tmp_path, boxes, coordinates="ijk"):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"coordinates": coordinates, "objects": [{"name": "lesion", "boxes": boxes}]}))
    return path


def test_the_prompts_file_reader_names_the_file_and_the_box(tmp_path):
    path = _write(tmp_path, [{"min": [10, 12, 3], "max": [40, 40, 3]}, {"min": [10, 12, 3], "max": [10, 40, 3]}])
    with pytest.raises(InputError) as refused:
        read_prompts([path])
    text = str(refused.value)
    assert str(path) in text and "boxes[1]" in text and "a box has a width and a height" in text


def test_a_slicer_roi_without_width_on_its_slice_is_refused_when_framed(tmp_path, ct_path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(ct_path))
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])  # LPS
    path = tmp_path / "flat.mrk.json"

    def roi(size):
        path.write_text(json.dumps({"markups": [{"type": "ROI", "name": "lesion", "coordinateSystem": "LPS",
                                                 "roiType": "Box", "center": list(centre), "size": size}]}))
        return read_prompts([path])

    volume = read_volume(ct_path)
    assert to_frame_prompts(roi([20.0, 30.0, 0.0]), volume, axis=0)[0].box is not None  # thin across slices: fine
    with pytest.raises(InputError, match=r"flat.mrk.json: markup 'lesion' ROI .* has no width on k = "):
        to_frame_prompts(roi([0.0, 30.0, 0.0]), volume, axis=0)
