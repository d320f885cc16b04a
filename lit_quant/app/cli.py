"""Shared command-line plumbing: one-line argument errors, user errors as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rich.console import Console

from lit_quant.errors import LitQuantWarning, UserError
from lit_quant.io import describe_os_error

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
        self.add_argument(VERBOSE, action="store_true", default=argparse.SUPPRESS,
                          help="also show the messages of the libraries underneath (Lightning's start-up lines, "
                               "known deprecation warnings); by default only lit-quant speaks")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A value outside a flag's ``choices``: a :class:`UserError` ``invalid --flag 'value'; choose from a, b``
        (the wording of :func:`lit_quant.app.config.check_choices`, so a flag and a YAML key are refused alike,
        and :func:`run_cli` prints it as one line with exit status 2)."""
        if action.choices is not None and value not in action.choices:
            flag = action.option_strings[-1] if action.option_strings else action.dest
            raise UserError(f"invalid {flag} '{value}'; choose from {', '.join(map(str, action.choices))}")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


#: The flag that lets the libraries underneath speak (:func:`quiet_libraries`).
VERBOSE = "--verbose"
#: Warnings of the libraries underneath that say nothing to a user of lit-quant (deprecations inside them,
#: advice about settings lit-quant chooses), by message.
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning's use of torch's pytree
    r"The number of training batches .* is smaller than the logging interval",
    r"The '.*dataloader' does not have many workers",
    r"Checkpoint directory .* exists and is not empty",
    r"The dirpath has changed from",  # a resumed run folder that was moved or copied: the new place is used
    r"Encountered `nan` values in tensor",  # torchmetrics, before a non-finite loss stops the run in one line
)


def quiet_libraries() -> None:
    """Leave the terminal to lit-quant: Lightning's informational start-up lines (accelerators found, tips,
    checkpoint restores) and the warnings of :data:`QUIET_WARNINGS` are not shown; everything else is."""
    # the loggers Lightning's rank_zero_info writes to: their package loggers are set to INFO on import
    for package in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(f"{package}.utilities.rank_zero").setLevel(logging.WARNING)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "lit-quant") -> int:
    """Run ``main(argv)``; a :class:`UserError` or the quantization core's :class:`QuantError` prints one
    line on stderr and returns :data:`EXIT_USAGE`. Unless ``--verbose`` is given, :func:`quiet_libraries`."""
    if VERBOSE not in (sys.argv[1:] if argv is None else argv):
        quiet_libraries()
    show = warnings.showwarning

    def show_ours(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, LitQuantWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:
            show(message, category, *args, **kwargs)

    warnings.showwarning = show_ours
    try:
        return main(argv)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        # Looked up, not imported: importing the core loads torch, which --help must not wait for; a
        # QuantError can only come from a core that is loaded already.
        core_errors = sys.modules.get("lit_quant.quant.errors")
        if core_errors is not None and isinstance(exc, core_errors.QuantError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(exc, OSError):  # a write that failed midway (disk full, folder removed): one line
            print(f"{prog}: error: {describe_os_error(exc)}", file=sys.stderr)
            return EXIT_USAGE
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = show
