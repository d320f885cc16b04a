"""Real int8 models from *our* qparams: torch.ao's quantized modules (fbgemm / x86 / qnnpack kernels) built
layer by layer from a calibrated or QAT-trained :class:`QuantizedModel`, no torch.ao observer involved.

Mapping of :func:`lit_quant.deploy.graph.deploy_graph` steps:

* input: ``quantize_per_tensor`` with the input quantizer's scale and zero point;
* layer: ``nnq.Conv2d`` / ``nnq.Linear`` (``nniq.ConvReLU2d`` / ``nniq.LinearReLU`` when the output is an
  accumulator a ReLU requantizes, then a clamp at 6 for a ReLU6), weights are *our* integers
  (:func:`layer_weight`) wrapped as a per-channel (axis 0) or per-tensor ``qint8`` tensor, output scale /
  zero point from our activation quantizer;
* add (+ ReLU): ``quantized::add`` / ``quantized::add_relu`` with our output qparams;
* the other ops with an output quantizer: the op table's ``quantized::`` kernel that takes our output
  qparams where it names one (mul, matmul, cat, softmax, hardswish, layer norm); otherwise (average pooling,
  mean, sigmoid, SiLU, tanh, ELU, Mish, GELU, hardsigmoid and a ReLU after a non-accumulator: no kernel
  takes any output qparams on every backend, qnnpack's sigmoid only writes scale 1/256) dequantize, float
  op, quantize with our qparams (one rounding, as the fake-quant model does);
* max pooling, reshapes, permutes, slices, splits: on the quantized tensor (values stay on the grid), and
  the shape arithmetic they read as in the float model;
* output: dequantize; a logits layer without an output quantizer runs as a float product of its dequantized
  int8 input and weights (:class:`_FloatOutputLayer`), the accumulator dequantized.

A float tensor the graph reads (a class token, a layer scale) has no int8 kernel to go into: such a model is
refused, naming the tensor.

What a real int8 backend cannot hold is reported by :func:`int8_blockers` (and the report row says so)
instead of being changed silently: activations of other than 8 bits (the kernels clamp to 0..255, not to the
spec's range), weights wider than 8 bits or with a zero point (asym), per-channel activations. Signed
8-bit activations (``sym`` / ``asym_s``) are the same grid as ``quint8`` with the zero point moved by 128,
and weights of fewer than 8 bits are a subset of ``qint8``: both are exported exactly.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.fx
from torch import nn

from lit_quant.deploy.engines import check_backend, quiet_torch_ao, use_engine
from lit_quant.deploy.graph import (
    ExportError,
    Step,
    act_qparams,
    deploy_graph,
    float_output,
    layer_weight,
    scheme_blockers,
    summarize_blockers,
)
from lit_quant.quant.fake_quant import iter_quantizers
from lit_quant.quant.functional import QParams, dequantize
from lit_quant.quant.optable import op_of
from lit_quant.quant.preparation import QuantizedModel

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

#: Backends whose kernels multiply u8 x s8 pairs into a saturating int16 on CPUs without VNNI (AVX2's
#: ``vpmaddubsw``); torch.ao's own qconfig for them observes activations with ``reduce_range`` (7 bits).
REDUCE_RANGE_BACKENDS = ("fbgemm", "x86")


def cpu_has_vnni() -> bool:
    """True when ``/proc/cpuinfo`` lists AVX-512 VNNI or AVX-VNNI (int8 dot products without int16 saturation)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def int8_blockers(qmodel: QuantizedModel) -> list[str]:
    """Why ``qmodel`` cannot be exported to int8 kernels exactly (empty list: it can): the kernels clamp to 8-bit
    activations and take symmetric ``qint8`` weights."""
    return scheme_blockers(qmodel, "torch.ao's int8 kernels")


def reduce_range_note(qmodel: QuantizedModel, backend: str) -> str | None:
    """The x86 ``reduce_range`` caveat, or None when it cannot bite.

    Without VNNI, fbgemm multiplies u8 activations by s8 weights with AVX2's ``vpmaddubsw``, which adds two
    products into a *saturating* int16: ``2 * 255 * max|q_w|`` must stay within 32767 to be exact, i.e.
    weights of at most 7 bits (``2 * 255 * 64 = 32640``). torch.ao avoids it with 7-bit activations
    (``reduce_range``); here the weights decide.
    """
    if backend not in REDUCE_RANGE_BACKENDS or cpu_has_vnni():
        return None
    act_width = max((fq.spec.quant_max - fq.spec.quant_min for _, fq in iter_quantizers(qmodel, "act")), default=0)
    w_max = max((max(-fq.spec.quant_min, fq.spec.quant_max) for _, fq in iter_quantizers(qmodel, "weight")), default=0)
    if 2 * act_width * w_max <= 32767:
        return None
    return (f"{backend} without VNNI (this CPU) adds u8 x s8 product pairs in saturating int16: 8-bit weights can "
            "saturate (torch.ao uses 7-bit activations, reduce_range); --weight-bits 7 or --backend qnnpack is exact")


