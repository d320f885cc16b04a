"""The ``--smoke`` and ``--json`` options every benchmark shares.

``--smoke`` swaps the benchmark's default sizes for tiny ones (sizes given on the command line still win): a
run that checks the benchmark works and prints sane figures, as ``tests/test_benchmarks.py`` does, and
measures nothing. ``--json PATH`` writes every printed figure to a file a test can read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def add_smoke_arguments(parser: argparse.ArgumentParser, sizes: dict[str, Any]) -> None:
    """Add ``--smoke`` (listing ``sizes``, the tiny values it sets) and ``--json PATH`` to ``parser``."""
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny sizes ({', '.join(f'{k}={v}' for k, v in sizes.items())}) unless given: "
                             "checks that the benchmark runs, measures nothing")
    parser.add_argument("--json", metavar="PATH", help="also write every printed figure to PATH as JSON")


def parse_with_smoke(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                     sizes: dict[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with ``--smoke`` parse again with ``sizes`` as the defaults, so that only the sizes not
    given on the command line become tiny."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**sizes)
        args = parser.parse_args(argv)
    return args
