"""The dataflow of a prepared (calibrated or QAT-trained) model, as every exporter reads it.

:func:`deploy_graph` reads the graph ``prepare`` traced (``QuantizedModel.model`` is a ``torch.fx``
graph module) and classifies each node into one :class:`Step`. The three exporters (real torch.ao int8 modules, the
integer-only reference engine, ONNX QDQ) walk the same steps, so they agree on what is quantized where:

===============  ==========================================================================================
kind             meaning
===============  ==========================================================================================
``input``        the model input; quantized by ``QuantizedModel.input_quant``
``layer``        :class:`QuantConv2d` / :class:`QuantLinear` / :class:`QuantConvBn2d`; its output is
                 quantized by its own ``act_quant``, or (``act_quant is None``) it is an accumulator that
                 the single consumer (a ReLU) requantizes, or that is the model's output, dequantized to
                 float (the logits: :func:`float_output`)
``requant``      :class:`QuantOutput`: ``module`` (an op of :data:`lit_quant.quant.optable.OPS` whose output is
                 quantized: an activation, Add / Mul / MatMul / Cat, LayerNorm, softmax, mean, average
                 pooling) then its quantizer
``add``          a plain :class:`lit_quant.quant.ops.Add` whose sum a following ReLU requantizes (add + relu fused)
``passthrough``  max pooling, reshapes, permutes, slices, ``chunk`` / ``split``, ``expand``: integers stay on
                 the input's grid (identity and eval-mode dropout are removed, their readers rewired)
``shape``        a Python value computed from tensor shapes (``x.shape[0]``, ``x.size(1) // 2``, ``x.dim()``)
                 that a reshape reads; exporters evaluate it, no op computes it
``const``        a parameter or buffer the graph reads as a tensor (a class token, a position embedding)
``output``       the model output, dequantized
===============  ==========================================================================================

Function and method steps keep their call (:attr:`Step.node`) with the other steps' names in place of graph
nodes, so an exporter runs them on its own values with :meth:`Step.call`.

Anything else (a float layer left by ``--no-quant-layers``, an unfolded BatchNorm, an inline ``torch``
function) raises :class:`ExportError` naming the node and what to change.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from lit_quant.quant.errors import QuantError
from lit_quant.quant.fake_quant import FakeQuantize, iter_quantizers
from lit_quant.quant.functional import QParams, QuantizedTensor, quantize
from lit_quant.quant.graph import tensor_nodes
from lit_quant.quant.layers import QuantOutput, QuantWeightLayer
from lit_quant.quant.optable import (
    OPS,
    OUTPUT_TYPES,
    PASSTHROUGH_TYPES,
    RELU_ABSORBING_TYPES,
    RELU_TYPES,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
)
from lit_quant.quant.preparation import QuantizedModel


class ExportError(QuantError):
    """The model or plan cannot be exported to the requested target: the message says what to change."""


@dataclass
class Step:
    """One node of the deployed dataflow.

    Attributes:
        name: FX node name (unique).
        kind: see the module docstring.
        target: module path (``layers.0.conv1``) or function name.
        module: the module called (None for input / output / functions).
        inputs: names of the steps whose values this one reads, in argument order.
        node: for function / method steps, the graph node (its op and target); :meth:`call` runs it.
        value: for ``const`` steps, the tensor.
    """

    name: str
    kind: str
    target: str
    module: nn.Module | None = None
    inputs: list[str] = field(default_factory=list)
    node: torch.fx.Node | None = None
    value: torch.Tensor | None = None
    _call_args: Any = None  # (args, kwargs) of ``node`` with each graph node replaced by a _Ref to its step

    def call_args(self, env: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of this function / method step with the values in ``env`` (see :meth:`call`)."""
        return _fill(self._call_args, env)

    def call(self, env: dict[str, Any]) -> Any:
        """Run this function / method step on concrete values: ``env`` maps step names to values (tensors,
        tuples of tensors from ``chunk``, Python numbers from ``shape`` steps)."""
        args, kwargs = self.call_args(env)
        if self.node.op == "call_function":
            return self.node.target(*args, **kwargs)
        return getattr(args[0], self.node.target)(*args[1:], **kwargs)


