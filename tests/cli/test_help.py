"""The help reads like a tool's: every command has a one-line purpose and examples, and every
example is a command line that the parser accepts."""

import argparse
import re
import shlex

import pytest

from zeropoint.cli import build_parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def help_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(argv)
    assert done.value.code == 0
    return capsys.readouterr().out


def example_lines(text: str, command: str | None) -> list[list[str]]:
    """The argv of each example line in the help (after 'zeropoint'), its trailing comment
    (two or more spaces, then words) cut off."""
    examples = []
    for line in text.splitlines():
        m = re.match(r"\s+zeropoint (\S.*)$", line)
        if m:
            argv = shlex.split(re.split(r"\s{2,}", m.group(1).strip())[0])
            if command is None or argv[0] == command:
                examples.append(argv)
    return examples


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_command_has_a_purpose_and_examples_that_parse(command, capsys):
    text = help_of(capsys, [command, "--help"])
    heading = re.search(r"\n(examples?):\n", text)
    assert heading, f"{command} --help has no examples section"
    examples = example_lines(text[heading.end():], command)
    assert examples, f"{command} --help shows no example line"
    for argv in examples:
        args = build_parser().parse_args(argv)  # exits (fails the test) on a bad example
        assert args.command == command
    # A one-line purpose in the command list, and a description on top of its own help.
    purpose = subcommands()[command].description
    assert purpose and purpose.split("\n")[0] in text


def test_program_help_lists_every_command_with_its_purpose(capsys):
    text = help_of(capsys, ["--help"])
    assert text.split("\n\n")[1].startswith("Quantize models")  # after usage: what it does
    for command in subcommands():
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), f"{command} has no purpose line"
    listed = {argv[0] for argv in example_lines(text, None)}
    assert listed == set(subcommands())
    for argv in example_lines(text, None):
        build_parser().parse_args(argv)
