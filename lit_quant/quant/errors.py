"""Errors of the quantization core: one base, :class:`QuantError`, that a caller catches to report bad
quantization input (a spec, a plan, a stats file, calibration data) as one line instead of a traceback.

The core knows nothing of the command line; ``lit_quant.app.cli.run_cli`` maps :class:`QuantError` to the
same one-line message and exit status as its own ``UserError``.
"""

from __future__ import annotations


class QuantError(Exception):
    """Base of every error the quantization core raises on purpose."""


class QuantConfigError(QuantError, ValueError):
    """Invalid quantization configuration (spec, plan, stats file)."""


class CalibrationError(QuantError, RuntimeError):
    """Bad calibration data or state: NaN/Inf observed, qparams asked for before any data, empty calibration."""


class NonFiniteError(CalibrationError):
    """A quantizer saw NaN or infinite values: the model computing them is broken (an overflow, a diverged
    training step), not the quantizer."""