@dataclass(frozen=True)
class _Ref:
    """A step's value inside a call's arguments."""

    name: str


def _fill(obj: Any, env: dict[str, Any]) -> Any:
    """``obj`` with every :class:`_Ref` replaced by its value in ``env`` (through tuples, lists, dicts and
    slices, as ``torch.fx`` nests arguments)."""
    if isinstance(obj, _Ref):
        return env[obj.name]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fill(o, env) for o in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, env) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(_fill(obj.start, env), _fill(obj.stop, env), _fill(obj.step, env))
    return obj


def _node_inputs(node: torch.fx.Node) -> list[str]:
    return [a.name for a in node.all_input_nodes]


def deploy_graph(qmodel: QuantizedModel) -> list[Step]:
    """The steps of ``qmodel`` in execution order (see the module docstring).

    Raises:
        ExportError: no quantizers at all, a float layer, or an op no exporter can express.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise ExportError(f"export needs a model prepared by lit_quant.quant.preparation, got {type(qmodel).__name__}")
    if not any(True for _ in iter_quantizers(qmodel)):
        raise ExportError("the model has no quantizers (every layer float): nothing to export; quantize at least "
                          "one layer (check --no-quant-layers / the plan)")
    if qmodel.input_quant is None:
        raise ExportError("export needs the model input quantized by our input quantizer: a model with its own "
                          "QuantStub is not exportable; remove the stub or set the plan's quantize_input: true")
    modules = dict(qmodel.model.named_modules())
    tensors = tensor_nodes(qmodel.model.graph)
    steps: list[Step] = []
    for node in qmodel.model.graph.nodes:
        inputs = _node_inputs(node)
        if node.op == "placeholder":
            steps.append(Step(node.name, "input", node.target))
        elif node.op == "output":
            steps.append(Step(node.name, "output", "output", inputs=inputs))
        elif node.op == "call_module":
            module = modules[str(node.target)]
            steps.append(Step(node.name, _module_kind(str(node.target), module), str(node.target), module, inputs))
        elif node.op == "get_attr":
            value = _attribute(qmodel.model, str(node.target))
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"cannot export node {node.name}: attribute {node.target} is not a tensor")
            steps.append(Step(node.name, "const", str(node.target), inputs=inputs, value=value.detach()))
        elif node not in tensors and node.op in ("call_function", "call_method"):
            steps.append(Step(node.name, "shape", _callee(node), inputs=inputs, node=node))
        elif _reshape_like(node):
            steps.append(Step(node.name, "passthrough", _callee(node), inputs=inputs, node=node))
        else:
            raise ExportError(f"cannot export node {node.name} ({node.op} {_callee(node)}): only modules "
                              f"({', '.join(t.__name__ for t in (*OUTPUT_TYPES, *PASSTHROUGH_TYPES))}, "
                              "quantized Conv2d / Linear) and reshapes are supported; express it as a module")
    # identity / dropout (folded BatchNorms, eval-mode dropout) compute nothing: rewire their readers
    alias = {s.name: s.inputs[0] for s in steps if isinstance(s.module, (nn.Identity, nn.Dropout))}
    steps = [s for s in steps if s.name not in alias]
    for step in steps:
        step.inputs = [_resolve(name, alias) for name in step.inputs]
    for step in steps:
        if step.node is not None:
            step._call_args = torch.fx.node.map_arg((step.node.args, dict(step.node.kwargs)),
                                                    lambda n: _Ref(_resolve(n.name, alias)))
    for step in steps:  # an accumulator (layer without output quantizer, plain Add) feeds one ReLU, or is the
        # model's float output (the logits layer's accumulator, dequantized)
        if (step.kind == "layer" and step.module.act_quant is None) or step.kind == "add":
            readers = [s for s in steps if step.name in s.inputs and s.kind != "shape"]
            if step.kind == "layer" and [r.kind for r in readers] == ["output"]:
                continue
            if len(readers) != 1 or readers[0].kind != "requant" or not isinstance(readers[0].module.module,
                                                                                     RELU_TYPES):
                raise ExportError(f"{step.target}: output not quantized and not followed by a quantized ReLU; "
                                  "give it an output quantizer (activation bits in the plan)")
    return steps


def float_output(step: Step, steps: list[Step]) -> bool:
    """Whether ``step`` is a layer whose accumulator is the model's float output (no output quantizer)."""
    return step.kind == "layer" and step.module.act_quant is None and any(
        s.kind == "output" and step.name in s.inputs for s in steps)


