"""PT2E export: our quantized model as a ``torch.export`` program in the form torchao's ``convert_pt2e``
produces, so that PyTorch's own lowering turns it into int8 kernels.

Each step of :func:`lit_quant.deploy.graph.deploy_graph` becomes what ``convert_pt2e`` writes for it, with
*our* qparams and integers (calibrated ranges, GPTQ / AdaRound / bias-corrected weights, a plan's widths):

* every integer tensor is a ``quantized_decomposed.quantize_per_tensor`` / ``dequantize_per_tensor`` pair
  (``uint8`` for unsigned activations, ``int8`` for signed ones, the spec's ``[q_min, q_max]``);
* every weight is stored as its integers (an ``int8`` constant) read through ``dequantize_per_channel``
  (``dequantize_per_tensor`` for per-tensor weights), the bias on its accumulator grid as the fake-quant
  layer adds it (:meth:`lit_quant.quant.layers.QuantWeightLayer.deployed_bias`);
* between the pairs the float op runs (``conv2d``, ``linear``, ``relu``, ``add``, ...), as in the fake-quant
  model; a ReLU the layer or ``add`` absorbs follows it before the one pair; max pooling and reshapes keep
  their input's qparams, as ``convert_pt2e`` shares them;
* the logits layer without an output quantizer returns its float accumulator.

The program runs as is (:meth:`torch.export.ExportedProgram.module`: the reference, float arithmetic between
the pairs), and :func:`lower_x86` compiles it with Inductor, whose x86 quantization passes (torchao's) fuse each
``dequantize -> conv -> quantize`` pattern into an oneDNN int8 kernel. The file holds the program
alone (``torch.export.save``): loading and running it needs torch and torchao (which registers the
``quantized_decomposed`` ops), not lit-quant.

torchao is imported inside the functions: the package imports without it, and a call without it raises
:class:`ExportError` with the pip command.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

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
from lit_quant.io import atomic_write
from lit_quant.quant.functional import QParams, dequantize
from lit_quant.quant.optable import op_of
from lit_quant.quant.preparation import QuantizedModel

#: What ``pip install`` gets the PT2E runtime that pairs with this torch.
TORCHAO_PIP = "pip install torchao==0.18.0"


def check_pt2e_runtime() -> None:
    """Raise :class:`ExportError` with the pip command when torchao is not installed (checked before any work:
    it is found without importing it)."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        raise ExportError(f"--export pt2e needs torchao: {TORCHAO_PIP}")


def _quantized_decomposed() -> Any:
    """``torch.ops.quantized_decomposed``, registered by importing torchao (:class:`ExportError` without it)."""
    try:
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)
    except ImportError:
        raise ExportError(f"the PT2E export needs torchao: {TORCHAO_PIP}") from None
    return torch.ops.quantized_decomposed


def _storage(qp: QParams, signed: bool = False) -> tuple[torch.dtype, int, int, int]:
    """How a tensor of ``qp`` is stored: ``(dtype, zero point, q_min, q_max)``, ``uint8`` / ``int8`` (16 bits:
    ``uint16`` / ``int16``). ``signed``: unsigned grids move to the signed type, the zero point and range
    shifted by ``2^(bits-1)``: the same real values, for runtimes that take signed activations only."""
    zero, lo, hi = int(qp.zero_point), int(qp.quant_min), int(qp.quant_max)
    if signed and not qp.signed:
        shift = 2 ** (8 if qp.bits <= 8 else 16) // 2
        zero, lo, hi = zero - shift, lo - shift, hi - shift
    is_signed = qp.signed or signed
    if qp.bits <= 8:
        return (torch.int8 if is_signed else torch.uint8), zero, lo, hi
    return (torch.int16 if is_signed else torch.uint16), zero, lo, hi


def pt2e_blockers(qmodel: QuantizedModel) -> list[str]:
    """Why ``qmodel`` has no PT2E form (empty: it has one): per-channel activations, weights wider than 8
    bits (any activation width and either weight scheme is a quantize / dequantize pair)."""
    return scheme_blockers(qmodel, "PT2E", eight_bit_activations=False, symmetric_weights=False)


@dataclass(frozen=True)
class _OnGrid:
    """A quantized value: its ``quantize`` node and qparams. Each reader gets a ``dequantize`` of its own
    (:meth:`_Graph.read`), as ``convert_pt2e`` duplicates them, so that a runtime can take each consumer's
    pattern on its own (XNNPACK's partitioner needs it)."""

    q: torch.fx.Node
    qp: QParams
    args: tuple[Any, ...]


