"""The slice a view shows is prepared in the engine's idle time (issue 22): the engine child's idle
task, and the controller that forwards the views' slices once scrolling rests; a refine's status
line says where it stopped."""

import socket
import threading
import time

import numpy as np

import slicer_fixtures as sf
from medsam2.prompt import Prompt
from test_controller import AXIAL, Shell, _controller, in_process  # noqa: F401


def _wait(predicate, timeout=300.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_engine_child_prepares_the_viewed_slice_in_idle_time(model, ct_slab):
    from medsam2.remote import channel
    from medsam2.remote.agent import Agent, Link

    ours, theirs = socket.socketpair()
    replies, reader = {}, channel.MessageReader()

    def read():  # the application's end: collect the replies
        while True:
            data = theirs.recv(1 << 20)
            if not data:
                return
            reader.feed(data)
            while (message := reader.pop()) is not None:
                if message[0].get("type") in ("done", "error"):
                    replies[message[0]["id"]] = message[0]

    threading.Thread(target=read, daemon=True).start()
    agent = Agent(Link(ours))
    agent.engine = model
    slab = np.ascontiguousarray(ct_slab)
    agent.dispatch({"id": 1, "op": "open", "handle": 1, "memory": "sam2", "window": None,
                    "array": channel.array_meta(slab)}, slab.tobytes())
    agent.dispatch({"id": 2, "op": "add_prompt", "handle": 1,
                    "prompt": Prompt.make(2, points=[[64, 64]], labels=[1]).to_json()}, b"")
    agent.dispatch({"id": 3, "op": "propagate", "handle": 1, "direction": "both"}, b"")
    agent.dispatch({"id": 4, "op": "prepare", "handle": 1, "frame": 6}, b"")
    agent.dispatch({"id": 5, "op": "prepare", "handle": 1, "frame": 7}, b"")  # the view moved on: 7 replaces 6
    _wait(lambda: 5 in replies, what="the prepare requests' replies")
    assert replies[4]["value"] == replies[5]["value"] == {"prepared": False}  # answered at once, done later
    assert replies[3]["value"]["report"]["directions"][0]["reason"] == "end"  # the stop report comes back
    prepared = agent.sessions[1]._tracking.prepared
    _wait(lambda: prepared.frames() == [7], what="slice 7 prepared in idle time")
    # a click there uses it; closing the session drops a preparation still waiting
    agent.dispatch({"id": 6, "op": "add_prompt", "handle": 1,
                    "prompt": Prompt.make(7, points=[[30, 90]], labels=[0]).to_json()}, b"")
    _wait(lambda: 6 in replies, what="the click")
    assert replies[6]["type"] == "done" and prepared.reused == 1
    # queued behind a propagation: a preparation asked for, then the session closed
    agent.dispatch({"id": 7, "op": "propagate", "handle": 1, "direction": "forward", "start": 7}, b"")
    agent.dispatch({"id": 8, "op": "prepare", "handle": 1, "frame": 3}, b"")
    agent.dispatch({"id": 9, "op": "close", "handle": 1}, b"")
    _wait(lambda: 9 in replies, what="the close")
    assert not agent.idle and 3 not in prepared.frames()
    ours.close()
    theirs.close()


def test_the_controller_forwards_a_rested_view_and_a_refine_says_where_it_stopped(in_process, ct_volume):
    from MedSAM2Lib.controller import VIEWING_SETTLE_S

    shell = Shell()
    scene, volume, segmentation, segment_id, values = sf.ct_scene(ct_volume, count=12)
    controller = _controller(scene, shell, in_process)
    controller.select(volume, segmentation, segment_id)
    ras, k = sf.prompt_ras(volume, values)
    controller.place_point(ras, AXIAL)
    controller.propagate("both", slice_normal=AXIAL)
    while controller.busy:
        controller.poll()
    session = controller.session(create=False)
    axis = session.geometry.axis_for_normal(AXIAL)
    prepared = session._axes[axis].engine.session._tracking.prepared
    shown = [sf.ijk_to_ras(volume, (values.shape[2] // 3, values.shape[1] // 2, k + d) + np.zeros(3)) for d in (1, 3)]
    frame = session.frame_index(shown[1], AXIAL)

    controller.viewing(shown[0], AXIAL, "Red")  # scrolling: two slices in quick succession
    controller.viewing(shown[1], AXIAL, "Red")
    controller.poll()
    controller.poll()
    assert prepared.frames() == [], "nothing is prepared while the view is still moving"
    time.sleep(VIEWING_SETTLE_S)
    controller.poll()  # forwarded
    controller.poll()  # the engine's idle time: prepared
    assert prepared.frames() == [frame]

    controller.place_point(shown[1], AXIAL, include=False)  # a correction on the shown slice
    job = controller.refine(shown[1], AXIAL)
    while controller.busy:
        controller.poll()
    assert prepared.reused == 1, "the click used the slice prepared for it"
    assert job.report is not None and job.report.refine and not shell.errors, shell.errors
    assert shell.messages[-1] == job.report.summary() and shell.messages[-1].startswith("Refined ")
    controller.poll()  # idle again: the shown slice is prepared under the refined memory
    assert prepared.frames() == [frame]
