"""ONNX QDQ export: the onnxruntime model computes what the fake-quantized PyTorch model computes.

Agreement asserted here was measured first (random-init models, random inputs, seeds 0-3, this file's
calibration and test data; onnxruntime with its QDQ fusions off, the ``run_onnx`` default):

* 4-bit weights and activations (ResNet-20, LeNet-5): identical logits;
* 8 bits: LeNet-5 differs in <= 0.12 % of logits, by one output step; ResNet-20 in 1.6-2.2 % of logits, by
  at most 2-4 output steps; no argmax changed. The cause, layer by layer: ONNX's ``QuantizeLinear`` divides
  ``x / s`` where PyTorch multiplies by ``1 / s``, and the runtimes accumulate convolutions in different
  orders, so a value within an ulp of a rounding tie lands one step apart (under 0.01 % of the values in
  the first blocks); such flips compound through the residual blocks.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from lit_quant.app.models import build_model
from lit_quant.deploy.graph import ExportError, act_qparams, agreement, deploy_graph
from lit_quant.deploy.onnx_export import MIN_OPSET, OnnxModel, export_onnx, run_onnx
from lit_quant.quant import QuantizedModel, QuantPlan, calibrate, prepare

N_TEST = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def _float_model(name: str, size: int, seed: int = 0) -> nn.Module:
    """``name`` with 1 input channel and 10 classes; BatchNorm statistics moved away from (0, 1) by a few
    train-mode passes, so folding changes the weights and biases."""
    torch.manual_seed(seed)
    model = build_model(name, 1, 10).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, size, size) * 2 + 0.5)
    return model.eval()


def _quantize(model: nn.Module, plan: QuantPlan, size: int, seed: int = 0) -> QuantizedModel:
    g = torch.Generator().manual_seed(seed + 100)
    qmodel = prepare(model, plan)
    calibrate(qmodel, [torch.randn(32, 1, size, size, generator=g) for _ in range(4)])
    return qmodel.eval()


def _inputs(size: int, n: int = N_TEST, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _compare(qmodel: QuantizedModel, path: Path, x: torch.Tensor, **run_kwargs: bool
             ) -> tuple[float, float, float]:
    """(fraction of equal argmaxes, max |logit difference| in output steps, fraction of differing logits)."""
    with torch.no_grad():
        ref = qmodel(x)
    out = run_onnx(path, x, **run_kwargs)
    assert out.shape == ref.shape and out.dtype == torch.float32
    steps = deploy_graph(qmodel)
    producer = next(s for s in steps if s.name == steps[-1].inputs[0])
    scale = float(act_qparams(producer).scale)  # the last layer's output step
    diff = (out - ref).abs()
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    return agree, diff.max().item() / scale, (diff > 1e-3 * scale).float().mean().item()


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return _float_model("resnet20", 8)


@pytest.fixture(scope="module")
def resnet_q8(resnet: nn.Module) -> QuantizedModel:
    return _quantize(resnet, QuantPlan.from_bits(8, 8, io_bits=8), 8)


def test_resnet20_8bit_qdq_structure_and_agreement(resnet_q8: QuantizedModel, tmp_path: Path) -> None:
    path = export_onnx(resnet_q8, tmp_path / "r20.onnx", _inputs(8, 2))
    assert path == tmp_path / "r20.onnx" and path.is_file()
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 20 and ops.count("DequantizeLinear") >= 40
    assert ops.count("Conv") == 21 and ops.count("Gemm") == 1 and "GlobalAveragePool" in ops
    assert "Clip" not in ops  # 8-bit asym_u activations fill uint8: QuantizeLinear's saturation is the clamp
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # integer weights with one scale per output channel
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    per_channel = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" and a.i == 0 for a in n.attribute)]
    assert len(per_channel) == 22
    for node in per_channel:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.dtype.name == "int8" and scale.shape == (weight.shape[0],)
    activation_scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(s.shape == () for s in activation_scales)  # per-tensor: scalars, as QLinear* kernels require

    agree, max_steps, differing = _compare(resnet_q8, path, _inputs(8))
    assert agree >= 0.99  # measured 1.0 (256 / 256)
    # measured 4 steps (seeds 0-3: 2-4): rounding-tie flips compound over 20 layers; the margin is for other
    # CPUs, whose kernels accumulate in other orders
    assert max_steps <= 6 + 1e-3
    assert differing <= 0.05  # measured 1.6 % of logits


def test_default_float_logits_end_in_the_last_gemm(resnet: nn.Module, tmp_path: Path) -> None:
    """The default plan's float logits: the graph ends in the last layer's Gemm (no QuantizeLinear after it),
    and onnxruntime computes the fake-quant model's predictions."""
    qmodel = _quantize(resnet, QuantPlan.from_bits(8, 8), 8)
    path = export_onnx(qmodel, tmp_path / "r20_float_logits.onnx", _inputs(8, 2))
    model = onnx.load(str(path))
    producer = next(n for n in model.graph.node if "logits" in n.output)
    assert producer.op_type == "Gemm"
    check = agreement(OnnxModel(path), qmodel, [_inputs(8)])
    assert check["max_logit_diff_steps"] is None
    assert check["disagree"] <= 0.01 * check["images"], check
    # measured 1.4 % of the logits' range: the one-step rounding ties of 20 layers, as in the 8-bit test above
    assert check["max_logit_diff_share"] <= 0.03, check


