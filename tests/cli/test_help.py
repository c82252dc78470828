"""Every `fastdit` command says what it does, and every flag says what it sets and what it is by default."""
import argparse

import pytest

from fastdit.cli.commands import build_parser


def subcommands():
    parser = build_parser()
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return sorted(action.choices.items())


def undocumented(parser) -> list[str]:
    """The flags of ``parser`` without help, or with a default their help does not state."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = action.help or ""
        if not text.strip() or text == argparse.SUPPRESS:
            found.append(f"{name}: no help")
        # A flag (not a switch) whose value is not None by default must say so, as "default ..." or %(default)s.
        elif action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 \
                and "default" not in text and "%(default)" not in text:
            found.append(f"{name}: help does not state its default {action.default!r}")
    return found


@pytest.mark.parametrize("name, parser", subcommands(), ids=[name for name, _ in subcommands()])
def test_every_flag_has_help_and_its_default(name, parser):
    assert parser.description, f"fastdit {name} has no description"
    assert undocumented(parser) == []


def test_the_walk_finds_a_flag_without_help():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--out", default="x", help="where (default: x)")
    assert undocumented(parser) == ["--lr: no help", "--steps: help does not state its default 10"]
