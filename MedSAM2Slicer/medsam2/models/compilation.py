"""Optional `torch.compile` of the network's parts (opt-in: `load_model(..., compile=True)`).

Compiling fuses the many small operations of memory attention, the mask decoder and the memory
encoder into fewer kernels; on CUDA GPUs that is where the tracking step loses time to kernel
launches. It is off by default: the first propagation pays for compilation (minutes: 169 s for
MedSAM2 at 512 px on 2 CPU cores; `warm_up` pays it up front), and compiled kernels may round
differently, so `memory="sam2"` is then not promised bit-identical to the official predictor.

We compile the modules' `forward` and leave the Python around them alone: prompt handling, the
feature cache and the self-sorting memory bank stay plain Python, which is what lets compiled and
eager sessions share everything else. No CUDA graphs (`mode` default): they would recycle output
buffers that our feature cache keeps, and they give little for the large image-encoder kernels.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import InputError

# part -> dynamic shapes? Memory attention sees a varying number of memories (dynamic); the
# others see fixed shapes per image size (a new batch or point count compiles once more).
PARTS = {
    "image_encoder": False,
    "memory_attention": True,
    "memory_encoder": False,
    "sam_mask_decoder": False,
    "sam_prompt_encoder": False,
}
# No CUDA graphs: "reduce-overhead" and "max-autotune" use them (see above), so they are not offered.
MODES = ("default", "max-autotune-no-cudagraphs")
DEFAULT_MODE = "default"


def compile_mode(value) -> str | None:
    """Normalise a `compile` setting: False/None -> None, True -> the default mode, or a mode name."""
    if value in (None, False, "", "off", "none"):
        return None
    if value is True or value == "on":
        return DEFAULT_MODE
    if value not in MODES:
        raise InputError(f"compile must be true/false or one of {MODES} (modes with CUDA graphs would overwrite "
                         f"cached image features); got {value!r}")
    return value


def _one_layout(module, args, kwargs):
    """Frame features reach memory attention with different strides depending on the path they took
    (a prompted frame or a tracked one, fresh or cached). Compiled code is specialised on strides,
    so without this a new propagation compiled memory attention again (seen with TORCH_LOGS=
    recompiles). Making them contiguous changes no value."""
    for key in ("curr", "curr_pos"):
        value = kwargs.get(key)
        if isinstance(value, (list, tuple)):
            kwargs[key] = [v.contiguous() for v in value]
        elif value is not None:
            kwargs[key] = value.contiguous()
    return args, kwargs


def compile_parts(predictor, mode: str) -> list[str]:
    """Replace each part's forward with its compiled version; returns the parts compiled."""
    if not hasattr(torch, "compile"):
        raise InputError("this PyTorch has no torch.compile (needs PyTorch 2); load the model without compile")
    try:  # PyTorch reads its kernel templates in the locale's encoding: refuse early, and say why
        importlib.import_module("torch._inductor.compile_fx")
    except UnicodeDecodeError:
        import locale

        raise InputError(f"torch.compile cannot start: the process's text encoding is "
                         f"{locale.getpreferredencoding(False)}, and PyTorch reads its kernel templates as UTF-8. "
                         "Run with PYTHONUTF8=1 (or a UTF-8 locale such as LANG=C.UTF-8)") from None
    done = []
    if not getattr(predictor.memory_attention, "_medsam2_compiled", False):
        predictor.memory_attention.register_forward_pre_hook(_one_layout, with_kwargs=True)
    for name, dynamic in PARTS.items():
        module = getattr(predictor, name, None)
        if module is None or getattr(module, "_medsam2_compiled", False):
            continue
        module.forward = torch.compile(module.forward, mode=mode, dynamic=dynamic)
        module._medsam2_compiled = True
        done.append(name)
    # a session may see more memory sizes, batch sizes and point counts than dynamo's default allows
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 32))
    return done


def warm_up(model, volume=None, memory="sam2") -> float:
    """Run the steps a user runs (click, propagate both ways, correct, re-propagate, click again)
    twice on `volume` (default: a small synthetic one), so that later work finds its code compiled;
    the second pass meets the variants of memory attention that appear only once compiled code has
    run. Returns the seconds spent."""
    import time

    import numpy as np

    t0 = time.perf_counter()
    if volume is None:  # a bright disc growing through 12 slices: something to track
        yy, xx = np.mgrid[:128, :128]
        volume = np.stack([((yy - 64) ** 2 + (xx - 64) ** 2 < (20 + k) ** 2) * 200.0 for k in range(12)])
    n, rows, cols = volume.shape
    mid, fix = n // 2, (3 * n) // 4
    centre, off = [cols / 2, rows / 2], [cols / 4, rows / 4]
    for _ in range(2):
        session = model.open(volume, memory=memory)
        try:
            session.add_prompt(mid, obj_id=1, points=[centre], labels=[1])
            for _ in session.propagate("both"):
                pass
            session.add_prompt(fix, obj_id=1, points=[off], labels=[1])
            for _ in session.propagate("both", start=fix):
                pass
            session.add_prompt(fix, obj_id=1, points=[[cols * 0.9, rows * 0.9]], labels=[0])
        finally:
            session.close()
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - t0
