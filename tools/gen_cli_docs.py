"""Write docs/cli.md, the full flag reference of train.py and quantize.py, from their argument parsers.

The parsers are built from the config dataclasses' field metadata (help text, allowed values, defaults), so
the reference is generated rather than written: ``tests/test_docs.py`` fails when docs/cli.md differs from
what this script renders.

Run:  python tools/gen_cli_docs.py            # rewrite docs/cli.md
      python tools/gen_cli_docs.py --check    # exit 1 when docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "cli.md"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    suffix = f" {metavar} [...]" if action.nargs in ("+", "*") else f" {metavar}"
    return names + f" `{suffix.strip()}`"


def render_parser(title: str, parser: argparse.ArgumentParser) -> str:
    """One Markdown section: the parser's description, a table of flag, allowed values and meaning, and the
    parser's epilog."""
    lines = [f"## {title}", "", _cell(parser.description or ""), "",
             "| flag | allowed values | meaning |", "|---|---|---|"]
    for action in parser._actions:  # argparse keeps no public list of its actions
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        lines.append(f"| {_flags(action)} | {choices} | {_cell(action.help or '')} |")
    if parser.epilog:  # notes after the flags (quantize.py: the QAT recipe of each width), kept as written
        lines += ["", "```text", parser.epilog, "```"]
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole of docs/cli.md."""
    sys.path.insert(0, str(ROOT))
    import quantize
    import train

    header = ("# Command-line reference\n\n"
              "Every flag of `train.py` and `quantize.py`, generated from the scripts' own argument parsers by "
              "`python tools/gen_cli_docs.py` (a test checks that this file is current). Flags override "
              "`--config` YAML values, which override the defaults shown.\n\n")
    return header + render_parser("train.py", train.build_parser()) + "\n" + \
        render_parser("quantize.py", quantize.build_parser())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/cli.md from the scripts' argument parsers.")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/cli.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python tools/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
