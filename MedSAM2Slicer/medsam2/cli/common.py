"""What the CLI verbs share: one definition of each model argument (with the engine's own lists from
options.py), the checks every verb makes before anything slow, and loading the model the way a
command-line user should see it."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

from ..options import AXES, DEFAULT_MODEL, DEVICES, MEMORY_MODES, PRECISIONS, image_size_problem

DEVICE_HELP = "auto (CUDA, then Apple MPS, then the CPU), cpu, cuda, cuda:N (the N-th GPU) or mps"


def say(text: str) -> None:
    """A progress or summary line for the user, on stderr (stdout stays for results)."""
    print(text, file=sys.stderr, flush=True)


def device_name(text: str) -> str:
    """argparse type of --device: one of options.DEVICES, or cuda:N."""
    if text in DEVICES or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; choose {DEVICE_HELP}")


def add_model_arguments(p, *, checkpoint_help: str | None = None, precision_help: str | None = None) -> None:
    """--model, --checkpoint, --device, --image-size and --precision, the same for every verb that loads the model."""
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"registry model name (`medsam2 models` lists them; default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", metavar="FILE",
                   help=checkpoint_help or "a local checkpoint file for that model instead of the registry download "
                                           "(a copy made offline, a fine-tune)")
    p.add_argument("--device", default="auto", type=device_name, metavar="DEVICE", help=DEVICE_HELP)
    p.add_argument("--image-size", type=int, metavar="N",
                   help="model input size in pixels, a multiple of 32 (default: the model's own; smaller is "
                        "faster and coarser)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help=precision_help or "auto (default): bfloat16 on CUDA, float32 on a CPU (exactly SAM2's "
                                          "results); bfloat16 on a CPU is faster only with bf16 units "
                                          "(AVX512-BF16, AMX), and 9-21x slower without (docs/performance.md)")
    p.add_argument("--random-weights", action="store_true",
                   help="try the verb offline: random test weights for --model (written once into the cache, as "
                        "scripts/demo.sh --random-weights does); results are meaningless and a banner says so")


def add_compile_argument(p) -> None:
    """--compile [MODE], the same for every verb that offers it."""
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the network (MODE: default | max-autotune-no-cudagraphs): faster tracking on "
                        "GPUs after a slow first propagation; results no longer bit-identical to SAM2's "
                        "(docs/performance.md)")


def add_memory_argument(p, help: str | None = None) -> None:
    p.add_argument("--memory", default=MEMORY_MODES[0], choices=MEMORY_MODES,
                   help=help or "memory bank: MedSAM-2's self-sorting bank (default) or stock SAM2 memory")


def add_axes_argument(p, help: str) -> None:
    p.add_argument("--axes", default=AXES[0], choices=AXES, help=help)


def add_window_argument(p, help: str) -> None:
    p.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"), help=help)


def check_model_inputs(args) -> None:
    """What can be wrong with the shared arguments, said before any input is read or model loaded."""
    from ..errors import InputError

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise InputError(f"--checkpoint {checkpoint}: no such file")
    image_size = getattr(args, "image_size", None)
    if image_size is not None and image_size_problem(image_size):
        raise InputError(f"--image-size {image_size}: {image_size_problem(image_size)}")
    window = getattr(args, "window", None)
    if window is not None and not window[0] < window[1]:
        raise InputError(f"--window {window[0]:g} {window[1]:g}: LOW must be below HIGH")
    if getattr(args, "random_weights", False):
        use_random_weights(args)


def use_random_weights(args) -> None:
    """--random-weights: point --checkpoint at the cached random-weight test checkpoint for --model
    (written on first use). The model then loads through the normal path, which prints the banner."""
    from ..errors import InputError
    from ..models.registry import get_spec

    if args.checkpoint is not None:
        raise InputError("give --random-weights or --checkpoint FILE, not both")
    if getattr(args, "server", None):
        raise InputError("--server runs the model on that server with its own weights: drop --random-weights")
    get_spec(args.model)  # an unknown model name is said before anything is written
    from ..testing import cached_random_checkpoint

    args.checkpoint = str(cached_random_checkpoint(args.model, args.image_size))


def load_model_for_cli(args, meaning: str = "results"):
    """Load --model/--checkpoint/--device/--image-size/--precision(/--compile). Random weights get a
    banner on stderr instead of a Python warning, saying that `meaning` (results, scores, masks) are
    void; bfloat16 on a CPU without bf16 units gets one line saying what it costs."""
    import medsam2

    from ..models.cpu_support import SLOW_BF16_TEXT, bf16_is_slow

    with warnings.catch_warnings():  # the engine's warnings are replaced by the lines below
        warnings.simplefilter("ignore")
        model = medsam2.load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                                   image_size=args.image_size, precision=getattr(args, "precision", "auto"),
                                   compile=getattr(args, "compile", None) or False)
    if getattr(model, "weights_are_random", False):
        random_weights_banner(meaning)
    if bf16_is_slow(model.precision, model.device.type):
        say(f"note: --precision bfloat16: {SLOW_BF16_TEXT}: --precision float32.")
    return model


def random_weights_banner(meaning: str = "results") -> None:
    """The stderr banner for random test weights, saying that `meaning` are void."""
    bar = "*" * 72
    say(f"{bar}\nRANDOM WEIGHTS: {meaning} are meaningless (this checkpoint is a test file, not a trained "
        f"model)\n{bar}")


def extra_install_command(extra: str) -> str:
    """The one command that installs the optional part `extra` (a pyproject extra) into the
    environment this `medsam2` runs in: this Python's pip, this checkout when it runs from one."""
    import shlex
    from pathlib import Path

    checkout = Path(__file__).resolve().parents[3]
    python = shlex.quote(sys.executable)
    if (checkout / "pyproject.toml").is_file() and (checkout / "scripts" / "install.sh").is_file():
        return f"{python} -m pip install -e {shlex.quote(f'{checkout}[{extra}]')}  (or: bash {checkout}/scripts/install.sh)"
    return f"{python} -m pip install 'medsam2-slicer[{extra}]'"


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """Raise one clear MedSAM2Error naming the install command when a module of `extra` is missing."""
    from importlib.util import find_spec

    from ..errors import MedSAM2Error

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise MedSAM2Error(f"the optional '{extra}' part is not installed in {sys.prefix} ({', '.join(missing)} "
                           f"missing); install it with: {extra_install_command(extra)}")
