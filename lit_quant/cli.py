"""Shared command-line plumbing: one-line argument errors, user errors as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from rich.console import Console

from lit_quant.errors import UserError

#: Exit status for bad input (argparse uses 2 as well).
EXIT_USAGE = 2

# Tables are wide; when output goes to a file or pipe rich would wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "lit-quant") -> int:
    """Run ``main(argv)``; a :class:`UserError` prints one line on stderr and returns :data:`EXIT_USAGE`."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