class _Graph:
    """Builds the program's FX graph: constants as attributes of ``root``, values as graph nodes or
    :class:`_OnGrid`."""

    def __init__(self, qd: Any, signed: bool) -> None:
        self.qd = qd
        self.signed = signed
        self.root = nn.Module()
        self.graph = torch.fx.Graph()
        self._consts = 0

    def const(self, value: torch.Tensor, name: str) -> torch.fx.Node:
        attr = f"_c{self._consts}_{name.replace('.', '_')}"
        self._consts += 1
        self.root.register_buffer(attr, value.detach().clone())
        return self.graph.get_attr(attr)

    def fake_quant(self, x: Any, qp: QParams) -> _OnGrid:
        """``quantize(x)`` on ``qp``'s grid (its readers dequantize it: the pair ``convert_pt2e`` writes)."""
        dtype, zero, lo, hi = _storage(qp, self.signed)
        args = (float(qp.scale), zero, lo, hi, dtype)
        return _OnGrid(self.graph.call_function(self.qd.quantize_per_tensor.default, (self.read(x), *args)), qp,
                       args)

    def read(self, value: Any) -> Any:
        """``value`` as its reader takes it: a fresh ``dequantize`` of a quantized value, else itself."""
        if isinstance(value, _OnGrid):
            return self.graph.call_function(self.qd.dequantize_per_tensor.default, (value.q, *value.args))
        return value

    def weight(self, layer: nn.Module, name: str) -> torch.fx.Node:
        """The layer's integer weight as an int8 constant, read through its dequantize op."""
        qw = layer_weight(layer)
        ints = self.const(qw.int_repr.to(torch.int8), f"{name}_weight")
        lo, hi = int(qw.quant_min), int(qw.quant_max)
        if qw.axis is None:
            return self.graph.call_function(self.qd.dequantize_per_tensor.default,
                                            (ints, float(qw.scale), int(qw.zero_point), lo, hi, torch.int8))
        scale = self.const(qw.scale.double().float(), f"{name}_scale")
        zero = self.const(qw.zero_point.long(), f"{name}_zero_point")
        return self.graph.call_function(self.qd.dequantize_per_channel.default,
                                        (ints, scale, zero, qw.axis, lo, hi, torch.int8))


def _layer(g: _Graph, step: Step, x: torch.fx.Node, float_weight: bool = False) -> torch.fx.Node:
    """The layer's convolution or product on ``x``; ``float_weight``: its integer weight dequantized ahead of
    time into a float constant (the same values) instead of read through a dequantize op."""
    mod = step.module
    w = g.const(dequantize(layer_weight(mod)).float(), f"{step.name}_weight") if float_weight else \
        g.weight(mod, step.name)
    bias = mod.deployed_bias()
    b = None if bias is None else g.const(bias.detach().float(), f"{step.name}_bias")
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise ExportError(f"{step.target}: padding_mode {mod.padding_mode!r} has no PT2E form; use zeros")
        return g.graph.call_function(F.conv2d, (x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups))
    return g.graph.call_function(F.linear, (x, w, b))


class _Reader(dict):
    """The values of the steps for :meth:`Step.call_args`: each quantized one read through a fresh dequantize."""

    def __init__(self, env: dict[str, Any], g: _Graph) -> None:
        super().__init__(env)
        self.g = g

    def __getitem__(self, name: str) -> Any:
        return self.g.read(super().__getitem__(name))


class _Program(nn.Module):
    """The steps as a module whose forward is the PT2E graph; :func:`torch.export.export` traces it."""

    def __init__(self, root: nn.Module, graph: torch.fx.Graph) -> None:
        super().__init__()
        self.graph_module = torch.fx.GraphModule(root, graph)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)


