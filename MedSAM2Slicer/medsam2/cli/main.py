"""`medsam2` console script: argument parsing and dispatch only.

Each verb lives in its own module `medsam2.cli.<verb>` exposing `add_arguments(parser)` and
`run(args) -> int`; verbs import their heavy dependencies lazily so `medsam2 --help` is instant.
"""

import argparse
import sys
from importlib import import_module

from ..errors import MedSAM2Error

# verb -> (module, one-line help)
VERBS = {
    "segment": ("segment", "segment a volume from prompts and write a .seg.nrrd or label map"),
    "models": ("models", "list the model registry and what is cached"),
    "download": ("models", "download (and verify) a registry checkpoint into the cache"),
    "serve": ("serve", "run the remote GPU server"),
    "bench": ("bench", "benchmark against the official SAM2 predictor"),
    "one-prompt": ("one_prompt", "segment a set of 2D images from a few prompted ones"),
    "evaluate": ("evaluate", "simulate a user on labelled cases and report Dice / HD95"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="medsam2", description=__doc__.splitlines()[0])
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"medsam2 {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        p = sub.add_parser(verb, help=help_text, description=help_text)
        try:
            module = import_module(f".{module_name}", __package__)
        except ImportError as exc:  # a verb whose module is missing must not break the others
            p.set_defaults(_missing=str(exc))
            continue
        adder = getattr(module, f"add_{verb.replace('-', '_')}_arguments", None) or module.add_arguments
        runner = getattr(module, f"run_{verb.replace('-', '_')}", None) or module.run
        adder(p)
        p.set_defaults(_run=runner)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"medsam2 {args.verb}: not available ({args._missing})", file=sys.stderr)
        return 2
    try:
        return int(args._run(args) or 0)
    except MedSAM2Error as exc:
        print(f"medsam2 {args.verb}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medsam2 {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
