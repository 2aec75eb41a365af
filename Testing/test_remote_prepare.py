"""The remote session offers the engine's prepare and refine-until-agreement, on uvicorn on 127.0.0.1:
a prepared click gives the local mask, `until` reaches the engine, and the stop report comes back."""

import numpy as np
import pytest

from medsam2 import InputError
from remote_fixtures import client, make_volume, same_frames, server  # noqa: F401


def test_remote_prepare_and_refine_report_match_the_local_session(model, server, client):
    vol = make_volume(slices=8)
    local, remote = model.open(vol), client.open(vol)
    for s in (local, remote):
        s.add_prompt(2, points=[[33, 30]], labels=[1])
    same_frames(list(remote.propagate()), list(local.propagate()))

    assert remote.prepare(5) is True
    np.testing.assert_array_equal(remote.add_prompt(5, points=[[10, 10]], labels=[0]),
                                  local.add_prompt(5, points=[[10, 10]], labels=[0]))
    with server.state.session(remote.id) as sess:
        assert sess.engine._tracking.prepared.reused == 1  # the click used what the route prepared

    same_frames(list(remote.propagate(start=5)), list(local.propagate(start=5)))  # until="agreement"
    assert remote.last_propagation.as_dict() == local.last_propagation.as_dict()
    same_frames(list(remote.propagate("forward", start=5, until="conditioning")),
                list(local.propagate("forward", start=5, until="conditioning")))
    assert remote.last_propagation.directions[0].reason == "end"
    assert remote.last_propagation.summary() == local.last_propagation.summary()

    with pytest.raises(InputError, match="until must be one of"):
        remote.propagate(start=5, until="forever")
    with pytest.raises(InputError, match="outside the volume"):
        remote.prepare(8)
    # preparing yields to real work: with the GPU taken, the server does nothing and says so
    server.state.gpu.acquire()
    try:
        assert remote.prepare(6) is False
    finally:
        server.state.gpu.release()