def export_pt2e(qmodel: QuantizedModel, example: torch.Tensor, signed: bool = False
                ) -> torch.export.ExportedProgram:
    """``qmodel`` as a ``torch.export`` program with ``convert_pt2e``'s quantize / dequantize ops and our
    qparams (module docstring); ``example`` is a batch of inputs (the batch dimension stays dynamic).

    ``signed`` is the form XNNPACK delegates whole (:func:`export_executorch`): every activation stored signed
    (:func:`_storage`), and the float logits layer (no output quantizer) with its weight dequantized ahead of
    time, a float product of the dequantized input, as XNNPACK has no int8 product with a float output.

    Raises:
        ExportError: torchao missing, :func:`pt2e_blockers`, or an op with no PT2E form (named).
    """
    qd = _quantized_decomposed()
    blockers = pt2e_blockers(qmodel)
    if blockers:
        raise ExportError(f"cannot export to PT2E: {summarize_blockers(blockers, 3)}")
    steps = deploy_graph(qmodel)
    readers = {s.name: [r for r in steps if s.name in r.inputs and r.kind != "shape"] for s in steps}
    g = _Graph(qd, signed)
    env: dict[str, Any] = {}
    for step in steps:
        if step.name in env:  # a ReLU computed with the layer or add before it
            continue
        reader = _Reader(env, g)  # a step's inputs, each quantized one read through its own dequantize

        def inputs() -> list[Any]:
            return [reader[name] for name in step.inputs]  # noqa: B023 - read at once, in this iteration

        if step.kind == "input":
            env[step.name] = g.fake_quant(g.graph.placeholder("x"), act_qparams(step, qmodel.input_quant))
        elif step.kind == "output":
            g.graph.output(inputs()[0])
        elif step.kind == "const":
            env[step.name] = g.const(step.value.float(), step.target)
        elif step.kind == "shape":
            call_args, call_kwargs = step.call_args(reader)
            env[step.name] = g.graph.create_node(step.node.op, step.node.target, call_args, call_kwargs)
        elif step.kind in ("layer", "add"):
            acc = _layer(g, step, inputs()[0], signed and float_output(step, steps)) if step.kind == "layer" else \
                g.graph.call_function(torch.ops.aten.add.Tensor, tuple(inputs()))
            if step.kind == "layer" and step.module.act_quant is not None:
                env[step.name] = g.fake_quant(acc, act_qparams(step))
            elif step.kind == "layer" and float_output(step, steps):
                env[step.name] = acc
            else:  # a ReLU reads the accumulator and requantizes it (conv + relu, add + relu: one op)
                relu = readers[step.name][0]
                low, high = op_of(relu.module.module).relu
                y = g.graph.call_function(torch.ops.aten.relu.default, (acc,)) if high is None else \
                    g.graph.call_function(torch.ops.aten.hardtanh.default, (acc, low, high))
                env[relu.name] = g.fake_quant(y, act_qparams(relu))
                env[step.name] = env[relu.name]
        elif step.kind == "requant":
            op = step.module.module
            args = inputs()
            out = act_qparams(step)
            if op_of(op).arity == "list":  # each input on the output grid first: exact (quantizing is
                args = [g.read(g.fake_quant(a, out)) for a in args]  # elementwise), the form runtimes concatenate
            attr = f"op_{step.name}"
            g.root.add_module(attr, op)
            y = g.graph.call_module(attr, tuple(args))
            env[step.name] = g.fake_quant(y, out)
        elif step.kind == "passthrough":
            source = env[step.inputs[0]]
            if step.module is not None:
                attr = f"op_{step.name}"
                g.root.add_module(attr, step.module)
                y = g.graph.call_module(attr, (reader[step.inputs[0]],))
            else:
                call_args, call_kwargs = step.call_args(reader)
                y = g.graph.create_node(step.node.op, step.node.target, call_args, call_kwargs)
            qp = source.qp if isinstance(source, _OnGrid) else None
            # max pooling keeps the grid: requantizing on it is exact, and lets the lowering fuse an int8 pool
            env[step.name] = g.fake_quant(y, qp) if qp is not None and isinstance(step.module, nn.MaxPool2d) else y
        else:
            raise ExportError(f"{step.target}: a {step.kind} step has no PT2E form")
    program = _Program(g.root, g.graph).eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(program, (example[:2] if len(example) > 1 else example.repeat(2, 1, 1, 1),),
                                   dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported in one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"torch.export cannot trace the PT2E program: {message}") from None


def save_pt2e(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Write ``program`` with ``torch.export.save`` (atomically); ``torch.export.load`` reads it back."""
    path = Path(path)
    atomic_write(path, lambda fh: torch.export.save(program, fh))
    return path


class _FrozenCompiled(nn.Module):
    """``torch.compile`` of a module, called with Inductor's freezing on: parameters become constants, which the
    weight-packing passes need (as an option of ``torch.compile`` itself, freezing does not reach them)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module)

    def train(self, mode: bool = True) -> _FrozenCompiled:
        """Only this wrapper's flag: an exported program has no training mode (its ``train()`` raises)."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def compile_x86(module: nn.Module) -> nn.Module:
    """A PT2E-form module (ours, or ``convert_pt2e``'s) compiled by Inductor for x86 CPUs, with freezing:
    torchao's x86 fusion passes (registered by importing its x86 quantizer module) turn each ``dequantize ->
    conv / linear -> quantize`` pattern into an oneDNN int8 kernel (``onednn.qconv_pointwise``,
    ``qlinear_pointwise``). Compiled on the first call of each input shape."""
    _quantized_decomposed()
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer  # noqa: F401  (registers the passes)

    return _FrozenCompiled(module)


def lower_x86(program: torch.export.ExportedProgram) -> nn.Module:
    """``program`` compiled to x86 int8 kernels (:func:`compile_x86`)."""
    return compile_x86(program.module())