def _quint8(qp: QParams) -> tuple[float, int]:
    """Scale and zero point of ``qp`` on the ``quint8`` grid (signed 8-bit: zero point + 128, same values)."""
    shift = 128 if qp.signed else 0
    return float(qp.scale), int(qp.zero_point) + shift


def _weight(layer: nn.Module) -> torch.Tensor:
    qw = layer_weight(layer)
    ints = qw.int_repr.to(torch.int8)
    if qw.axis is None:
        return torch._make_per_tensor_quantized_tensor(ints, float(qw.scale), 0)
    return torch._make_per_channel_quantized_tensor(ints, qw.scale.double(), qw.zero_point.long(), qw.axis)


def _quantized_layer(step: Step, out: QParams, relu: bool) -> nn.Module:
    mod = step.module
    scale, zp = _quint8(out)
    bias = mod.deployed_bias()  # the int32-grid bias the fake-quant layer adds
    bias = None if bias is None else bias.detach().float()
    if isinstance(mod, nn.Conv2d):
        cls = nniq.ConvReLU2d if relu else nnq.Conv2d
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                  mod.groups, bias is not None, mod.padding_mode)
    else:
        cls = nniq.LinearReLU if relu else nnq.Linear
        new = cls(mod.in_features, mod.out_features, bias_=bias is not None)
    new.set_weight_bias(_weight(mod), bias)
    new.scale, new.zero_point = scale, zp
    return new


class _FloatOutputLayer(nn.Module):
    """The logits layer without an output quantizer: its int8 input and weights, dequantized, in a float
    convolution or matrix product, plus the accumulator-grid bias (what the fake-quant layer computes, the
    integer accumulator times ``s_x s_w`` up to float rounding). int8 kernels have no float output; the
    layer is the classifier's last and smallest."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer.to_float()
        self.weight = dequantize(layer_weight(layer)).detach()
        bias = layer.deployed_bias()
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.dequantize()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _Requant(nn.Module):
    """``quantize(op(dequantize(x), ...))`` with our output qparams (one rounding, as fake quantization)."""

    def __init__(self, op: nn.Module, qp: QParams) -> None:
        super().__init__()
        self.op = op
        self.scale, self.zero_point = _quint8(qp)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        y = self.op(*(x.dequantize() for x in xs))
        return torch.quantize_per_tensor(y, self.scale, self.zero_point, torch.quint8)


class _QKernel(nn.Module):
    """One of torch's ``quantized::`` kernels that take the output scale and zero point: ``kernel(*x, *extra,
    scale, zero_point)`` (``quantized::cat`` takes its inputs as one list)."""

    def __init__(self, kernel: Any, qp: QParams, extra: tuple[Any, ...] = (), as_list: bool = False) -> None:
        super().__init__()
        self.kernel, self.extra, self.as_list = kernel, extra, as_list
        self.scale, self.zero_point = _quint8(qp)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        inputs = (list(xs),) if self.as_list else xs
        return self.kernel(*inputs, *self.extra, self.scale, self.zero_point)


def _requant_op(module: nn.Module, qp: QParams) -> nn.Module:
    """The int8 op for a requant step: the op table's ``quantized::`` kernel where torch has one, else
    :class:`_Requant`."""
    op = op_of(module)
    if op is None or op.int8_kernel is None:
        return _Requant(module, qp)
    return _QKernel(getattr(torch.ops.quantized, op.int8_kernel), qp, op.int8_args(module), as_list=op.arity == "list")


class _ClampHigh(nn.Module):
    """``clamp(q, 0, high)`` on the quantized tensor: with the ReLU's own qparams, ``round(clamp(a, 0, h) / s) + z``
    equals ``clamp(round(a / s) + z, q(0), q(h))`` because rounding is monotone, so the fused op stays exact.

    qnnpack's quantized clamp (and hardtanh, relu6) reads a channels-last tensor, the layout its convolutions
    return, as if it were contiguous and scrambles it; there the tensor is made contiguous first.
    """

    def __init__(self, high: float, contiguous: bool = False) -> None:
        super().__init__()
        self.high = high
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x.contiguous() if self.contiguous else x, 0.0, self.high)


def _clamp_high(op: nn.Module, relu: Step, backend: str) -> nn.Module:
    """``op`` (a fused op + ReLU), followed by a clamp at the ReLU's upper bound when it has one (ReLU6)."""
    bounds = op_of(relu.module.module).relu
    if bounds is None or bounds[1] is None:
        return op
    return nn.Sequential(op, _ClampHigh(bounds[1], contiguous=backend == "qnnpack"))


