"""`medsam2 segment --review FILE.csv`: one row per slice and object, the engine's own records, and
the flagged slices listed at the end; the path is checked before the model loads."""

import csv

from medsam2 import cli
from medsam2.tracking.review import REVIEW_KEYS
from test_memory_trace import _segment, _write_ct


def test_segment_writes_the_review_and_lists_the_flagged_slices(tmp_path, model, random_checkpoint, ct_volume,
                                                                capsys):
    volume = _write_ct(tmp_path, ct_volume)
    review_path = tmp_path / "review.csv"
    assert _segment(tmp_path, random_checkpoint, "--review", str(review_path)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    with open(review_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == REVIEW_KEYS
        written = list(reader)
    # the records the engine gives for the same volume and prompt, one row per slice
    s = model.open(volume)
    s.add_prompt(3, obj_id=1, points=[[30, 30]], labels=[1])
    list(s.propagate("both"))
    want = s.review()
    assert len(written) == 8 and written == [{k: str(r[k]) for k in REVIEW_KEYS} for r in want]
    flagged = [r["frame"] for r in want if r["flagged"]]
    listed = ", ".join(map(str, flagged)) if flagged else "none"
    assert f"1 spot: {len(flagged)} slice(s) flagged for review: {listed}" in out


def test_segment_checks_the_review_path_before_loading_a_model(tmp_path, ct_volume, capsys):
    _write_ct(tmp_path, ct_volume)
    args = ["segment", str(tmp_path / "ct.nrrd"), "--prompts", str(tmp_path / "p.json"),
            "--output", str(tmp_path / "out.seg.nrrd"), "--model", "sam2.1_hiera_tiny", "--device", "cpu"]
    # no checkpoint exists: reaching the model would fail differently
    assert cli.main(args + ["--review", str(tmp_path / "review.txt")]) == 1
    assert "--review" in capsys.readouterr().err
    (tmp_path / "review.csv").write_text("keep")
    assert cli.main(args + ["--review", str(tmp_path / "review.csv")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "review.csv").read_text() == "keep"
    assert cli.main(args + ["--review", str(tmp_path / "nowhere" / "review.csv")]) == 1
    assert "does not exist" in capsys.readouterr().err
