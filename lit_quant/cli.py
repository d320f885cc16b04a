"""Shared command-line plumbing: one-line argument errors, user errors as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console

from lit_quant.errors import UserError
from lit_quant.io import describe_os_error
from lit_quant.quant.errors import QuantError

#: Exit status for bad input (argparse uses 2 as well).
EXIT_USAGE = 2

# Tables are wide; when output goes to a file or pipe rich would wrap them at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: ...``) instead of usage plus message, and no
    abbreviated flags: ``--epoch 3`` is an error, not a silent ``--epochs 3``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "lit-quant") -> int:
    """Run ``main(argv)``; a :class:`UserError` or the quantization core's :class:`QuantError` prints one
    line on stderr and returns :data:`EXIT_USAGE`."""
    try:
        return main(argv)
    except (UserError, QuantError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a write that failed midway (disk full, folder removed): one line, not a traceback
        print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
