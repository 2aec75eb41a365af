"""The memory trace: its record contract in both memory modes, and `medsam2 segment --memory-trace`
(the JSON a researcher reads and the picture beside it)."""

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medsam2 import cli
from medsam2.study.trace_picture import ATTENDED, OWN, PROMPTED, TracePicture

KEYS = {"frame", "obj_id", "direction", "memory", "attended", "prompted", "pointers", "recalled", "bank_empty",
        "confidence", "object_present", "admission", "bank"}


@pytest.mark.parametrize("memory", ["self-sorting", "sam2"])
def test_trace_records_are_plain_json_data_in_tracking_order(model, ct_slab, memory):
    s = model.open(ct_slab, memory=memory)
    s.add_prompt(3, points=[[64, 64]], labels=[1])
    order = [f for f, _ in s.propagate("forward", stop=6)]
    trace = s.memory_trace()
    assert order == [3, 4, 5, 6]
    assert [r["frame"] for r in trace] == [4, 5, 6]  # the prompted slice is not tracked
    assert json.loads(json.dumps(trace)) == trace
    for r in trace:
        assert set(r) == KEYS and r["memory"] == memory and r["obj_id"] == 1 and r["direction"] == "forward"
        assert r["prompted"] == [3] and r["attended"][0] == 3
        assert 0.0 <= r["confidence"] <= 1.0
        assert (r["admission"] is None) == (memory == "sam2")
    trace[0]["attended"].append(99)  # a copy: the session's record is untouched
    assert 99 not in s.memory_trace()[0]["attended"]
    s.reset()
    assert s.memory_trace() == []


def _write_ct(tmp_path, ct_volume):
    volume = np.ascontiguousarray(ct_volume[10:18, 32:96, 32:96])  # 8 slices of 64 x 64
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.7, 5.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    (tmp_path / "p.json").write_text(json.dumps({"coordinates": "ijk", "objects": [
        {"id": 1, "name": "spot", "points": [{"position": [30, 30, 3], "label": 1}]}]}))
    return volume


def _segment(tmp_path, random_checkpoint, *extra):
    return cli.main(["segment", str(tmp_path / "ct.nrrd"), "--prompts", str(tmp_path / "p.json"),
                     "--output", str(tmp_path / "out.seg.nrrd"), "--model", "sam2.1_hiera_tiny",
                     "--checkpoint", str(random_checkpoint), "--device", "cpu", "--image-size", "256", *extra])


def test_segment_writes_the_memory_trace_and_its_picture(tmp_path, model, random_checkpoint, ct_volume, capsys):
    volume = _write_ct(tmp_path, ct_volume)
    trace_path = tmp_path / "trace.json"
    assert _segment(tmp_path, random_checkpoint, "--memory-trace", str(trace_path)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    # progress counts each of the 8 slices once
    counts = re.findall(r"(\d+)/(\d+) \[", err)
    assert counts and counts[-1] == ("8", "8"), err

    # the same records the engine gives for the same volume and prompt
    s = model.open(volume)
    s.add_prompt(3, obj_id=1, points=[[30, 30]], labels=[1])
    for _ in s.propagate("both"):
        pass
    written = json.loads(trace_path.read_text())
    assert written == s.memory_trace()
    assert [r["frame"] for r in written] == [4, 5, 6, 7, 2, 1, 0]  # 3 is prompted: never tracked
    # the picture beside it: its size follows from the records, and its cells say what they hold
    picture_path = tmp_path / "trace.png"
    with Image.open(picture_path) as image:
        layout = TracePicture(written, 8)
        assert image.format == "PNG" and image.size == layout.size
        pixels = image.convert("RGB")
        for row, record in enumerate(written):
            x0, y0, _, _ = layout.cell_box(1, row, record["frame"])
            assert pixels.getpixel((x0, y0)) == OWN
            x0, y0, _, _ = layout.cell_box(1, row, 3)
            assert pixels.getpixel((x0, y0)) == PROMPTED
            for frame in record["attended"][1:]:
                x0, y0, _, _ = layout.cell_box(1, row, frame)
                assert pixels.getpixel((x0, y0)) == ATTENDED


def test_segment_checks_the_trace_path_before_loading_a_model(tmp_path, ct_volume, capsys):
    _write_ct(tmp_path, ct_volume)
    args = ["segment", str(tmp_path / "ct.nrrd"), "--prompts", str(tmp_path / "p.json"),
            "--output", str(tmp_path / "out.seg.nrrd"), "--model", "sam2.1_hiera_tiny", "--device", "cpu"]
    # no checkpoint exists: reaching the model would fail differently
    assert cli.main(args + ["--memory-trace", str(tmp_path / "trace.txt")]) == 1
    err = capsys.readouterr().err
    assert "--memory-trace" in err and ".json" in err
    (tmp_path / "trace.png").write_bytes(b"keep")
    assert cli.main(args + ["--memory-trace", str(tmp_path / "trace.json")]) == 1
    err = capsys.readouterr().err
    assert "trace.png" in err and "--overwrite" in err
    assert (tmp_path / "trace.png").read_bytes() == b"keep"


def test_the_picture_explains_its_row_labels():
    from PIL import ImageFont

    records = [{"obj_id": 1, "memory": "sam2", "frame": f, "direction": d, "prompted": [3], "bank": [3],
                "attended": [3], "bank_empty": False} for f, d in ((4, "forward"), (2, "backward"))]
    picture = TracePicture(records, 8)
    image = picture.render()
    assert {"4 F", "2 B"} <= set(picture.texts)  # the labels a reader must decode
    key = next(t for t in picture.texts if "F forward" in t and "B backward" in t)
    font = ImageFont.load_default(size=10) if hasattr(ImageFont, "FreeTypeFont") else ImageFont.load_default()
    assert 8 + font.getlength(key) <= image.size[0]  # the key fits in the picture
