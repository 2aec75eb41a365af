"""What `medsam2 --help` tells a user, that docs/cli.md documents every verb and flag the parser has,
and that the CLI takes its model choices from one place (medsam2/options.py)."""

import argparse
import ast
import re
from pathlib import Path

import pytest

from medsam2 import options

from medsam2.models import registry
from medsam2.cli import main as cli_main
from medsam2.cli.main import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "MedSAM2Slicer" / "medsam2"
DOCS = (ROOT / "docs" / "cli.md").read_text()


def _verb_parsers():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_top_level_help_says_what_the_tool_does_its_verbs_and_where_the_docs_are(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "argument parsing" not in text and "dispatch" not in text
    assert "segment 3D medical images" in text and "self-sorting memory bank" in text
    for verb, (_module, summary, _description) in VERBS.items():
        assert re.search(rf"^\s+{re.escape(verb)}\s", text, re.M), f"{verb} missing from the verb list"
        assert " ".join(summary.split()[:4]) in " ".join(text.split())
    assert str(ROOT / "docs" / "cli.md") in text  # run from a checkout: the page's own path
    assert "medsam2 segment CT.nrrd --prompts" in text  # an example to start from
    assert cli_main([]) == 2  # no verb: the same help, as a usage error


@pytest.mark.parametrize("verb", list(VERBS))
def test_each_verbs_help_says_what_it_does(capsys, verb):
    with pytest.raises(SystemExit):
        cli_main([verb, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(VERBS[verb][2].split()) in text
    assert f"Documentation: {ROOT / 'docs' / 'cli.md'}" in text


def _doc_section(verb):
    """The text of docs/cli.md under "## `medsam2 VERB`", up to the next "## " heading."""
    match = re.search(rf"^## `medsam2 {re.escape(verb)}`\n(.*?)(?=^## )", DOCS + "\n## end", re.M | re.S)
    assert match, f"docs/cli.md has no section for `medsam2 {verb}`"
    return match.group(1)


@pytest.mark.parametrize("verb", list(_verb_parsers()))  # the plug-in verbs (web) too
def test_docs_list_every_flag_and_choice_of_every_verb(verb):
    section = _doc_section(verb)
    for action in _verb_parsers()[verb]._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.metavar]
        for name in names:
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", section), \
                f"docs/cli.md, `medsam2 {verb}`: {name} is not documented"
        for choice in action.choices or ():
            assert str(choice) in section, f"docs/cli.md, `medsam2 {verb}`: {names[0]} choice {choice} is missing"
    # and nothing documented in the usage block that the parser does not have
    usage = re.search(r"```\n(medsam2 .*?)```", section, re.S).group(1)
    known = {s for a in _verb_parsers()[verb]._actions for s in a.option_strings}
    documented = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage))
    assert documented <= known, f"docs/cli.md, `medsam2 {verb}` usage names unknown flags {documented - known}"


NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                            "thirteen fourteen fifteen".split())}


def test_the_docs_verb_table_and_any_verb_count_are_what_the_cli_lists():
    verbs = set(_verb_parsers())
    assert "web" in verbs, "run with the web shell importable (MedSAM2Slicer on the path)"
    listed = set(re.findall(r"^\| \[`medsam2 ([\w-]+)`\]\(#", DOCS, re.M))
    assert listed == verbs, f"docs/cli.md's table lists {sorted(listed)}, the CLI {sorted(verbs)}"
    for word in re.findall(r"\b(\w+) verbs\b", DOCS):
        count = NUMBER_WORDS.get(word.lower(), int(word) if word.isdigit() else None)
        assert count is None or count == len(verbs), f"docs/cli.md says {word} verbs; the CLI has {len(verbs)}"
    assert "will come" not in DOCS


def test_model_arguments_take_the_engine_lists_from_options():
    for verb, parser in _verb_parsers().items():
        actions = {s: a for a in parser._actions for s in a.option_strings}
        if "--model" in actions:
            assert actions["--model"].default == options.DEFAULT_MODEL
        for flag, choices in (("--memory", options.MEMORY_MODES), ("--precision", options.PRECISIONS),
                              ("--axes", options.AXES)):
            if flag in actions:
                assert tuple(actions[flag].choices) == choices, f"{verb} {flag}"
    assert registry.DEFAULT_MODEL is options.DEFAULT_MODEL and options.DEFAULT_MODEL in registry.model_names()


@pytest.mark.parametrize("verb", ["segment", "one-prompt", "evaluate", "bench"])
def test_every_verb_takes_the_same_devices(verb, capsys):
    parser = _verb_parsers()[verb]
    device = next(a for a in parser._actions if "--device" in a.option_strings)
    for name in (*options.DEVICES, "cuda:1"):
        assert device.type(name) == name
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([verb, "--device", "gpu"])
    assert refused.value.code == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err


def _engine_files():
    return sorted(ENGINE.rglob("*.py"))


def test_the_default_model_and_the_choice_lists_are_written_once():
    lists = {frozenset(v) for v in (options.DEVICES, options.MEMORY_MODES, options.PRECISIONS, options.AXES)}
    found = []
    for path in _engine_files():
        rel = path.relative_to(ENGINE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and node.value == options.DEFAULT_MODEL:
                found.append((rel, "default model"))
            elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                if frozenset(e.value for e in node.elts) in lists:
                    found.append((rel, tuple(e.value for e in node.elts)))
    # options.py defines each once; the registry's table holds the model of that name
    assert sorted(found, key=repr) == sorted([
        ("options.py", "default model"), ("models/registry.py", "default model"), ("options.py", options.DEVICES),
        ("options.py", options.MEMORY_MODES), ("options.py", options.PRECISIONS), ("options.py", options.AXES)], key=repr)
