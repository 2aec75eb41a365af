"""Opt-in torch.compile: the compiled network tracks like the eager one, and bad modes are refused."""

import warnings

import medsam2
import pytest
from medsam2.models.compilation import PARTS, compile_mode, warm_up
from medsam2.errors import InputError


@pytest.mark.parametrize("value, mode", [(False, None), (None, None), (True, "default"),
                                         ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_settings_normalise(value, mode):
    assert compile_mode(value) == mode


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune", "fast"])
def test_cuda_graph_and_unknown_modes_are_refused(mode):
    # CUDA-graph modes recycle output buffers that the feature cache keeps: refused, with the reason
    with pytest.raises(InputError, match="compile must be"):
        compile_mode(mode)


def test_warmed_up_compiled_engine_tracks_like_the_eager_one_without_compiling_again(random_checkpoint, model,
                                                                                    ct_slab):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = medsam2.load_model("sam2.1_hiera_tiny", checkpoint=random_checkpoint, device="cpu",
                                      image_size=model.image_size, compile=True)
    assert compiled.compiled == "default"
    slab = ct_slab[:6]

    def track(m):
        s = m.open(slab, memory="sam2")
        s.add_prompt(3, obj_id=1, points=[[40, 64]], labels=[1])
        for _ in s.propagate("both"):
            pass
        return s.mask(1)

    # what `medsam2 serve --compile` does before it listens, on its own synthetic volume
    assert warm_up(compiled) > 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    # every part of the network runs as compiled graphs, not silently in eager mode
    assert graphs >= len(PARTS)
    eager, fast = track(model), track(compiled)
    # the user's first propagation finds everything compiled: no multi-minute pause on a GPU server
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert eager.any() and fast.any()
    # compiled kernels round differently, so not bit for bit; the masks still agree
    assert (eager == fast).mean() > 0.99


def test_a_non_utf8_process_is_told_how_to_run_compile(random_checkpoint, tmp_path):
    # PyTorch reads its kernel templates in the locale's encoding; under an ASCII locale the
    # compile would die deep inside PyTorch. It is refused up front with the fix instead.
    import os
    import subprocess
    import sys

    code = ("import medsam2, sys\n"
            "from medsam2.errors import InputError\n"
            "try:\n"
            f"    medsam2.load_model('sam2.1_hiera_tiny', checkpoint={str(random_checkpoint)!r}, device='cpu',"
            " image_size=256, compile=True)\n"
            "except InputError as e:\n"
            "    print('REFUSED', e)\n")
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in out.stdout and "PYTHONUTF8=1" in out.stdout, out.stdout + out.stderr
