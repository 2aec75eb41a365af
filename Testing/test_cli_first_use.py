"""What a new user meets on the command line (issue 20): `--random-weights` on every verb that loads a
model (one cached test checkpoint, the RANDOM WEIGHTS banner), and the words of the first errors."""

import argparse
import json
import os

import pytest
import SimpleITK as sitk

from medsam2 import cli
from medsam2.cli.main import build_parser
from medsam2.models.checkpoints import cache_dir


def _model_verbs():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {verb: p for verb, p in sub.choices.items() if any("--model" in a.option_strings for a in p._actions)}


def test_every_verb_that_loads_a_model_takes_random_weights():
    verbs = _model_verbs()
    assert {"segment", "serve", "bench", "one-prompt", "evaluate", "web"} <= set(verbs)
    for verb, parser in verbs.items():  # later verbs too: the flag comes with the shared model arguments
        flag = next((a for a in parser._actions if "--random-weights" in a.option_strings), None)
        assert flag is not None and flag.nargs == 0 and flag.default is False, verb


@pytest.fixture()
def small_ct(tmp_path, ct_path):
    path = tmp_path / "chest.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ct_path))[:, :, 14:20], str(path))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinates": "ijk", "objects": [{"name": "lung", "points": [
        {"position": [40, 64, 3]}]}]}))
    return path, prompts


def test_segment_with_random_weights_runs_offline_on_the_cached_test_checkpoint(tmp_path, small_ct, monkeypatch,
                                                                                 capsys):
    monkeypatch.setenv("MEDSAM2_CACHE_DIR", str(tmp_path / "cache"))
    volume, prompts = small_ct
    args = ["segment", str(volume), "--prompts", str(prompts), "--model", "sam2.1_hiera_tiny",
            "--image-size", "256", "--device", "cpu", "--random-weights"]
    assert cli.main([*args, "--output", str(tmp_path / "a.seg.nrrd")]) == 0
    err = capsys.readouterr().err
    assert "RANDOM WEIGHTS: results are meaningless" in err
    assert (tmp_path / "a.seg.nrrd").is_file()
    cached = cache_dir() / "random-weights" / "sam2.1_hiera_tiny_256px.pt"
    written = cached.stat().st_mtime_ns
    assert cli.main([*args, "--output", str(tmp_path / "b.seg.nrrd")]) == 0  # the same file, not a new one
    assert cached.stat().st_mtime_ns == written
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # nothing half-written left beside it
    first, second = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / n))) for n in ("a.seg.nrrd", "b.seg.nrrd"))
    assert first.any() and (first == second).all()  # the same weights: the same masks


def test_random_weights_and_a_checkpoint_file_are_refused_together(tmp_path, small_ct, random_checkpoint, capsys):
    volume, prompts = small_ct
    rc = cli.main(["segment", str(volume), "--prompts", str(prompts), "--output", str(tmp_path / "o.seg.nrrd"),
                   "--model", "sam2.1_hiera_tiny", "--checkpoint", str(random_checkpoint), "--random-weights"])
    assert rc == 1
    assert "give --random-weights or --checkpoint FILE, not both" in capsys.readouterr().err


def test_a_bad_image_size_is_named_by_its_flag_before_anything_loads(tmp_path, small_ct, capsys, monkeypatch):
    monkeypatch.setenv("MEDSAM2_CACHE_DIR", str(tmp_path / "cache"))
    volume, prompts = small_ct
    rc = cli.main(["segment", str(volume), "--prompts", str(prompts), "--output", str(tmp_path / "o.seg.nrrd"),
                   "--model", "sam2.1_hiera_tiny", "--image-size", "100", "--random-weights"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--image-size 100: must be a multiple of 32 and at least 128" in err and "image_size" not in err
    assert not (tmp_path / "cache").exists()  # refused before any checkpoint was written


def test_a_checkpoint_that_is_not_a_pytorch_file_is_said_so_without_download_advice(tmp_path, small_ct, capsys):
    volume, prompts = small_ct
    mine = tmp_path / "MedSAM2_latest.pt"
    mine.write_text("<html>Sign in to download</html>\n")  # what a browser saves from a login page
    rc = cli.main(["segment", str(volume), "--prompts", str(prompts), "--output", str(tmp_path / "o.seg.nrrd"),
                   "--model", "sam2.1_hiera_tiny", "--checkpoint", str(mine), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"{mine} is not a PyTorch checkpoint" in err and "--checkpoint" in err
    assert "KeyError" not in err and "download it again" not in err and "--force" not in err
    assert os.path.exists(mine)  # the user's file is left alone
