"""Shared fixtures: a random-weight checkpoint loaded through the normal path, and real CT data."""

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))  # the engine and adapter as Slicer loads them

# tests never touch the user's checkpoint cache
os.environ.setdefault("MEDSAM2_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "medsam2-test-cache"))

TEST_IMAGE_SIZE = 256  # Hiera-tiny at 256 px: ~0.15 s per frame on 2 CPU cores


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    from medsam2.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "random_tiny.pt", "sam2.1_hiera_tiny",
                                   seed=0, image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="session")
def model(random_checkpoint):
    import medsam2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medsam2.load_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                                  image_size=TEST_IMAGE_SIZE)


@pytest.fixture(scope="session")
def ct_path():
    import slicerio

    return Path(slicerio.__file__).parent / "data" / "CTChest4.nrrd"


@pytest.fixture(scope="session")
def ct_segmentation_path():
    import slicerio

    return Path(slicerio.__file__).parent / "data" / "Segmentation.seg.nrrd"


@pytest.fixture(scope="session")
def ct_volume(ct_path):
    """slicerio's chest CT as a (slices, rows, cols) int array (34 x 128 x 128, negative HU)."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(ct_path)))


@pytest.fixture()
def ct_slab(ct_volume):
    """Ten consecutive chest CT slices: enough to propagate, fast on 2 cores."""
    return np.ascontiguousarray(ct_volume[12:22])


@pytest.fixture()
def slice_view():
    """Factory of Slicer slice views rendered offscreen (Testing/slice_view.py), closed after the test:
    slice_view(scene, "Red", "Axial", size=(256, 256)) -> SliceView."""
    from slice_view import SliceView

    views = []

    def make(scene, name="Red", orientation="Axial", **kw):
        views.append(SliceView(scene, name, orientation, **kw))
        return views[-1]

    yield make
    for view in reversed(views):
        view.close()
