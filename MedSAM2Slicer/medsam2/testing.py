"""Test and benchmark helpers. Nothing here is for real segmentation.

`write_random_checkpoint` writes a random-weight checkpoint in the official file format
(`{"model": state_dict}`), so tests load it through the normal path. The file is marked
(`medsam2_random_weights`), and a model loaded from it says so (`model.weights_are_random`), so
no user runs on random weights by accident.
"""

from __future__ import annotations

from pathlib import Path

import torch

RANDOM_MARK = "medsam2_random_weights"

# A freshly initialised network predicts "no object" (negative object-score logit) on most frames,
# which would make every mask empty and every comparison trivially equal. Biasing the object-score
# head makes objects present, so tests compare real, non-empty masks.
_OBJECT_SCORE_BIAS = 4.0


def write_random_checkpoint(path, name="sam2.1_hiera_tiny", seed=0, image_size=None) -> Path:
    """Write random weights for registry model `name`'s architecture to `path`; returns the path."""
    from .models.build import build_predictor
    from .models.registry import get_spec

    spec = get_spec(name)
    size = int(image_size or spec.image_size)
    devnull_rng = torch.random.fork_rng()  # leave the caller's global RNG untouched
    with devnull_rng:
        torch.manual_seed(seed)
        predictor = build_predictor(spec.config, size, "cpu", spec.hydra_overrides)
        state = predictor.state_dict()
    head = [k for k in state if "pred_obj_score_head" in k and k.endswith("bias")]
    if head:
        last = sorted(head)[-1]
        state[last] = state[last] + _OBJECT_SCORE_BIAS
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, RANDOM_MARK: True, "medsam2_model": name, "seed": seed}, path)
    return path


def cached_random_checkpoint(name: str, image_size: int | None = None) -> Path:
    """The random-weight test checkpoint for registry model `name` at `image_size`, written once into
    the cache (`medsam2 VERB --random-weights`, `scripts/demo.sh --random-weights`) and reused."""
    import os
    import tempfile

    from .models.checkpoints import cache_dir
    from .models.registry import get_spec

    spec = get_spec(name)
    size = int(image_size or spec.image_size)
    path = cache_dir() / "random-weights" / f"{spec.name}_{size}px.pt"
    if not path.is_file():  # written beside, then renamed: a second command never reads half a file
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        os.close(handle)
        try:
            write_random_checkpoint(tmp, spec.name, image_size=size)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