def test_resnet20_4bit_clip_path_is_exact(resnet: nn.Module, tmp_path: Path) -> None:
    qmodel = _quantize(resnet, QuantPlan.from_bits(4, 4, io_bits=4), 8)
    path = export_onnx(qmodel, tmp_path / "r20_4.onnx", _inputs(8, 2))
    model = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert len(clips) == sum(n.op_type == "QuantizeLinear" for n in model.graph.node)  # [0, 15] inside uint8
    input_clip = next(n for n in clips if n.input[0] == "input")
    qp = qmodel.input_quant.qparams()
    hi = (qp.quant_max - qp.zero_point.float()) * qp.scale
    assert float(inits[input_clip.input[2]]) == pytest.approx(float(hi), rel=1e-6)
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear"
               and inits.get(n.input[0]) is not None and inits[n.input[0]].dtype.name == "int8"]
    assert weights and all(w.min() >= -8 and w.max() <= 7 for w in weights)

    agree, max_steps, differing = _compare(qmodel, path, _inputs(8))
    assert agree >= 0.99  # measured 1.0
    assert max_steps <= 1 + 1e-3 and differing <= 0.01  # measured: identical logits (seeds 0-5)


def test_lenet5_maxpool_flatten_linear(tmp_path: Path) -> None:
    qmodel = _quantize(_float_model("lenet5", 32), QuantPlan.from_bits(8, 8, io_bits=8), 32)
    path = export_onnx(qmodel, tmp_path / "lenet.onnx", _inputs(32, 1))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MaxPool") == 2 and ops.count("Flatten") == 1 and ops.count("Gemm") == 3
    agree, max_steps, differing = _compare(qmodel, path, _inputs(32))
    assert agree >= 0.99  # measured 1.0
    assert max_steps <= 1 + 1e-3 and differing <= 0.01  # measured one step on 0.12 % of logits


