"""`medsam2 batch` on a real local Ray runtime (loopback, CPU, 2 workers) and in this process.

Cases are 4-slice crops of slicerio's chest CT at 256 px with random weights: meaningless masks,
but deterministic, so a batch output must equal `medsam2 segment`'s for the same prompts voxel for
voxel. Outputs are read back with slicerio, not with the code under test.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from medsam2 import cli

ENGINE = Path(__file__).resolve().parents[1] / "MedSAM2Slicer"  # the medsam2 these tests import
SLICES = slice(13, 17)
LUNGS = {5: "right lung", 6: "left lung"}  # label value -> segment of slicerio's segmentation
RAY_PROCESS = re.compile(r"^ray::|/site-packages/ray/")  # workers, agents, raylet, gcs_server, monitors


def _model_args(checkpoint):
    return ["--model", "sam2.1_hiera_tiny", "--checkpoint", str(checkpoint), "--image-size", "256", "--device", "cpu"]


def _box_prompts(labels):
    """What --prompt-from-label box means, written out by hand as a prompts file: per label value, its
    bounding box (pixel centres) on the slice where it has the most voxels."""
    objects = []
    for value in sorted(LUNGS):
        mask = labels == value
        k = int(np.argmax(mask.sum(axis=(1, 2))))
        rows, cols = np.nonzero(mask[k])
        box = {"min": [int(cols.min()), int(rows.min()), k], "max": [int(cols.max()), int(rows.max()), k]}
        objects.append({"id": value, "name": f"label {value}", "boxes": [box]})
    return {"coordinates": "ijk", "objects": objects}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, ct_path, ct_segmentation_path):
    """A folder with a CT crop, its lung label map, the same prompts as a file, and bad inputs."""
    folder = tmp_path_factory.mktemp("cohort")
    ct = sitk.ReadImage(str(ct_path))
    sitk.WriteImage(ct[:, :, SLICES], str(folder / "ct.nrrd"))
    seg = slicerio.read_segmentation(str(ct_segmentation_path))
    labels = np.zeros(sitk.GetArrayFromImage(ct).shape, np.uint8)
    for value, name in LUNGS.items():
        labels[slicerio.segment_mask(seg, name).transpose(2, 1, 0) > 0] = value
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    sitk.WriteImage(image[:, :, SLICES], str(folder / "label.nrrd"))
    empty = sitk.GetImageFromArray(np.zeros_like(labels))
    empty.CopyInformation(ct)
    sitk.WriteImage(empty[:, :, SLICES], str(folder / "empty.nrrd"))
    (folder / "boxes.json").write_text(json.dumps(_box_prompts(labels[SLICES])))
    (folder / "outside.json").write_text(json.dumps(
        {"coordinates": "ijk", "objects": [{"name": "far", "points": [{"position": [40, 60, 30]}]}]}))
    (folder / "broken.nrrd").write_text("NRRD0004\nthis is not an image\n")
    return folder


def _write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "volume", "prompts", "label", "reference"])
        writer.writerows(rows)
    return path


def _summary(path):
    with open(path, newline="") as f:
        return {row["case"]: row for row in csv.DictReader(f)}


def _masks(path):
    seg = slicerio.read_segmentation(str(path))
    return {name: slicerio.segment_mask(seg, name) for name in slicerio.segment_names(seg)}


def _assert_same_masks(a, b):
    ma, mb = _masks(a), _masks(b)
    assert list(ma) == list(mb)
    for name in ma:
        np.testing.assert_array_equal(ma[name], mb[name], err_msg=name)


def _ray_processes():
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.splitlines()
            if len(line.split(None, 1)) == 2 and RAY_PROCESS.search(line.split(None, 1)[1])}


def _assert_no_ray_left(before, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        left = {pid: args for pid, args in _ray_processes().items() if pid not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes outlived the batch: {left}"


@pytest.fixture(scope="module")
def segment_output(cohort, random_checkpoint, tmp_path_factory):
    """`medsam2 segment` of the cohort's CT with the box prompts: what every batch output must equal."""
    out = tmp_path_factory.mktemp("segment") / "lungs.seg.nrrd"
    assert cli.main(["segment", str(cohort / "ct.nrrd"), "--prompts", str(cohort / "boxes.json"),
                     "--output", str(out)] + _model_args(random_checkpoint)) == 0
    return out


