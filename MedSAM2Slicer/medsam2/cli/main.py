"""`medsam2` console script: argument parsing and dispatch only.

Each verb lives in its own module `medsam2.cli.<verb>` exposing `add_arguments(parser)` and
`run(args) -> int`; verbs import their heavy dependencies lazily so `medsam2 --help` is instant.

Packages above the engine add verbs without the engine importing them (imports point down
only): an entry point in the group `medsam2.verbs` names a module with the same
`add_arguments`/`run` and a one-line `HELP` (the web front end registers `web` this way in
pyproject.toml).
"""

import argparse
import sys
from importlib import import_module, metadata, util

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
PLUGIN_GROUP = "medsam2.verbs"
# A source checkout run with PYTHONPATH=MedSAM2Slicer (tests, Slicer's bundled copy) has no
# installed entry points of its own; these verbs are then found by module name, if importable.
SOURCE_TREE_PLUGINS = {"web": "MedSAM2Web.cli"}


def plugin_verbs():
    """{verb: module name} from the `medsam2.verbs` entry points, else the source tree's."""
    found = {ep.name: ep.value.partition(":")[0] for ep in metadata.entry_points(group=PLUGIN_GROUP)}
    for verb, module_name in SOURCE_TREE_PLUGINS.items():
        if verb not in found and util.find_spec(module_name.split(".")[0]) is not None:
            found[verb] = module_name
    return found


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
    for verb, module_name in plugin_verbs().items():
        if verb in VERBS:
            continue  # a plug-in never replaces a built-in verb
        try:
            module = import_module(module_name)
        except ImportError as exc:
            sub.add_parser(verb, help=f"(not available: {exc})").set_defaults(_missing=str(exc))
            continue
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
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
