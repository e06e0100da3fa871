"""docs/cli.md, generated from the argument parser itself, so the command-line reference is never out of date.

    .venv/bin/python -m nexus_export.cli_reference            # rewrite docs/cli.md
    .venv/bin/python -m nexus_export.cli_reference --check    # exit 1 if docs/cli.md differs (a test runs this)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

WIDTH = "118"  # argparse wraps help to $COLUMNS: fixed, so the page is the same on every terminal
PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

log = logging.getLogger(__name__)


def reference_markdown() -> str:
    """Every subcommand's help, as the parser prints it, under a heading of its own."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        from nexus_export.cli import _parser

        parser = _parser()
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in subparsers._choices_actions}
        lines = ["# Command-line reference", "",
                 "Generated from the argument parser by `python -m nexus_export.cli_reference` (a test fails when this "
                 "page is stale). Every subcommand ends with one line on stderr and exit code 2 on bad input, before "
                 "any work; see [methods](methods.md) for what the options do and [recipes](recipes.md) for the same "
                 "settings in YAML.", "", "```", parser.format_help().rstrip(), "```", ""]
        for name, sub in subparsers.choices.items():
            lines += [f"## nexus-export {name}", "", f"{helps.get(name, '').rstrip('.')}.", "", "```",
                      sub.format_help().rstrip(), "```", ""]
        return "\n".join(lines)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (argv if argv is not None else sys.argv[1:])
    text = reference_markdown()
    if check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current != text:
            log.error("%s is stale: run python -m nexus_export.cli_reference", PAGE)
            return 1
        return 0
    PAGE.write_text(text)
    log.info("wrote %s", PAGE)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
