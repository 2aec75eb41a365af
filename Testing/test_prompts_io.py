"""Prompt files -> engine frames and pixels, checked against SimpleITK's own geometry.

The test image has an oblique, flipped direction, anisotropic spacing and a different size on each
axis, so a swapped axis, a missed flip or a RAS/LPS slip changes the answer.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medsam2.errors import InputError
from medsam2.io.prompts_io import read_prompts, to_frame_prompts
from medsam2.io.volume_io import from_frames, read_volume, to_frames

SIZE = (11, 9, 7)  # (i, j, k)


def _oblique_direction():
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    b = np.deg2rad(-10.0)
    tilt = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rot @ tilt @ np.diag([1.0, -1.0, 1.0])  # with a flip: determinant -1


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    arr = np.arange(np.prod(SIZE), dtype=np.int16).reshape(SIZE[::-1])  # every voxel distinct
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 1.3, 2.5))
    image.SetOrigin((-12.3, 45.6, 7.8))
    image.SetDirection(tuple(_oblique_direction().ravel()))
    path = tmp_path_factory.mktemp("img") / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def volume(image_file):
    return read_volume(image_file)


@pytest.fixture(scope="module")
def sitk_image(image_file):
    return sitk.ReadImage(str(image_file))


def _lps(image, ijk):
    return np.array(image.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in ijk)))


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_physical_index_conversion_matches_simpleitk(volume, sitk_image):
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-0.5, np.array(SIZE) - 0.5, size=(20, 3))
    lps = np.stack([_lps(sitk_image, q) for q in ijk])
    np.testing.assert_allclose(volume.index_to_physical(ijk), lps, atol=1e-9)
    expected = np.stack([sitk_image.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in lps])
    np.testing.assert_allclose(volume.physical_to_index(lps), expected, atol=1e-9)
    np.testing.assert_allclose(volume.physical_to_index(lps), ijk, atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_frame_pixel_addresses_the_same_voxel_as_simpleitk(volume, sitk_image, axis):
    """frames[frame, y, x] for a voxel's (frame, x, y) is that voxel's value in SimpleITK's (i, j, k)."""
    from medsam2.io.volume_io import index_to_frame_pixel

    frames = to_frames(volume.array, axis)
    assert frames.shape[0] == volume.array.shape[axis]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SIZE], indexing="ij"), -1).reshape(-1, 3)
    f, x, y = index_to_frame_pixel(grid, axis)
    got = frames[f.astype(int), y.astype(int), x.astype(int)]
    expected = [sitk_image.GetPixel(tuple(int(v) for v in q)) for q in grid]
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(from_frames(frames, axis), volume.array)


# Prompts placed by hand in continuous (i, j, k): two include points and one exclude point on
# different frames, and a box flat along each axis (its corners share that axis' index).
POINTS_IJK = [((3.2, 4.0, 2.0), 1), ((7.6, 2.4, 5.1), 1), ((5.0, 6.7, 2.0), 0)]
BOXES_IJK = {  # axis -> (min corner, max corner)
    0: ((1.5, 2.0, 4.0), (8.0, 7.5, 4.0)),
    1: ((1.5, 3.0, 1.0), (8.0, 3.0, 5.5)),
    2: ((6.0, 1.0, 1.0), (6.0, 7.5, 5.5)),
}


def _expected(axis):
    """(frame, x, y) by hand: axis 0 -> frames k, x = i, y = j; axis 1 -> frames j, x = i, y = k;
    axis 2 -> frames i, x = j, y = k."""
    def project(q):
        i, j, k = q
        return {0: (k, i, j), 1: (j, i, k), 2: (i, j, k)}[axis]

    points = {}
    for q, label in POINTS_IJK:
        f, x, y = project(q)
        points.setdefault(int(np.floor(f + 0.5)), []).append((x, y, label))
    lo, hi = (project(q) for q in BOXES_IJK[axis])
    box_frame = int(np.floor(lo[0] + 0.5))
    box = (min(lo[1], hi[1]), min(lo[2], hi[2]), max(lo[1], hi[1]), max(lo[2], hi[2]))
    return points, box_frame, box


def _prompts_json(tmp_path, image, axis, system):
    def conv(q):
        if system == "ijk":
            return list(q)
        p = _lps(image, q)
        return list(p * (-1, -1, 1) if system == "ras" else p)

    lo, hi = BOXES_IJK[axis]
    data = {"coordinates": system, "objects": [{
        "id": 3, "name": "lesion",
        "points": [{"position": conv(q), "label": label} for q, label in POINTS_IJK],
        "boxes": [{"min": conv(lo), "max": conv(hi)}]}]}
    return _write(tmp_path / f"prompts_{system}.json", data)


