"""The PT2E export: our qparams and integers in ``convert_pt2e``'s quantize / dequantize form, run as the
exported program, reloaded without lit-quant, and compiled by Inductor into oneDNN int8 kernels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_quant.deploy.graph import ExportError, agreement
from lit_quant.deploy.pt2e import check_pt2e_runtime, export_pt2e, lower_x86, save_pt2e
from lit_quant.quant import QuantizedModel, QuantPlan, calibrate, prepare
from lit_quant.quant.ops import Add

pytest.importorskip("torchao", reason="the PT2E export needs torchao (a requirement of lit-quant)")


pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """conv-bn-relu, a residual add + ReLU, ReLU6, max pooling, a cat, Hardswish, average pooling, float logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.add = Add()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.conv4 = nn.Conv2d(16, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(self.conv1(x)))
        a = torch.relu(self.add(self.conv2(a), a))
        a = self.pool(a)
        b = nn.functional.relu6(self.conv3(a))
        c = nn.functional.hardswish(self.conv4(torch.cat([a, b], 1)))
        return self.fc(nn.functional.adaptive_avg_pool2d(c, 1).flatten(1))


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def _quantized(plan: QuantPlan | None = None) -> QuantizedModel:
    torch.manual_seed(0)
    net = _Net().train()
    with torch.no_grad():
        net(_inputs(64, 9) * 2 + 0.5)  # BatchNorm statistics away from (0, 1): folding changes the weights
    qmodel = prepare(net.eval(), plan or QuantPlan.from_bits(8, 8))
    calibrate(qmodel, [_inputs(64, s) for s in range(2)])
    return qmodel.eval()


@pytest.mark.slow
def test_program_holds_our_integers_and_computes_what_fake_quant_computes(tmp_path: Path) -> None:
    qmodel = _quantized()
    program = export_pt2e(qmodel, _inputs(8, 3))
    ops = [str(n.target).split(".")[1] for n in program.graph.nodes
           if n.op == "call_function" and str(n.target).startswith("quantized_decomposed.")]
    assert ops.count("quantize_per_tensor") >= 6 and ops.count("dequantize_per_tensor") > ops.count(
        "quantize_per_tensor")  # a tensor read twice (the residual) is dequantized once per reader
    dequantized = [n for n in program.graph.nodes if str(n.target).endswith("dequantize_per_tensor.default")]
    assert all(len(n.users) == 1 for n in dequantized)  # as convert_pt2e leaves them, and XNNPACK needs
    assert ops.count("dequantize_per_channel") == 5  # every layer's int8 weight
    int8 = [v for v in program.state_dict.values() if v.dtype == torch.int8] + [
        v for v in program.constants.values() if isinstance(v, torch.Tensor) and v.dtype == torch.int8]
    assert len(int8) == 5
    x = _inputs(200, 4)
    with torch.no_grad():
        reference = program.module()(x)  # batch 200: the batch dimension stayed dynamic
    check = agreement(program.module(), qmodel, [x])
    assert check["disagree"] == 0 and check["max_logit_diff_share"] < 1e-5, check
    assert reference.shape == (200, 10)

    path = save_pt2e(program, tmp_path / "model.pt2")
    torch.save(x[:16], tmp_path / "x.pt")
    code = ("import sys, torch; sys.modules['lit_quant'] = None; import torchao; "  # no lit-quant in this process
            f"p = torch.export.load({str(path)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(p.module()(x), {str(tmp_path / 'y.pt')!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(torch.load(tmp_path / "y.pt"), reference[:16])


@pytest.mark.slow
def test_inductor_compiles_the_program_into_onednn_int8_kernels() -> None:
    from torch._inductor.utils import run_and_get_code

    qmodel = _quantized()
    compiled = lower_x86(export_pt2e(qmodel, _inputs(8, 3)))
    x = _inputs(64, 5)
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, x)
    kernels = set(re.findall(r"torch\.ops\.onednn\.(\w+)", "\n".join(codes)))
    assert "qconv_pointwise" in kernels or "qconv2d_pointwise" in kernels, kernels
    check = agreement(compiled, qmodel, [x])
    # oneDNN requantizes in its own rounding: rare one-step differences, no changed prediction here
    assert check["disagree"] <= 1 and check["max_logit_diff_share"] < 0.02, check


@pytest.mark.slow
@pytest.mark.parametrize(("plan", "match"), [
    (QuantPlan.from_bits(12, 8), "12-bit weights"),
])
def test_what_pt2e_cannot_hold_is_refused_in_one_line(plan: QuantPlan, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_pt2e(_quantized(plan), _inputs(8, 3))


def test_missing_torchao_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else object())
    with pytest.raises(ExportError, match=r"pip install torchao==0\.18\.0"):
        check_pt2e_runtime()
