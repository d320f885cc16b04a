"""Calibration statistics file (Distiller's ``--qe-stats-file``): save once, skip calibration next time.

The file records, per quantizer name, the clipping range its observer chose plus the spec it was chosen
for; loading sets qparams from those ranges through the same qparams function, so a second run gets
identical scales and zero points without seeing data. Format (YAML)::

    version: 1
    source: {model: resnet20, data: digits, weights: 3f2a...}   # optional: what was calibrated
    quantizers:
      model.layers.0.relu1.act_quant:
        {kind: act, observer: mse, bits: 8, scheme: asym_u, min: [0.0], max: [3.81], scale: [...], zero_point: [...]}

``scale`` / ``zero_point`` are for people reading the file; loading recomputes them from ``min`` / ``max``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lit_quant.quant.errors import QuantConfigError
from lit_quant.quant.fake_quant import iter_quantizers
from lit_quant.quant.yamlio import read_yaml

STATS_VERSION = 1
#: The largest float32: a range beyond it would load as infinity.
FLOAT32_MAX = 3.4028234663852886e38
_SPEC_KEYS = ("kind", "observer", "bits", "scheme")


def _entry(fq: Any) -> dict[str, Any]:
    lo, hi = fq.observer.calculate_range()
    fq.update_qparams()
    return {"kind": fq.kind, "observer": fq.spec.observer, "bits": fq.spec.bits, "scheme": fq.spec.scheme,
            "min": lo.tolist(), "max": hi.tolist(), "scale": fq.scale.tolist(), "zero_point": fq.zero_point.tolist()}


def dump_stats(model: nn.Module, include_weights: bool = False, source: Mapping[str, Any] | None = None) -> str:
    """The calibrated ranges of ``model``'s activation quantizers (and weights if asked) as stats-file YAML.

    ``source`` (plain values, e.g. model name, data set, a fingerprint of the float weights) is stored so
    that :func:`load_stats` can refuse the file for another model. Returns the text and writes nothing: the
    caller chooses how to write it (the pipeline writes atomically). Raises :class:`CalibrationError` if a
    quantizer saw no data.
    """
    kind = None if include_weights else "act"
    data: dict[str, Any] = {"version": STATS_VERSION}
    if source:
        data["source"] = dict(source)
    data["quantizers"] = {name: _entry(fq) for name, fq in iter_quantizers(model, kind)}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def _numbers(value: Any) -> bool:
    """A non-empty list of numbers finite in float32, the qparams' type (booleans are not numbers here)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and abs(v) <= FLOAT32_MAX
        for v in value)


def read_stats(path: str | Path) -> dict[str, Any]:
    """Read and check a stats file without a model: a version-1 mapping whose every quantizer entry has the
    spec keys (``kind``, ``observer`` strings, ``bits`` an integer, ``scheme``) and ``min`` / ``max`` lists
    of finite numbers of one length with ``min <= max``. Raises :class:`QuantConfigError` naming the file,
    the entry and the key, so a bad file fails before calibration or evaluation starts."""
    path = Path(path)
    data = read_yaml(path, "stats")
    if not isinstance(data, dict) or data.get("version") != STATS_VERSION or not isinstance(
            data.get("quantizers"), dict):
        raise QuantConfigError(f"{path} is not a version-{STATS_VERSION} lit-quant stats file")
    if not isinstance(data.get("source", {}), (dict, type(None))):
        raise QuantConfigError(f"stats file {path}: 'source' must be a mapping")
    for name, entry in data["quantizers"].items():
        where = f"stats file {path}: entry {name!r}"
        if not isinstance(entry, dict):
            raise QuantConfigError(f"{where} must be a mapping")
        missing = [k for k in (*_SPEC_KEYS, "min", "max") if k not in entry]
        if missing:
            raise QuantConfigError(f"{where} lacks {', '.join(missing)}")
        for key in ("kind", "observer", "scheme"):
            if not isinstance(entry[key], str):
                raise QuantConfigError(f"{where}: {key} must be a string, got {entry[key]!r}")
        if isinstance(entry["bits"], bool) or not isinstance(entry["bits"], int):
            raise QuantConfigError(f"{where}: bits must be an integer, got {entry['bits']!r}")
        for key in ("min", "max"):
            if not _numbers(entry[key]):
                raise QuantConfigError(f"{where}: {key} must be a list of numbers finite in float32, got "
                                       f"{_short(entry[key])}")
        if len(entry["min"]) != len(entry["max"]) or any(lo > hi for lo, hi in zip(entry["min"], entry["max"])):
            raise QuantConfigError(f"{where}: min and max must have one length and min <= max")
    acts = {name: entry for name, entry in data["quantizers"].items() if entry["kind"] == "act"}
    flat = [name for name, entry in acts.items() if entry["min"] == entry["max"]]
    if acts and ("input" in flat or len(flat) == len(acts)):
        which = "every activation range" if len(flat) == len(acts) else "the input range"
        raise QuantConfigError(f"stats file {path}: {which} has zero width (e.g. {flat[0]!r}: min = max = {acts[flat[0]]['min'][0]}), which no "
                               "calibration of a working model gives; delete the file to recalibrate")
    return data


def _short(value: Any) -> str:
    """``value`` for a message: at most 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_stats(model: nn.Module, path: str | Path, source: Mapping[str, Any] | None = None) -> int:
    """Set qparams of ``model``'s quantizers from a stats file; returns how many were set.

    Every activation quantizer of the model must be in the file (weight entries are optional), and each
    entry must name an existing quantizer with the same kind, observer, bits and scheme. With ``source``,
    a file that records a different value for one of its keys was calibrated on something else.

    Raises:
        QuantConfigError: unreadable file, another source, unknown or missing quantizer names, spec mismatch.
    """
    data = read_stats(path)
    recorded = data.get("source") or {}
    differ = [k for k, v in (source or {}).items() if k in recorded and recorded[k] != v]
    if differ:
        raise QuantConfigError(f"stats file {path} was calibrated on another model ("
                               + ", ".join(f"{k} {recorded[k]} != {source[k]}" for k in differ)  # type: ignore[index]
                               + "); delete it or pass another --stats-file")
    entries: dict[str, dict] = data["quantizers"]
    quantizers = dict(iter_quantizers(model))
    for name in entries:
        if name not in quantizers:
            close = difflib.get_close_matches(name, list(quantizers), n=3)
            raise QuantConfigError(f"stats file {path}: no quantizer {name!r} in the model"
                                   + (f"; did you mean {', '.join(close)}?" if close else ""))
    missing = [n for n, fq in quantizers.items() if fq.kind == "act" and n not in entries]
    if missing:
        raise QuantConfigError(f"stats file {path} lacks {len(missing)} activation quantizer(s): "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name, entry in entries.items():
        fq = quantizers[name]
        want = {"kind": fq.kind, "observer": fq.spec.observer, "bits": fq.spec.bits, "scheme": fq.spec.scheme}
        got = {k: entry.get(k) for k in _SPEC_KEYS}
        if got != want:
            raise QuantConfigError(f"stats file {path}: {name} was calibrated for {got}, the model wants {want}")
        fq.set_range(torch.tensor(entry["min"], dtype=torch.float32), torch.tensor(entry["max"], dtype=torch.float32))
    return len(entries)