def _resolve(name: str, alias: dict[str, str]) -> str:
    while name in alias:
        name = alias[name]
    return name


def _callee(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _reshape_like(node: torch.fx.Node) -> bool:
    """A function / method that only moves values: a reshape, permute, slice, split or broadcast."""
    return ((node.op == "call_function" and node.target in SHAPE_FUNCTIONS)
            or (node.op == "call_method" and node.target in SHAPE_METHODS))


def _attribute(root: nn.Module, target: str) -> Any:
    owner, _, attr = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, attr)


def _module_kind(name: str, module: nn.Module) -> str:
    if isinstance(module, QuantWeightLayer):
        if module.weight_quant is None:
            raise ExportError(f"layer {name} has float weights in this plan; every exported layer needs quantized "
                              "weights (drop it from --no-quant-layers or give it weight bits)")
        return "layer"
    if isinstance(module, QuantOutput):
        if not isinstance(module.module, OUTPUT_TYPES):
            raise ExportError(f"{name}: a quantized {type(module.module).__name__} cannot be exported (only "
                              f"{', '.join(t.__name__ for t in OUTPUT_TYPES)}); fold BatchNorm into the layer "
                              "before it")
        return "requant"
    if isinstance(module, RELU_ABSORBING_TYPES):
        return "add"
    if isinstance(module, PASSTHROUGH_TYPES):
        return "passthrough"
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        raise ExportError(f"layer {name} is left in float by the plan; export needs every layer quantized (drop it "
                          "from --no-quant-layers)")
    raise ExportError(f"{name}: {type(module).__name__} is not quantized and cannot be exported (unfolded "
                      "BatchNorm or an unsupported module)")


def scheme_blockers(qmodel: QuantizedModel, runtime: str, eight_bit_activations: bool = True,
                    symmetric_weights: bool = True) -> list[str]:
    """What ``qmodel``'s quantizers hold that ``runtime``'s integer scheme cannot (empty: nothing), one reason
    per quantizer: per-channel activations and weights wider than 8 bits always; activations of other than 8
    bits with ``eight_bit_activations``, asymmetric weights with ``symmetric_weights``."""
    problems = []
    for name, fq in iter_quantizers(qmodel):
        spec = fq.spec
        if fq.kind == "act" and spec.per_channel:
            problems.append(f"{name}: per-channel activations")
        elif fq.kind == "act" and eight_bit_activations and spec.bits != 8:
            problems.append(f"{name}: {spec.bits}-bit activations ({runtime} takes 8-bit ones)")
        elif fq.kind == "weight" and spec.bits > 8:
            problems.append(f"{name}: {spec.bits}-bit weights ({runtime} stores weights as int8)")
        elif fq.kind == "weight" and symmetric_weights and spec.scheme != "sym":
            problems.append(f"{name}: {spec.scheme} weights ({runtime} takes symmetric ones)")
    return problems


def summarize_blockers(blockers: list[str], shown: int = 1) -> str:
    """The first ``shown`` reasons of :func:`scheme_blockers`, and how many more there are."""
    more = len(blockers) - shown
    return "; ".join(blockers[:shown]) + (f" (+{more} more)" if more > 0 else "")


def layer_weight(layer: QuantWeightLayer) -> QuantizedTensor:
    """The deployed layer's integer weight: ``clamp(round(w / s) + z)`` of the (BN-folded) float weight with
    the weight quantizer's qparams; ``dequantize`` of it is exactly what the fake-quant layer multiplies by."""
    qp = layer.weight_quant.qparams()
    return quantize(layer.float_weight().detach().float(), qp.scale, qp.zero_point, qp.quant_min, qp.quant_max,
                    qp.axis)


