"""Report rows, image-by-image pairs and the report files, without running a model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from lit_quant.app.pipeline.rows import ROW_KEYS, Report, Row, RowPair, paired_rows, plot_sweep, write_report


def test_row_to_dict_has_every_key_in_order() -> None:
    row = Row("ptq", backend="fake-quant", weight_bits=4, act_bits=4, top1=90.0)
    data = row.to_dict()
    assert tuple(data) == ROW_KEYS == ("variant", "source", "backend", "weight_bits", "act_bits", "observer", "top1",
                                       "top5", "fixed_vs_fp32", "broken_vs_fp32", "p_vs_fp32", "size_bytes",
                                       "latency_ms_bs1", "latency_ms_bs64", "calib_s", "note")
    assert data["top1"] == 90.0 and data["note"] is None
    assert Row.from_dict(data) == row


def test_pairs_fill_the_fp32_comparison_and_pair_ours_with_torch_ao() -> None:
    fp32 = torch.tensor([True, True, False, False])
    ours = torch.tensor([True, False, True, True])
    theirs = torch.tensor([True, True, False, False])
    report = Report()
    report.add(Row("fp32"), fp32)
    report.add(Row("ptq"), ours)
    report.add(Row("int8-export", note="not expressible"))  # not evaluated: no outcomes, no pair
    report.add(Row("builtin-ptq", backend="x86"), theirs)
    pairs = report.pairs()
    ptq = report.rows[1]
    assert (ptq.fixed_vs_fp32, ptq.broken_vs_fp32) == (2, 1)
    assert report.rows[2].fixed_vs_fp32 is None
    assert [(p.ours, p.theirs, p.ours_only, p.theirs_only) for p in pairs] == [
        ("ptq", "builtin-ptq (x86)", 2, 1)]


def test_a_sweep_has_no_single_ptq_row_to_pair() -> None:
    rows = [Row("fp32"), Row("ptq"), Row("ptq"), Row("builtin-ptq", backend="x86")]
    outcomes = {i: torch.tensor([True, False]) for i in range(4)}
    assert paired_rows(rows, outcomes) == []


def test_report_files(tmp_path: Path) -> None:
    rows = [Row("fp32", top1=99.0, act_bits=32).to_dict(), Row("ptq", top1=95.0, act_bits=8, observer="mse").to_dict(),
            Row("ptq", top1=80.0, act_bits=4, observer="mse").to_dict()]
    layers = [{"name": "fc", "op": "Linear", "weight_bits": 8, "act_bits": 8, "status": "quantized"}]
    pair = RowPair("ptq", "builtin-ptq (x86)", 3, 1, 0.625)
    write_report(rows, tmp_path, [pair], layers)
    assert json.loads((tmp_path / "report.json").read_text()) == {
        "rows": rows, "layers": layers, "pairs": [{"ours": "ptq", "theirs": "builtin-ptq (x86)", "ours_only": 3,
                                                   "theirs_only": 1, "p_value": 0.625}]}
    with (tmp_path / "report.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(ROW_KEYS) and [r["variant"] for r in table] == ["fp32", "ptq", "ptq"]
    plot_sweep(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
