"""The report of a quantize run: one typed :class:`Row` per evaluated variant, the image-by-image pairs
(:func:`paired_rows`), the :class:`Report` rows are added to, and its writers (``report.json``,
``report.csv``, the sweep's ``accuracy_vs_bits.png``).

No Lightning here, and torch only for the per-image outcome tensors, so the report can be built and
written in tests without running a model.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lit_quant.io import atomic_write, atomic_write_text
from lit_quant.app.measure import paired_comparison
from lit_quant.quant.summary import summarize


@dataclass
class Row:
    """One line of the report. ``None``: not measured for this variant (a fake-quant row has no integer
    size; a row whose model could not be built has no accuracy)."""

    variant: str
    source: str | None = None  # the row a deployed variant was exported from
    backend: str | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    observer: str | None = None
    top1: float | None = None
    top5: float | None = None
    fixed_vs_fp32: int | None = None  # test images this row gets right and fp32 wrong
    broken_vs_fp32: int | None = None  # and the other way round
    p_vs_fp32: float | None = None  # exact McNemar test of the two
    size_bytes: int | None = None
    latency_ms_bs1: float | None = None
    latency_ms_bs64: float | None = None
    calib_s: float | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as ``report.json`` / ``report.csv`` hold it: every key of :data:`ROW_KEYS`, in that order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        """A row from :meth:`to_dict`'s form; ``KeyError`` / ``TypeError`` when a key is missing or unknown."""
        missing = [k for k in ROW_KEYS if k not in data]
        if missing:
            raise KeyError(f"report row without {', '.join(missing)}")
        return cls(**{k: data[k] for k in ROW_KEYS})


#: Keys every report row carries (``report.json`` ``{"rows": [...], "pairs": [...]}`` and ``report.csv``).
ROW_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Row))


@dataclass(frozen=True)
class RowPair:
    """Ours against torch.ao on the same test images: ``ours_only`` images only our row gets right,
    ``theirs_only`` only theirs, and the exact McNemar ``p_value`` of the difference
    (:func:`lit_quant.app.measure.paired_comparison`)."""

    ours: str
    theirs: str  # the torch.ao variant and its backend: "builtin-ptq (x86)"
    ours_only: int
    theirs_only: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def paired_rows(rows: list[Row], outcomes: dict[int, torch.Tensor]) -> list[RowPair]:
    """Image-by-image comparisons of the report: every row against fp32 (its ``fixed_vs_fp32`` /
    ``broken_vs_fp32`` / ``p_vs_fp32`` fields, filled in place) and each torch.ao row against ours.

    ``outcomes`` maps a row's index to its per-image top-1 outcomes (rows not evaluated have none). Ours
    against torch.ao: ``builtin-qat`` against ``qat``, each ``builtin-ptq`` against the PTQ row when there
    is exactly one. Returns those pairs.
    """
    fp32 = next((i for i, r in enumerate(rows) if r.variant == "fp32" and i in outcomes), None)
    for i, correct in outcomes.items():
        if fp32 is not None and i != fp32:
            cmp = paired_comparison(outcomes[fp32], correct)
            rows[i].fixed_vs_fp32, rows[i].broken_vs_fp32, rows[i].p_vs_fp32 = cmp.only_b, cmp.only_a, cmp.p_value

    by_variant: dict[str, list[int]] = {}
    for i in outcomes:
        by_variant.setdefault(rows[i].variant, []).append(i)
    pairs = []
    for ours, theirs in (("qat", "builtin-qat"), ("ptq", "builtin-ptq")):
        if len(by_variant.get(ours, [])) != 1:  # a sweep has several PTQ rows: no single one to pair
            continue
        i = by_variant[ours][0]
        for j in by_variant.get(theirs, []):
            cmp = paired_comparison(outcomes[i], outcomes[j])
            pairs.append(RowPair(ours, f"{theirs} ({rows[j].backend})", cmp.only_a, cmp.only_b, cmp.p_value))
    return pairs


@dataclass
class Report:
    """The rows of one run in order, with the per-image top-1 outcomes of those that were evaluated."""

    rows: list[Row] = field(default_factory=list)
    outcomes: dict[int, torch.Tensor] = field(default_factory=dict)  # row index -> per-image top-1 (bool)
    layers: list[dict[str, Any]] = field(default_factory=list)  # ops of our first quantized model (summarize)
    messages: list[str] = field(default_factory=list)  # what the script prints after the table (--explain, warnings)

    def describe(self, qmodel: Any) -> None:
        """Record what ``qmodel`` quantizes, op by op, unless a model was recorded already (the first of a run
        stands for the others: a sweep changes widths, not which ops are quantized)."""
        if not self.layers:
            self.layers = [op.to_dict() for op in summarize(qmodel)]

    def add(self, row: Row, correct: torch.Tensor | None = None) -> Row:
        """Append ``row`` (with its per-image outcomes when it was evaluated); returns it."""
        if correct is not None:
            self.outcomes[len(self.rows)] = correct
        self.rows.append(row)
        return row

    def pairs(self) -> list[RowPair]:
        """:func:`paired_rows` of the report (fills each row's comparison with fp32)."""
        return paired_rows(self.rows, self.outcomes)

    def dicts(self) -> list[dict[str, Any]]:
        """The rows in :meth:`Row.to_dict` form."""
        return [r.to_dict() for r in self.rows]


def write_report(rows: list[dict[str, Any]], folder: Path, pairs: list[RowPair] | None = None,
                 layers: list[dict[str, Any]] | None = None) -> None:
    """``report.json`` (``{"rows": [...], "pairs": [...], "layers": [...]}``, ``layers`` the quantized model's
    ops as :func:`lit_quant.quant.summary.summarize` lists them) and ``report.csv`` (the rows) in ``folder``,
    each written atomically."""
    data = {"rows": rows, "pairs": [p.to_dict() for p in pairs or []], "layers": layers or []}
    atomic_write_text(folder / "report.json", json.dumps(data, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_KEYS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "report.csv", buffer.getvalue())


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against bits, one line per observer, with the fp32 level and torch.ao's int8 point."""
    fig, ax = new_figure(figsize=(6, 4))
    for observer in sorted({r["observer"] for r in rows if r["variant"] == "ptq"}):
        points = sorted((r["act_bits"], r["top1"]) for r in rows if r["variant"] == "ptq" and r["observer"] == observer)
        ax.plot(*zip(*points), marker="o", label=f"ours ({observer})")
    for r in rows:
        if r["variant"] == "fp32":
            ax.axhline(r["top1"], color="grey", linestyle="--", label="fp32")
        elif r["variant"] == "builtin-ptq":
            ax.plot([8], [r["top1"]], marker="s", linestyle="", label=f"torch.ao {r['backend']} int8")
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def new_figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure to ``path`` as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))