@pytest.fixture(scope="module")
def ray_batch(cohort, random_checkpoint, tmp_path_factory, monkeypatch_module):
    """One batch on a local Ray runtime, 2 workers, volumes shipped through the object store: two good
    cases (prompts file, label) scored against the label, and three bad ones."""
    manifest = _write_manifest(cohort / "manifest.csv", [
        ("from_prompts", "ct.nrrd", "boxes.json", "", "label.nrrd"),
        ("from_label", "ct.nrrd", "", "label.nrrd", "label.nrrd"),
        ("unreadable", "broken.nrrd", "boxes.json", "", ""),
        ("outside", "ct.nrrd", "outside.json", "", ""),
        ("no_foreground", "ct.nrrd", "", "empty.nrrd", ""),
    ])
    out = tmp_path_factory.mktemp("batch") / "out"
    before = _ray_processes()
    rc = cli.main(["batch", str(manifest), "--output", str(out), "--ray", "local", "--workers", "2",
                   "--ship-volumes"] + _model_args(random_checkpoint))
    _assert_no_ray_left(before)
    return rc, manifest, out


@pytest.fixture()
def ray_tmp():
    """A folder of the test's own for Ray's session files, short: Ray's socket paths have a length limit."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def monkeypatch_module():
    import tempfile

    folder = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", folder)
    yield mp
    mp.undo()
    shutil.rmtree(folder, ignore_errors=True)


def test_ray_batch_equals_segment_and_bad_cases_fail_alone(ray_batch, segment_output):
    rc, _manifest, out = ray_batch
    assert rc == 1  # some cases failed
    rows = _summary(out / "summary.csv")
    assert list(rows) == ["from_prompts", "from_label", "unreadable", "outside", "no_foreground"]
    for case in ("from_prompts", "from_label"):
        assert rows[case]["status"] == "ok", rows[case]
        _assert_same_masks(out / f"{case}.seg.nrrd", segment_output)
        assert rows[case]["slices"] == "4" and float(rows[case]["seconds"]) > 0
        assert float(rows[case]["peak_memory_mb"]) > 100
        assert 0 <= float(rows[case]["dice"]) <= 1 and rows[case]["hd95_mm"]
    assert rows["from_prompts"]["dice"] == rows["from_label"]["dice"]
    assert {c: rows[c]["status"] for c in ("unreadable", "outside", "no_foreground")} == dict.fromkeys(
        ("unreadable", "outside", "no_foreground"), "failed")
    assert "broken.nrrd" in rows["unreadable"]["error"] and "cannot read" in rows["unreadable"]["error"]
    assert "outside the image" in rows["outside"]["error"] and "k = 30" in rows["outside"]["error"]
    assert "empty.nrrd" in rows["no_foreground"]["error"] and "no labelled object" in rows["no_foreground"]["error"]
    assert sorted(os.listdir(out)) == ["from_label.seg.nrrd", "from_prompts.seg.nrrd", "summary.csv"]


def test_rerun_skips_complete_outputs_and_redoes_a_truncated_one(ray_batch, random_checkpoint, tmp_path):
    _rc, manifest, first = ray_batch
    out = tmp_path / "out"
    shutil.copytree(first, out)
    command = ["batch", str(manifest), "--output", str(out)] + _model_args(random_checkpoint)
    before = {c: os.stat(out / f"{c}.seg.nrrd") for c in ("from_prompts", "from_label")}
    assert cli.main(command) == 1  # the bad cases are tried again and fail again
    rows, earlier = _summary(out / "summary.csv"), _summary(first / "summary.csv")
    for case, st in before.items():
        now = os.stat(out / f"{case}.seg.nrrd")
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # not rewritten
        assert rows[case]["status"] == "skipped"
        assert {k: rows[case][k] for k in ("dice", "hd95_mm", "seconds")} == \
               {k: earlier[case][k] for k in ("dice", "hd95_mm", "seconds")}
    assert rows["outside"]["status"] == "failed" and "outside the image" in rows["outside"]["error"]

    data = (out / "from_label.seg.nrrd").read_bytes()
    (out / "from_label.seg.nrrd").write_bytes(data[:len(data) // 2])  # a half-copied file is not complete
    # what a worker killed while writing leaves (the atomic writer's temporary name); and a user's file
    (out / ".from_label.0123456789ab.seg.nrrd").write_bytes(b"half")
    (out / ".from_label.notes.seg.nrrd").write_bytes(b"mine")
    assert cli.main(command) == 1
    rows = _summary(out / "summary.csv")
    assert rows["from_label"]["status"] == "ok" and rows["from_prompts"]["status"] == "skipped"
    _assert_same_masks(out / "from_label.seg.nrrd", first / "from_label.seg.nrrd")
    assert not (out / ".from_label.0123456789ab.seg.nrrd").exists()
    assert (out / ".from_label.notes.seg.nrrd").read_bytes() == b"mine"


def test_sigkill_of_a_worker_mid_case_is_retried_and_every_case_written_once(cohort, random_checkpoint, tmp_path,
                                                                             segment_output, ray_tmp):
    cases = [f"c{n}" for n in range(4)]
    manifest = _write_manifest(tmp_path / "manifest.csv", [(c, cohort / "ct.nrrd", "", cohort / "label.nrrd", "")
                                                           for c in cases])
    out = tmp_path / "out"
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(ENGINE)] + sys.path))
    before = _ray_processes()
    proc = subprocess.Popen([sys.executable, "-m", "medsam2.cli", "batch", str(manifest), "--output", str(out),
                             "--ray", "local", "--workers", "2"] + _model_args(random_checkpoint),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        killed = None
        deadline = time.monotonic() + 180
        while killed is None and time.monotonic() < deadline and proc.poll() is None:
            running = [pid for pid, args in _ray_processes().items() if args.startswith("ray::CaseWorker.run")]
            if running:
                os.kill(running[0], signal.SIGKILL)
                killed = running[0]
            time.sleep(0.05)
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, output
    assert proc.returncode == 0, output
    rows = _summary(out / "summary.csv")
    assert list(rows) == cases and all(r["status"] == "ok" for r in rows.values()), rows
    assert sorted(os.listdir(out)) == sorted([f"{c}.seg.nrrd" for c in cases] + ["summary.csv"])  # no half files
    for c in cases:
        _assert_same_masks(out / f"{c}.seg.nrrd", segment_output)
    _assert_no_ray_left(before)


def test_parts_split_the_manifest_and_a_run_without_part_merges_them(cohort, random_checkpoint, tmp_path):
    cases = ["p1", "p2", "p3"]
    manifest = _write_manifest(tmp_path / "m.csv", [(c, cohort / "ct.nrrd", "", cohort / "label.nrrd", "")
                                                    for c in cases])
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        assert cli.main(["batch", str(manifest), "--output", str(out), "--part", part]
                        + _model_args(random_checkpoint)) == 0
    first, second = _summary(out / "summary-1-of-2.csv"), _summary(out / "summary-2-of-2.csv")
    assert list(first) == ["p1", "p3"] and list(second) == ["p2"]  # interleaved shares
    assert all(r["status"] == "ok" for r in [*first.values(), *second.values()])
    stamps = {c: os.stat(out / f"{c}.seg.nrrd").st_mtime_ns for c in cases}
    assert cli.main(["batch", str(manifest), "--output", str(out)] + _model_args(random_checkpoint)) == 0
    merged = _summary(out / "summary.csv")
    assert list(merged) == cases
    for c in cases:
        part_row = (first | second)[c]
        assert merged[c]["status"] == "skipped" and merged[c]["seconds"] == part_row["seconds"]
        assert os.stat(out / f"{c}.seg.nrrd").st_mtime_ns == stamps[c]


@pytest.mark.parametrize("rows, flags, message", [
    ([("a", "ct.nrrd")], [], "give a prompts column"),
    ([("a", "ct.nrrd", "boxes.json", "label.nrrd")], [], "not both"),
    ([("a", "ct.nrrd", "boxes.json", ""), ("a", "ct.nrrd", "boxes.json", "")], [], "also on line 2"),
    ([("../a", "ct.nrrd", "boxes.json", "")], [], "cannot name an output file"),
    ([("a", "ct.nrrd", "boxes.json", "")], ["--part", "3/2"], "1 <= I <= N"),
    ([("a", "ct.nrrd", "boxes.json", "")], ["--workers", "2"], "need --ray"),
])
def test_a_bad_manifest_or_flag_is_named_before_anything_runs(cohort, tmp_path, capsys, rows, flags, message):
    header = ["case", "volume"] + (["prompts", "label"] if len(rows[0]) > 2 else [])
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    assert cli.main(["batch", str(manifest), "--output", str(tmp_path / "out"), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_evaluate_on_ray_scores_and_writes_what_it_does_in_one_process(cohort, random_checkpoint, tmp_path, ray_tmp,
                                                                         monkeypatch):
    for folder in ("images", "labels", "here", "ray"):
        (tmp_path / folder).mkdir()
    for case in ("a", "b"):
        shutil.copy(cohort / "ct.nrrd", tmp_path / "images" / f"{case}.nrrd")
        shutil.copy(cohort / "label.nrrd", tmp_path / "labels" / f"{case}.nrrd")
    command = ["evaluate", str(tmp_path / "images"), str(tmp_path / "labels")] + _model_args(random_checkpoint)
    assert cli.main(command + ["--output", str(tmp_path / "here"), "--json", str(tmp_path / "here.json")]) == 0
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    before = _ray_processes()
    assert cli.main(command + ["--output", str(tmp_path / "ray"), "--json", str(tmp_path / "ray.json"),
                               "--ray", "local", "--workers", "2"]) == 0
    _assert_no_ray_left(before)
    here, ray = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("here", "ray"))
    assert here["settings"] == ray["settings"]
    assert [c["objects"] for c in here["cases"]] == [c["objects"] for c in ray["cases"]]
    assert [o["label"] for o in ray["cases"][0]["objects"]] == sorted(LUNGS)
    for case in ("a", "b"):
        _assert_same_masks(tmp_path / "ray" / f"{case}.seg.nrrd", tmp_path / "here" / f"{case}.seg.nrrd")