def test_onnxruntime_integer_kernels_run(resnet_q8: QuantizedModel, tmp_path: Path) -> None:
    """``fuse_qdq=True``: onnxruntime turns the QDQ pairs into integer kernels (which need scalar per-tensor
    scales, hence this check) and rounds the biases to int32. The logits move by many steps on x86 CPUs
    without VNNI, where its u8 x s8 kernels saturate in int16 (measured here: 65 steps, 92.6 % argmax
    agreement; 7-bit weights: within 2 steps of the bias-rounded reference)."""
    import onnxruntime as ort

    path = export_onnx(resnet_q8, tmp_path / "r20.onnx", _inputs(8, 2))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused_ops = {n.op_type for n in onnx.load(str(tmp_path / "fused.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd"} <= fused_ops
    agree, _, _ = _compare(resnet_q8, path, _inputs(8), fuse_qdq=True)
    assert agree >= 0.8  # measured 0.926 (AVX2 without VNNI)


def test_export_has_no_side_effects_on_the_model(resnet_q8: QuantizedModel, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in resnet_q8.state_dict().items()}
    resnet_q8.train()
    try:
        export_onnx(resnet_q8, tmp_path / "r20.onnx", _inputs(8, 2) * 100)  # would move BN stats / observers
    finally:
        resnet_q8.eval()
    after = resnet_q8.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Shapes(nn.Module):
    """ReLU6, AvgPool2d, a Linear on a 3-D tensor and functional flatten / contiguous (8x8 inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding="same")
        self.act = nn.ReLU6()
        self.pool = nn.AvgPool2d(2)
        self.mix = nn.Linear(16, 8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv(x)))
        x = self.relu(self.mix(torch.flatten(x, 2)))
        return self.fc(x.contiguous().flatten(1))


def test_functional_reshapes_relu6_avgpool(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel = _quantize(_Shapes().eval(), QuantPlan.from_bits(8, 8, io_bits=8), 8)
    path = export_onnx(qmodel, tmp_path / "shapes.onnx", _inputs(8, 3))
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    for op in ("AveragePool", "Clip", "Reshape", "MatMul", "Flatten", "Gemm"):
        assert op in ops
    agree, max_steps, _ = _compare(qmodel, path, _inputs(8))
    assert agree >= 0.99 and max_steps <= 1 + 1e-3  # measured: identical logits


class _Moves(nn.Module):
    """A small network with every op kind the exporter maps besides Conv / Linear / ReLU: chunk, cat, SiLU,
    Hardswish, sigmoid, mul, flatten, transpose, a parameter expanded to the batch, LayerNorm, matmul, softmax,
    GELU, slicing, integer indexing and mean."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.conv(x))
        a, b = x.chunk(2, dim=1)
        x = torch.cat([nn.functional.hardswish(a), torch.sigmoid(b) * b], 1)
        t = x.flatten(2).transpose(1, 2)  # (N, H W, 8) tokens
        t = torch.cat([self.token.expand(x.shape[0], -1, -1), t], 1)
        t = self.proj(self.norm(t))
        attention = torch.softmax(torch.matmul(t, t.transpose(-2, -1)), dim=-1)
        t = nn.functional.gelu(torch.matmul(attention, t))
        return self.fc(t[:, 1:].mean(1) + t[:, 0])


def test_activations_attention_and_moves_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel = _quantize(_Moves().eval(), QuantPlan.from_bits(8, 8, io_bits=8), 6)
    path = export_onnx(qmodel, tmp_path / "moves.onnx", _inputs(6, 1))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Split", "Concat", "HardSwish", "Sigmoid", "Mul", "Transpose", "Expand", "LayerNormalization",
            "MatMul", "Softmax", "Erf", "Slice", "Gather", "ReduceMean"} <= ops
    agree, max_steps, _ = _compare(qmodel, path, _inputs(6))
    assert agree >= 0.99 and max_steps <= 1 + 1e-3
    with pytest.raises(ExportError, match="LayerNorm needs ONNX LayerNormalization, opset 17"):
        export_onnx(qmodel, tmp_path / "old.onnx", _inputs(6, 1), opset=16)


class _Unsupported(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 if mode == "pool" else 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        x = torch.flatten(self.pool(x), 1) if self.mode == "pool" else x.flip(1)[:, :, 0, 0]
        return self.fc(x)


@pytest.mark.parametrize(("mode", "match"), [("pool", "AdaptiveAvgPool2d"), ("flip", "flip")])
def test_unsupported_ops_raise(mode: str, match: str, tmp_path: Path) -> None:
    qmodel = _quantize(_Unsupported(mode).eval(), QuantPlan.from_bits(8, 8, io_bits=8), 8)
    with pytest.raises(ExportError, match=match):
        export_onnx(qmodel, tmp_path / "m.onnx", _inputs(8, 2))
    assert not list(tmp_path.iterdir())  # nothing (not even a temporary file) left behind


def test_16bit_activations_need_opset_21(resnet: nn.Module, tmp_path: Path) -> None:
    qmodel = _quantize(resnet, QuantPlan.from_bits(8, 16, io_bits=16), 8)
    with pytest.raises(ExportError, match="opset 21"):
        export_onnx(qmodel, tmp_path / "m.onnx", _inputs(8, 2))
    path = export_onnx(qmodel, tmp_path / "m.onnx", _inputs(8, 2), opset=21)
    agree, max_steps, _ = _compare(qmodel, path, _inputs(8, 64))
    # measured: 1.0 and 5 steps (seeds 0-3: 5-9) -- a 16-bit step is 1/257 of an 8-bit one, so float
    # rounding differences show as more steps
    assert agree >= 0.99 and max_steps <= 16


@pytest.mark.parametrize(("plan", "match"), [
    (QuantPlan.from_bits(8, 8, weight_scheme="asym_u"), "scheme sym"),
    (QuantPlan.from_bits(12, 8), "at most 8 weight bits"),
])
def test_weights_must_fit_int8(resnet: nn.Module, plan: QuantPlan, match: str, tmp_path: Path) -> None:
    qmodel = _quantize(resnet, plan, 8)
    with pytest.raises(ExportError, match=match):
        export_onnx(qmodel, tmp_path / "m.onnx", _inputs(8, 2))


def test_bad_opsets(resnet_q8: QuantizedModel, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=rf"opset 11 is too old.*opset {MIN_OPSET} or newer.*{MIN_OPSET}\.\."):
        export_onnx(resnet_q8, tmp_path / "m.onnx", _inputs(8, 2), opset=11)
    with pytest.raises(ExportError, match="newer than the installed onnx"):
        export_onnx(resnet_q8, tmp_path / "m.onnx", _inputs(8, 2), opset=onnx.defs.onnx_opset_version() + 1)
    assert not list(tmp_path.iterdir())


def test_missing_packages(resnet_q8: QuantizedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = export_onnx(resnet_q8, tmp_path / "m.onnx", _inputs(8, 2))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)
        with pytest.raises(ExportError, match="pip install onnxruntime"):
            run_onnx(path, _inputs(8, 2))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnx", None)
        with pytest.raises(ExportError, match="pip install onnx"):
            export_onnx(resnet_q8, tmp_path / "other.onnx", _inputs(8, 2))
    assert not (tmp_path / "other.onnx").exists()
    with pytest.raises(ExportError, match="no ONNX model"):
        run_onnx(tmp_path / "missing.onnx", _inputs(8, 2))


def test_module_imports_without_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    source = Path(__file__).resolve().parents[2] / "lit_quant" / "deploy" / "onnx_export.py"
    spec = importlib.util.spec_from_file_location("_onnx_export_without_onnx", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy: raises if onnx / onnxruntime are imported at import time
    assert callable(module.export_onnx)


def test_every_layer_float_raises(resnet: nn.Module, tmp_path: Path) -> None:
    qmodel = prepare(resnet, QuantPlan.from_bits(8, 8, skip=("*",)))
    with pytest.raises(ExportError, match="no quantizers"):
        export_onnx(qmodel, tmp_path / "m.onnx", _inputs(8, 2))
    assert not list(tmp_path.iterdir())
