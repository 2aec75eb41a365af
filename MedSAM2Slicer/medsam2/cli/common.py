"""What several CLI verbs share: loading the model the way a command-line user should see it."""

import sys
import warnings


def load_model_for_cli(args, meaning="results"):
    """Load --model/--checkpoint/--device/--image-size(/--precision/--compile); random weights get a banner
    on stderr instead of a Python warning, saying that `meaning` (results, scores, masks) are void."""
    import medsam2

    with warnings.catch_warnings():  # the random-weights warning is replaced by the banner below
        warnings.simplefilter("ignore")
        model = medsam2.load_model(args.model, checkpoint=args.checkpoint, device=args.device,
                                   image_size=args.image_size, precision=getattr(args, "precision", "auto"),
                                   compile=getattr(args, "compile", None) or False)
    if getattr(model, "weights_are_random", False):
        random_weights_banner(meaning)
    return model


def random_weights_banner(meaning="results"):
    """The stderr banner for random test weights, saying that `meaning` are void."""
    bar = "*" * 72
    print(f"{bar}\nRANDOM WEIGHTS: {meaning} are meaningless (this checkpoint is a test file, not a trained "
          f"model)\n{bar}", file=sys.stderr, flush=True)


def add_compile_argument(p):
    """--compile [MODE], the same for every verb that loads the model."""
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="torch.compile the network (MODE: default | max-autotune-no-cudagraphs): faster tracking on "
                        "GPUs after a slow first propagation; results no longer bit-identical to SAM2's "
                        "(docs/performance.md)")
