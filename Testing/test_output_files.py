"""Outputs are written atomically and get the permissions the user's umask gives any new file.

A colleague on the same machine must be able to open a segmentation written with the usual umask
022 (mode 0644), and a user with umask 077 keeps theirs private (0600), as with files other tools
write. The writers are run for real: SimpleITK, slicerio and PIL write the files.
"""

import contextlib
import json
import os
import stat

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medsam2.cli import main as cli_main
from medsam2.io import volume_io
from medsam2.io.files import atomic_output

UMASKS = {0o022: 0o644, 0o077: 0o600}


@contextlib.contextmanager
def _umask(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def chest(ct_path):
    return volume_io.read_volume(ct_path)


@pytest.mark.parametrize("umask", sorted(UMASKS))
def test_segmentations_and_label_maps_follow_the_umask(tmp_path, chest, umask):
    mask = np.zeros(chest.array.shape, bool)
    mask[10:20, 40:80, 30:60] = True
    with _umask(umask):
        seg = volume_io.write_segmentation(tmp_path / "lungs.seg.nrrd", [{"name": "lung", "mask": mask}], chest)
        nii = volume_io.write_labelmap(tmp_path / "lungs.nii.gz", mask.astype(np.uint8), chest)
    for path in (seg, nii):
        assert _mode(path) == UMASKS[umask], f"{path}: {oct(_mode(path))}"
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(nii))).sum() == mask.sum()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lungs.nii.gz", "lungs.seg.nrrd"]  # no temporary left


@pytest.mark.parametrize("umask", sorted(UMASKS))
def test_one_prompt_mask_pngs_and_summary_follow_the_umask(tmp_path, random_checkpoint, ct_volume, umask):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, k in (("a.png", 12), ("b.png", 20)):
        grey = ((np.clip(ct_volume[k, :64, :96], -1000, 400) + 1000) / 1400 * 255).astype(np.uint8)
        Image.fromarray(grey).save(folder / name)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"prompts": [{"image": "a.png", "points": [[40, 30]]}]}))
    out = tmp_path / "masks"
    with _umask(umask):
        assert cli_main(["one-prompt", str(folder), "--prompts", str(prompts), "--output", str(out),
                         "--model", "sam2.1_hiera_tiny", "--checkpoint", str(random_checkpoint),
                         "--device", "cpu", "--image-size", "256"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "summary.csv"]
    for path in out.iterdir():
        assert _mode(path) == UMASKS[umask], f"{path.name}: {oct(_mode(path))}"


@pytest.mark.parametrize("umask", sorted(UMASKS))
def test_atomic_output_follows_the_umask_and_leaves_nothing_behind_on_error(tmp_path, umask):
    target = tmp_path / "scores.json"
    with _umask(umask):
        with atomic_output(target) as tmp:
            assert tmp.endswith(".json") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "w") as f:
                json.dump({"dice": 0.9}, f)
            assert not target.exists()  # nothing under the real name until the block finished
    assert json.loads(target.read_text()) == {"dice": 0.9} and _mode(target) == UMASKS[umask]

    with pytest.raises(RuntimeError), atomic_output(target) as tmp:  # an interrupted write
        open(tmp, "w").write("{half")
        raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"dice": 0.9}  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]


def test_atomic_output_without_overwrite_refuses_a_file_that_appeared(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(FileExistsError), atomic_output(target, overwrite=False) as tmp:
        assert tmp.endswith(".nii.gz")
        target.write_text("someone else's")
    assert target.read_text() == "someone else's" and [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]
