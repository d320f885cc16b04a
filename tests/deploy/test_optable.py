"""The op table end to end: an op added as one entry (Tanh, ELU, Mish, each as a module and as a function) is
traced, quantized, summarized and exported like the others, and each export computes what fake quantization
computes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.deploy.graph import ExportError, agreement, op_coverage_markdown
from lit_quant.deploy.int8 import export_int8
from lit_quant.deploy.integer import IntegerEngine
from lit_quant.deploy.onnx_export import OnnxModel, export_onnx
from lit_quant.quant import QuantizedModel, QuantPlan, calibrate, prepare
from lit_quant.quant.layers import QuantOutput
from lit_quant.quant.optable import FORMS, OPS, OUTPUT_TYPES, op_of
from lit_quant.quant.summary import summarize

ROOT = Path(__file__).resolve().parents[2]

#: op name -> (module, the same function written in forward, the ONNX ops its export must contain by opset)
NEW_OPS: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], dict[int, set[str]]]] = {
    "tanh": (nn.Tanh(), torch.tanh, {17: {"Tanh"}}),
    "elu": (nn.ELU(alpha=0.7), lambda x: F.elu(x, 0.5), {17: {"Elu"}}),
    "mish": (nn.Mish(), F.mish, {17: {"Softplus", "Tanh"}, 18: {"Mish"}}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    """conv -> the op's module -> conv -> the op's function -> mean -> linear."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.act, self.fn, _ = NEW_OPS[op]
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fn(self.conv2(self.act(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _quantized(op: str) -> tuple[nn.Module, QuantizedModel]:
    torch.manual_seed(0)
    net = _Net(op).eval()
    qmodel = prepare(net, QuantPlan.from_bits(8, 8, io_bits=8))
    calibrate(qmodel, [_inputs(64, seed) for seed in range(2)])
    return net, qmodel.eval()


@pytest.mark.parametrize("op", list(NEW_OPS))
def test_new_op_is_traced_quantized_and_summarized(op: str) -> None:
    net, qmodel = _quantized(op)
    module = type(NEW_OPS[op][0])
    wrapped = {name: m.module for name, m in qmodel.model.named_modules() if isinstance(m, QuantOutput)}
    assert isinstance(wrapped["act"], module) and isinstance(wrapped[op], module)  # module form, function form
    if op == "elu":
        assert wrapped["act"].alpha == 0.7 and wrapped["elu"].alpha == 0.5  # the call's argument, not a default
    rows = {r.name: r for r in summarize(qmodel)}
    assert rows[op].op == module.__name__ and rows[op].act_bits == 8 and rows[op].status == "quantized"
    x = _inputs(32, 5)
    with torch.no_grad():
        quantized = qmodel(x)
        assert (quantized - net(x)).abs().max() < 0.1 * net(x).abs().max()  # quantized, and close to float


@pytest.mark.slow
@pytest.mark.parametrize("op", list(NEW_OPS))
def test_new_op_exports_compute_what_fake_quant_computes(op: str, tmp_path: Path) -> None:
    _, qmodel = _quantized(op)
    x = [_inputs(128, 7)]
    for opset, expected in NEW_OPS[op][2].items():
        path = export_onnx(qmodel, tmp_path / f"{op}-{opset}.onnx", x[0][:2], opset=opset)
        assert expected <= {n.op_type for n in onnx.load(str(path)).graph.node}
        check = agreement(OnnxModel(path), qmodel, x)
        assert check["disagree"] <= 1 and check["max_logit_diff_steps"] <= 1 + 1e-3, (opset, check)
    check = agreement(export_int8(qmodel, "qnnpack"), qmodel, x)
    assert check["disagree"] <= 1 and check["max_logit_diff_steps"] <= 1 + 1e-3, check
    with pytest.raises(ExportError, match=f"no integer-only {type(NEW_OPS[op][0]).__name__}"):
        IntegerEngine(qmodel)


def test_every_form_maps_to_its_own_op_and_every_output_op_exports_somewhere() -> None:
    assert len({op.name for op in OPS}) == len(OPS) and len({op.module for op in OPS}) == len(OPS)
    for form, op in FORMS.items():
        assert form in op.forms
    for op in OPS:
        assert op_of(op.module.__new__(op.module)) is op
        if op.quantized:
            assert op.module in OUTPUT_TYPES and op.onnx is not None


def test_design_doc_op_table_is_generated_from_the_op_table() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    begin = text.index("<!-- op-table")
    block = text[text.index("\n", begin) + 1:text.index("<!-- /op-table -->")]
    assert block == op_coverage_markdown(), (
        "docs/design.md's op table is stale: replace it with "
        "python -c 'from lit_quant.deploy.graph import op_coverage_markdown; print(op_coverage_markdown())'")
