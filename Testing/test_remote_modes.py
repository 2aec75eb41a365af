"""Every engine mode goes through the server: 2D image sets (one-prompt) and multi-axis fusion give
what the local model gives."""

import numpy as np
import pytest

from medsam2.errors import InputError
from medsam2.tracking.fusion import FusionProgress, total_steps
from remote_fixtures import client, make_volume, same_frames, server  # noqa: F401


def image_set(count=5, shape=(48, 40), seed=41):
    """Unrelated 8-bit pictures of one size, each with a bright blob somewhere else."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        im = rng.normal(60, 20, shape)
        r, c = 12 + 3 * i, 10 + 2 * i
        im[r:r + 18, c:c + 16] += 120
        images.append(np.clip(im, 0, 255).astype(np.uint8))
    return images


def test_an_image_set_over_the_server_gives_the_local_masks(model, client):
    images = image_set()
    local, remote = model.open_images(images), client.open_images(images)
    assert (remote.num_frames, remote.frame_shape) == (local.num_frames, local.frame_shape)
    assert remote.image_shapes == local.image_shapes == [(48, 40)] * 5
    want = local.add_prompt(1, points=[[20, 22]], labels=[1])
    got = remote.add_prompt(1, points=[[20, 22]], labels=[1])
    assert got.shape == (48, 40) and np.array_equal(got, want)
    edited = np.zeros((48, 40), bool)
    edited[20:34, 16:30] = True
    assert np.array_equal(remote.add_prompt(3, obj_id=2, mask=edited), local.add_prompt(3, obj_id=2, mask=edited))
    same_frames(list(remote.propagate()), list(local.propagate()))
    for got, want in ((remote.mask(1), local.mask(1)), (remote.masks(), local.masks())):
        assert isinstance(got, list) and len(got) == len(want) == 5
        assert all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want))
    assert any(m.any() for m in local.mask(1)), "the comparison needs some foreground to mean anything"
    with pytest.raises(InputError) as remote_err:
        remote.propagate(axes="all")
    with pytest.raises(InputError) as local_err:
        local.propagate(axes="all")
    assert str(remote_err.value) == str(local_err.value)
    remote.close()


def test_an_image_set_given_as_one_array_and_bad_sets(model, client):
    stack = np.stack(image_set(count=3, seed=43))
    local, remote = model.open_images(stack), client.open_images(stack)
    assert np.array_equal(remote.add_prompt(0, box=(8, 10, 30, 34)), local.add_prompt(0, box=(8, 10, 30, 34)))
    remote.close()
    with pytest.raises(InputError, match="grey 2D images of one shape"):
        client.open_images([np.zeros((8, 8), np.uint8), np.zeros((9, 8), np.uint8)])
    with pytest.raises(InputError, match="empty"):
        client.open_images([])


def test_a_fused_run_over_the_server_yields_exactly_what_the_local_one_yields(model, client):
    vol = make_volume(slices=3, rows=12, cols=12, seed=44)  # small on every axis: the three runs are short
    local, remote = model.open(vol), client.open(vol)
    for s in (local, remote):
        s.add_prompt(1, points=[[6, 5]], labels=[1])
        s.add_prompt(2, obj_id=2, box=(1, 1, 7, 7))
    want, got = list(local.propagate(axes="all")), list(remote.propagate(axes="all"))
    assert len(got) == len(want) == total_steps(vol.shape)
    progress = [item for item, masks in got if isinstance(item, FusionProgress)]
    assert [(item, {}) for item in progress] == got[:len(progress)] == want[:len(progress)]
    assert [p.done for p in progress] == list(range(1, len(progress) + 1))
    same_frames(got[len(progress):], want[len(progress):])
    assert [f for f, _ in got[len(progress):]] == list(range(3))
    assert np.array_equal(remote.masks(), local.masks())  # the fused masks replace the session's results
    with pytest.raises(InputError) as remote_err:
        remote.propagate(direction="forward", axes="all")
    with pytest.raises(InputError) as local_err:
        local.propagate(direction="forward", axes="all")
    assert str(remote_err.value) == str(local_err.value)
    remote.close()