def act_qparams(step: Step, input_quant: FakeQuantize | None = None) -> QParams:
    """Qparams of the tensor a step produces: the input quantizer, a layer's or a QuantOutput's ``act_quant``."""
    fq = input_quant if step.kind == "input" else getattr(step.module, "act_quant", None)
    if fq is None:
        raise ExportError(f"{step.target} produces no quantized tensor")
    qp = fq.qparams()
    if qp.axis is not None:
        raise ExportError(f"{step.target}: per-channel activation qparams cannot be exported; use per-tensor "
                          "activations")
    return qp


def agreement(model: nn.Module, reference: QuantizedModel, batches: Any) -> dict[str, Any]:
    """Compare a deployed ``model`` with the fake-quant ``reference`` on ``batches`` (tensors or ``(x, y)``):
    how many predictions differ (``disagree`` of ``images``) and the largest logit difference, in output
    quantization steps where the reference's logits are quantized (``max_logit_diff_steps``, else None), and
    as a share of the reference logits' range (``max_logit_diff_share``: float logits have no step)."""
    steps = deploy_graph(reference)
    last = next(s for s in steps if s.name == steps[-1].inputs[0])
    quantized_output = last.kind in ("layer", "requant") and last.module.act_quant is not None
    step_size = float(act_qparams(last).scale) if quantized_output else None
    differ = total = 0
    worst, low, high = 0.0, math.inf, -math.inf
    with torch.no_grad():
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            a, b = model(x), reference(x)
            differ += int((a.argmax(1) != b.argmax(1)).sum())
            total += len(x)
            worst = max(worst, float((a - b).abs().max()))
            low, high = min(low, float(b.min())), max(high, float(b.max()))
    return {"images": total, "disagree": differ,
            "max_logit_diff_steps": None if step_size is None else worst / step_size,
            "max_logit_diff_share": worst / (high - low) if high > low else 0.0}


def logit_gap(check: dict[str, Any]) -> str:
    """An :func:`agreement`'s logit difference in words: 'logits within 2 output steps' or, for float
    logits, 'logits within 0.12 % of their range'."""
    if check["max_logit_diff_steps"] is not None:
        return f"logits within {check['max_logit_diff_steps']:.0f} output steps"
    return f"logits within {100 * check['max_logit_diff_share']:.2g} % of their range"


_OPERATORS = {"add": "+", "iadd": "+=", "mul": "*", "imul": "*=", "matmul": "@"}


def _form(form: Any) -> str:
    """How a user writes an op's form: ``F.relu``, ``torch.cat``, ``x.relu()``, ``+``."""
    if isinstance(form, str):
        return f"`x.{form}()`"
    name = form.__name__
    if getattr(operator, name, None) is form:
        return f"`{_OPERATORS.get(name, name)}`"
    return f"`F.{name}`" if getattr(F, name, None) is form else f"`torch.{name}`"


def op_coverage_markdown() -> str:
    """The docs' table of how each exporter computes each op of :data:`lit_quant.quant.optable.OPS`
    (docs/design.md holds it, and a test keeps the two equal)."""
    rows = ["| op | module, forms | output | `onnx` | `int8` | `integer` |", "|---|---|---|---|---|---|"]
    for op in OPS:
        forms = ", ".join([f"`nn.{op.module.__name__}`" if op.module.__module__.startswith("torch")
                           else f"`{op.module.__name__}`", *dict.fromkeys(_form(f) for f in op.forms)])
        if not op.quantized:
            output, onnx, int8, integer = "on its input's grid", "yes", "yes", "yes"
        else:
            output = "fused into the layer / add before it" if op.relu is not None else "quantized"
            onnx = f"`{op.onnx}`" if op.onnx else "refused"
            int8 = f"`quantized::{op.int8_kernel}`" if op.int8_kernel else "float op, requantized"
            if op.relu is not None:
                int8 = f"fused (`ConvReLU2d`, `LinearReLU`, `quantized::add_relu`); else {int8}"
            integer = "yes" if op.integer else "refused"
        rows.append(f"| {op.name} | {forms} | {output} | {onnx} | {int8} | {integer} |")
    return "\n".join(rows) + "\n"
