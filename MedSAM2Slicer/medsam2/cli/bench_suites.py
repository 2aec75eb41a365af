"""`medsam2 bench --suite NAME`: one entry point for every benchmark the project has.

`engine` (the default) is the verb's own table: this engine against the official predictor. The
others are their own commands, each with its own flags (`--suite-args "..."`; `--suite-args=--help`
lists them):

  bank     medsam2.study.bank_study    what the self-sorting bank reads against SAM2's window
  batch    medsam2.study.batch_bench   cohorts: cases per minute in one process and on Ray
  module   MedSAM2Lib.bench            the Slicer module's logic under Slicer's GIL policy
  web      MedSAM2Web.bench            the web page, a click to its overlay

`module` and `web` live in the packages above the engine; like plug-in verbs they are found as
entry points (`medsam2.benches`), or by module name in a source checkout.
"""

from __future__ import annotations

import shlex
from importlib import import_module

from ..errors import InputError
from .main import plugins

ENGINE_SUITES = {"bank": "medsam2.study.bank_study", "batch": "medsam2.study.batch_bench"}
BENCH_GROUP = "medsam2.benches"
SOURCE_TREE_BENCHES = {"module": "MedSAM2Lib.bench", "web": "MedSAM2Web.bench"}
SUITES = ("engine", *ENGINE_SUITES, *SOURCE_TREE_BENCHES)


def suite_modules() -> dict:
    """{suite: module name} of every suite but `engine`, as installed here."""
    return {**plugins(BENCH_GROUP, SOURCE_TREE_BENCHES), **ENGINE_SUITES}


def run_suite(name: str, suite_args: str = "") -> int:
    """Run a suite's own command with `suite_args` (a shell-quoted string); its exit status."""
    modules = suite_modules()
    if name not in modules:
        raise InputError(f"the {name!r} bench is not installed here: it comes with "
                         f"{SOURCE_TREE_BENCHES.get(name, name)} (a checkout, or the package that ships it)")
    return int(import_module(modules[name]).main(shlex.split(suite_args or "")) or 0)