class Int8Model(nn.Module):
    """The exported model: float in, float logits out, torch.ao quantized kernels in between.

    The steps are compiled into a torch.fx ``GraphModule`` (generated Python code, one line per op, as
    torch.ao's own converted models are), so running it costs no per-step interpretation.

    Attributes:
        backend: quantized engine the weights were packed for (set around every forward).
        graph_module: the compiled steps.
    """

    def __init__(self, steps: list[Step], ops: dict[str, nn.Module], input_qparams: QParams, backend: str) -> None:
        super().__init__()
        float_steps = {s.name for s in steps if float_output(s, steps)}
        scale, zero_point = _quint8(input_qparams)
        root = nn.Module()
        graph = torch.fx.Graph()
        env: dict[str, torch.fx.Node] = {}
        for step in steps:
            args = tuple(env[name] for name in step.inputs)
            if step.kind == "input":
                x = graph.placeholder("x")
                env[step.name] = graph.call_function(torch.quantize_per_tensor, (x, scale, zero_point, torch.quint8))
            elif step.kind == "output":
                graph.output(args[0] if step.inputs[0] in float_steps else graph.call_method("dequantize", (args[0],)))
            elif step.name in ops:
                root.add_module(step.name, ops[step.name])
                env[step.name] = graph.call_module(step.name, args)
            elif step.node is not None:  # a reshape or the shape arithmetic it reads, as in the float model
                call_args, call_kwargs = step.call_args(env)
                env[step.name] = graph.create_node(step.node.op, step.node.target, call_args, call_kwargs)
            else:  # a ReLU already applied by the fused op before it
                env[step.name] = args[0]
        self.graph_module = torch.fx.GraphModule(root, graph)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with use_engine(self.backend):
            return self.graph_module(x.float())


def export_int8(qmodel: QuantizedModel, backend: str = "x86") -> Int8Model:
    """A real int8 model of ``qmodel`` for ``backend`` with our qparams (see the module docstring).

    Raises:
        ExportError: :func:`int8_blockers` found something the kernels cannot hold, or an unknown backend.
    """
    check_backend(backend)
    blockers = int8_blockers(qmodel)
    if blockers:
        raise ExportError(f"cannot export to int8 kernels: {summarize_blockers(blockers, 3)}: use 8-bit "
                          "activations and symmetric weights of at most 8 bits")
    steps = deploy_graph(qmodel)
    consts = [s.target for s in steps if s.kind == "const"]
    if consts:
        raise ExportError(f"cannot export to int8 kernels: the graph reads float tensor {consts[0]}"
                          + (f" (+{len(consts) - 1} more)" if len(consts) > 1 else "")
                          + ", which no int8 kernel takes; export to ONNX instead")
    readers = {s.name: [r for r in steps if s.name in r.inputs] for s in steps}
    ops: dict[str, nn.Module] = {}
    fused: set[str] = set()  # ReLU steps computed by the op before them
    with quiet_torch_ao(), use_engine(backend):
        for step in steps:
            if step.kind == "layer":
                if float_output(step, steps):
                    ops[step.name] = _FloatOutputLayer(step.module)
                elif step.module.act_quant is not None:
                    ops[step.name] = _quantized_layer(step, act_qparams(step), relu=False)
                else:
                    relu = readers[step.name][0]
                    ops[step.name] = _clamp_high(_quantized_layer(step, act_qparams(relu), relu=True), relu, backend)
                    fused.add(relu.name)
            elif step.kind == "add":
                relu = readers[step.name][0]
                ops[step.name] = _clamp_high(_QKernel(torch.ops.quantized.add_relu, act_qparams(relu)), relu, backend)
                fused.add(relu.name)
            elif step.kind == "requant" and step.name not in fused:
                ops[step.name] = _requant_op(step.module.module, act_qparams(step))
            elif step.kind == "passthrough" and step.module is not None:
                ops[step.name] = step.module
    return Int8Model(steps, ops, act_qparams(steps[0], qmodel.input_quant), backend).eval()
