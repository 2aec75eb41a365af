"""The `medsam2` command: parses the verb's arguments and hands them to the verb's module.

Each verb lives in its own module `medsam2.cli.<verb>` exposing `add_arguments(parser)` and
`run(args) -> int`; verbs import their heavy dependencies lazily so `medsam2 --help` is instant.

Packages above the engine add verbs without the engine importing them (imports point down
only): an entry point in the group `medsam2.verbs` names a module with the same
`add_arguments`/`run` and a one-line `HELP` (the web front end registers `web` this way in
pyproject.toml).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module, metadata, util
from pathlib import Path

from ..errors import MedSAM2Error
from ..options import DEFAULT_MODEL

DESCRIPTION = """\
MedSAM2 from the command line: segment 3D medical images (CT, MR, NIfTI, NRRD, DICOM series) in
three dimensions from a few clicks or a box on one slice. SAM2 tracks the structure through the
slices with MedSAM-2's self-sorting memory bank; the result is a Slicer .seg.nrrd or a label map
on the input's exact geometry. The same engine runs inside 3D Slicer and as a remote GPU server."""

# verb -> (module, one line for the list of verbs, what the verb does for its own --help)
VERBS = {
    "segment": ("segment", "segment a volume from prompt files into a .seg.nrrd or label map",
                "Segment every object of the prompt files (points and boxes in our JSON, or Slicer markups) "
                "through the whole volume and write a Slicer .seg.nrrd or a label map on the image's geometry. "
                "Inputs are checked before the model loads."),
    "models": ("models", "list the registry's models and which are downloaded",
               "List the models medsam2 knows (SAM 2.1, MedSAM2, MedSAM-2 pretrain): input size, file size, "
               "where the checksum comes from, and whether the file is in the cache (--verify checks it)."),
    "download": ("models", "download a model's checkpoint into the cache, verified",
                 "Download a registry checkpoint into the cache (resumable; checked against its published "
                 "sha256, or pinned on first download). Later commands load it from the cache."),
    "serve": ("serve", "run the remote GPU server (Slicer and Python clients connect to it)",
              "Serve the engine over HTTP so that Slicer (and medsam2.connect in Python) on other machines "
              "segment on this machine's GPU. Loopback only unless a token is set (docs/remote.md)."),
    "bench": ("bench", "time and memory of this engine against the official SAM2 predictor",
              "Run the official SAM2 video predictor and this engine on the same chest CT, prompts and "
              "weights, each in its own process, and print a table of times, peak memory and whether the "
              "masks are identical (docs/performance.md)."),
    "one-prompt": ("one_prompt", "segment a folder of 2D images from a few prompted ones",
                   "Segment every image of a folder (PNG, JPEG, BMP, TIFF, single-frame DICOM; any sizes, no "
                   "order) from prompts on one or a few of them; writes a mask PNG per image and summary.csv."),
    "evaluate": ("evaluate", "score the engine on labelled cases with a simulated user (Dice, HD95)",
                 "Simulate a user on labelled cases (a box or click on each object's middle slice, then "
                 "correction clicks on the worst slices) and report Dice, HD95 and the number of interactions."),
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


def docs_location() -> str:
    """docs/cli.md of this checkout when the package runs from one, else where to find it."""
    page = Path(__file__).resolve().parents[3] / "docs" / "cli.md"
    return str(page) if page.is_file() else "docs/cli.md in the MedSAM2 for 3D Slicer sources"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="medsam2", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"""\
examples:
  medsam2 download {DEFAULT_MODEL}                 the recommended weights, once (or pass --checkpoint FILE)
  medsam2 segment CT.nrrd --prompts lungs.json --output lungs.seg.nrrd
  medsam2 serve --host 0.0.0.0 --token-file token.txt
  medsam2 web CT.nrrd                             segment in a web browser, on Slicer's slice views
  medsam2 segment CT.nrrd -p lungs.json -o out.seg.nrrd --random-weights   (offline try-out: meaningless masks)

`medsam2 VERB --help` lists a verb's arguments. Every verb and flag, with examples:
  {docs_location()}""")
    parser.add_argument("--version", action="version", version=f"medsam2 {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    for verb, (module_name, summary, description) in VERBS.items():
        p = sub.add_parser(verb, help=summary, description=description,
                           epilog=f"Documentation: {docs_location()}")
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
        p = sub.add_parser(verb, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           epilog=f"Documentation: {docs_location()}")
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def error_text(exc: MedSAM2Error) -> str:
    """The message a command-line user reads: CLI flags where the engine's message names Python arguments."""
    from ..models.checkpoints import CheckpointUnavailable

    return exc.for_cli() if isinstance(exc, CheckpointUnavailable) else str(exc)


def main(argv=None) -> int:
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
        print(f"medsam2 {args.verb}: error: {error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"medsam2 {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
