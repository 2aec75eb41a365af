"""The module's self-test scenario, without Qt: run by MedSAM2Test inside Slicer (on SampleData's
CTChest) and by the test suite on slicer-core (on slicerio's chest CT).

A prompt, a propagation, a correction refined from its slice, and undo of all three, through the
module's controller with the engine in its child process and random test weights (no download):
it checks the plumbing, not the anatomy.
"""

from __future__ import annotations

import os
import tempfile
import time

AXIAL = (0.0, 0.0, 1.0)


def skip_reason() -> str | None:
    """Why the self-test cannot run in this Slicer (too old, or the engine's packages not installed,
    as on the Extensions Index build machines, which have no torch); None when it can. Looks for
    the packages without importing them."""
    from . import install

    problem = install.python_problem() or install.present("local")
    return f"MedSAM2 engine not installed here ({problem}): test skipped" if problem else None


def run_self_test(scene, volume_node, say=print, timeout: float = 600.0) -> None:
    """Raises AssertionError (or the engine's error) when something does not work."""
    from medsam2.testing import write_random_checkpoint

    from .controller import ModuleController
    from .models import ModelSettings

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MedSAM2 self-test")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "structure")
    say("Writing a random-weight test checkpoint and starting the engine process")
    path = write_random_checkpoint(os.path.join(tempfile.mkdtemp(), "random.pt"), "sam2.1_hiera_tiny", image_size=256)
    errors = []
    controller = ModuleController(scene, on_error=errors.append)
    try:
        controller.set_settings(ModelSettings(name="sam2.1_hiera_tiny", checkpoint=str(path), device="cpu",
                                              image_size=256, allow_random=True))
        controller.select(volume_node, segmentation, segment_id)
        bounds = [0.0] * 6
        volume_node.GetRASBounds(bounds)
        center = [(bounds[i] + bounds[i + 1]) / 2 for i in (0, 2, 4)]
        steps = [lambda: controller.place_point(center, AXIAL),
                 lambda: controller.propagate("both", slice_normal=AXIAL),
                 lambda: controller.place_point(center, AXIAL, include=False),
                 lambda: controller.refine(center, AXIAL)]
        for step in steps:
            job = step()
            deadline = time.monotonic() + timeout
            while controller.busy and time.monotonic() < deadline:
                controller.poll()
                time.sleep(0.01)
            assert job is not None and job.done and not errors, errors or "a job did not finish"
        say("Prompt, propagation, correction and refine: OK")
        session = controller.session(create=False)
        undone = 0
        while controller.undo() is not None:
            undone += 1
        assert undone >= 3 and not session.can_undo, f"{undone} actions undone"
        say("Undo of every action: OK")
    finally:
        controller.shutdown()