def _markups(tmp_path, image, axis, system):
    """A Slicer point list and a thin ROI on the box's frame, aligned with the image axes."""
    flip = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    points = []
    for n, (q, label) in enumerate(POINTS_IJK):
        cp = {"id": str(n + 1), "label": f"lesion-{n + 1}", "description": "",
              "position": list(_lps(image, q) * flip), "positionStatus": "defined"}
        if label == 0:
            cp["description"] = "exclude"
        points.append(cp)
    points.append({"id": "9", "label": "lesion-9", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"})
    lo, hi = (np.array(q) for q in BOXES_IJK[axis])
    center_ijk = (lo + hi) / 2
    spacing = np.array(image.GetSpacing())
    size_mm = np.abs(hi - lo) * spacing
    size_mm[2 - axis] = 0.2 * spacing[2 - axis]  # thin along the propagation axis
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = np.diag(flip) @ direction  # ROI axes = image axes, as columns, in the file's system
    roi = {"type": "ROI", "name": "lesion", "coordinateSystem": system, "roiType": "Box",
           "center": list(_lps(image, center_ijk) * flip), "size": list(size_mm),
           "orientation": list(orientation.ravel()), "controlPoints": []}
    fiducials = {"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm", "controlPoints": points}
    _write(tmp_path / "lesion.mrk.json", {"markups": [fiducials]})  # name from the file stem
    _write(tmp_path / "roi.mrk.json", {"markups": [roi]})
    return [tmp_path / "lesion.mrk.json", tmp_path / "roi.mrk.json"]


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_every_prompt_format_gives_the_same_frames_and_pixels(tmp_path, volume, sitk_image, axis):
    expected_points, box_frame, box = _expected(axis)
    sources = {s: [_prompts_json(tmp_path, sitk_image, axis, s)] for s in ("ijk", "lps", "ras")}
    for system in ("LPS", "RAS"):
        folder = tmp_path / system
        folder.mkdir()
        sources[f"mrk-{system}"] = _markups(folder, sitk_image, axis, system)
    for label, paths in sources.items():
        objects = read_prompts(paths)
        assert [o.name for o in objects] == ["lesion"], label
        frame_prompts = to_frame_prompts(objects, volume, axis)
        got = {fp.frame: fp for fp in frame_prompts}
        assert set(got) == set(expected_points) | {box_frame}, label
        for frame, pts in expected_points.items():
            fp = got[frame]
            np.testing.assert_allclose(fp.points, [(x, y) for x, y, _ in pts], atol=1e-6, err_msg=label)
            np.testing.assert_array_equal(fp.labels, [lab for _, _, lab in pts], err_msg=label)
        np.testing.assert_allclose(got[box_frame].box, box, atol=1e-6, err_msg=label)
        assert all(fp.box is None for fp in frame_prompts if fp.frame != box_frame), label
        assert all(fp.obj_id == objects[0].id for fp in frame_prompts)


@pytest.mark.parametrize("system", ["ijk", "lps", "ras"])
def test_point_outside_the_image_names_the_coordinate(tmp_path, volume, sitk_image, system):
    outside = (4.0, 3.0, 7.3)  # k beyond the 7 slices
    position = list(outside) if system == "ijk" else list(_lps(sitk_image, outside) * ((-1, -1, 1) if system == "ras" else 1))
    path = _write(tmp_path / "p.json", {"coordinates": system, "objects": [{"name": "liver", "points": [{"position": position}]}]})
    with pytest.raises(InputError, match=r"index k = 7\.30.*7 voxels along k") as info:
        to_frame_prompts(read_prompts(path), volume, 0)
    assert "'liver' points[0]" in str(info.value) and system.upper() in str(info.value)


def test_box_across_slices_is_refused_with_the_reason(tmp_path, volume):
    path = _write(tmp_path / "p.json", {"coordinates": "ijk", "objects": [
        {"name": "liver", "boxes": [{"min": [1, 1, 1], "max": [5, 5, 4]}]}]})
    objects = read_prompts(path)
    with pytest.raises(InputError, match=r"not flat.*k = 1\.00 and 4\.00"):
        to_frame_prompts(objects, volume, 0)
    # propagating along j instead, its corners' j (1 and 5) differ as well
    with pytest.raises(InputError, match="not flat"):
        to_frame_prompts(objects, volume, 1)


def test_3d_roi_becomes_a_box_on_its_centre_slice_clipped_to_the_image(tmp_path, volume):
    # identity-oriented ROI in IJK terms is awkward on an oblique image; use an axis-aligned image
    image = sitk.Image(20, 16, 12, sitk.sitkInt16)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "flat.nrrd"))
    vol = read_volume(tmp_path / "flat.nrrd")
    # centre at i=8, j=6, k=5; 10 x 30 x 8 mm: j overhangs the image, k spans 4 slices
    center = np.array([10.0 + 8, -5.0 + 6, 3.0 + 2 * 5])
    roi = {"type": "ROI", "coordinateSystem": "LPS", "center": list(center), "size": [10, 30, 8],
           "orientation": [1, 0, 0, 0, 1, 0, 0, 0, 1]}
    path = _write(tmp_path / "tumour.mrk.json", {"markups": [roi]})
    (fp,) = to_frame_prompts(read_prompts(path), vol, 0)
    assert fp.frame == 5 and fp.points is None
    np.testing.assert_allclose(fp.box, [3.0, -0.5, 13.0, 15.5])  # j clipped to the pixels' edges


