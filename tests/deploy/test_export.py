"""``export_quantized``: one call from a quantized model (or a LightningModule holding one) to each target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pt2e import _inputs, _quantized
from torch import nn

from lit_quant import export_quantized
from lit_quant.deploy.graph import ExportError, agreement


@pytest.mark.slow
def test_each_target_from_a_module_holding_the_quantized_network(tmp_path: Path) -> None:
    holder = nn.Module()
    holder.net = _quantized().train()
    x = _inputs(32, 6)
    onnx = export_quantized(holder, "onnx", x[:4], tmp_path / "m.onnx")
    program = export_quantized(holder, "pt2e", x[:4], tmp_path / "m.pt2")
    int8 = export_quantized(holder, "int8", x[:4], backend="qnnpack")
    assert onnx.stat().st_size > 0 and program.stat().st_size > 0 and isinstance(int8, nn.Module)
    check = agreement(torch.export.load(program).module(), holder.net, [x])
    assert check["disagree"] == 0 and holder.net.training  # exported in eval mode, the mode left as it was


def test_bad_calls_are_one_line(tmp_path: Path) -> None:
    x = _inputs(4, 6)
    with pytest.raises(ExportError, match="unknown export target 'tflite'; choose from pt2e, executorch"):
        export_quantized(_quantized(), "tflite", x, tmp_path / "m")
    with pytest.raises(ExportError, match="holds no quantized network: run PTQCalibration or QATCallback"):
        export_quantized(nn.Sequential(nn.Linear(2, 2)), "onnx", x, tmp_path / "m.onnx")
    two = nn.Module()
    two.backbone, two.head = _quantized(), _quantized()
    with pytest.raises(ExportError, match=r"holds 2 quantized modules \(backbone, head\): export each one"):
        export_quantized(two, "onnx", x, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="writes a file: pass path="):
        export_quantized(_quantized(), "pt2e", x)
    assert not list(tmp_path.iterdir())