def test_markups_and_json_objects_merge_by_name_and_get_free_ids(tmp_path, volume):
    js = _write(tmp_path / "p.json", {"coordinates": "ijk", "objects": [
        {"id": 1, "name": "liver", "points": [{"position": [2, 2, 2]}]}]})
    liver = _write(tmp_path / "liver.mrk.json", {"markups": [{"type": "Fiducial", "controlPoints": [
        {"label": "-bg", "position": list(volume.index_to_physical([4, 4, 2])[0])}]}]})
    spleen = _write(tmp_path / "s.mrk.json", {"markups": [{"type": "Fiducial", "name": "spleen", "controlPoints": [
        {"label": "S-1", "position": list(volume.index_to_physical([6, 5, 3])[0])}]}]})
    objects = read_prompts([spleen, js, liver])
    assert [(o.name, o.id) for o in objects] == [("spleen", 2), ("liver", 1)]
    liver_frame = [fp for fp in to_frame_prompts(objects, volume, 0) if fp.obj_id == 1]
    assert len(liver_frame) == 1 and liver_frame[0].frame == 2
    np.testing.assert_allclose(liver_frame[0].points, [[2, 2], [4, 4]], atol=1e-9)
    np.testing.assert_array_equal(liver_frame[0].labels, [1, 0])  # "-bg" is an exclude point


@pytest.mark.parametrize("content, message", [
    ('{"objects": [{"points": [{"position": [1, 2, 3]}]}]}', 'add "coordinates"'),
    ('{"coordinates": "xyz", "objects": [{"points": [{"position": [1, 2, 3]}]}]}', '"coordinates" is \'xyz\''),
    ('{"coordinates": "ijk", "objects": [{"point": [{"position": [1, 2, 3]}]}]}', "unknown key.*'point'"),
    ('{"coordinates": "ijk", "objects": [{"points": [{"position": [1, 2, 3], "label": 2}]}]}', '"label" must be 1'),
    ('{"coordinates": "ijk", "objects": [{"points": [{"position": [1, 2]}]}]}', "expected 3 finite numbers"),
    ('{"coordinates": "ijk", "objects": [{"name": "a"}]}', "no points and no boxes"),
    ('{"coordinates": "ijk", "objects": [{"id": 1, "points": [{"position": [1, 2, 3]}]}, '
     '{"id": 1, "points": [{"position": [1, 2, 3]}]}]}', '"id" 1 is used'),
    ('{"coordinates": "ijk", "objects": [{"boxes": [{"min": [1, 2, 3]}]}]}', 'needs "min" and "max"'),
    ('{"markups": [{"type": "Line", "controlPoints": []}]}', "type 'Line' are not prompts"),
    ('{"markups": [{"type": "Fiducial", "controlPoints": []}]}', "no placed control points"),
    ("not json at all", "not valid JSON"),
])
def test_malformed_prompt_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_prompts(path)


def test_two_boxes_on_one_frame_for_one_object_are_refused(tmp_path, volume):
    path = _write(tmp_path / "p.json", {"coordinates": "ijk", "objects": [{"name": "a", "boxes": [
        {"min": [1, 1, 2], "max": [4, 4, 2]}, {"min": [5, 5, 2], "max": [8, 7, 2]}]}]})
    with pytest.raises(InputError, match="second box"):
        to_frame_prompts(read_prompts(path), volume, 0)
