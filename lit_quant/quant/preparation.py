"""``prepare(model, plan)``: a quantized copy of a float model; calibration helpers.

The model is traced once (:func:`lit_quant.quant.graph.trace`): functional ops become module calls, so
``F.relu``, ``x + y`` and ``torch.cat`` are quantized like their modules. Which tensors get a quantizer —
every tensor that is an integer tensor on a real int8 backend:

* the model input (or each torch.ao ``QuantStub``);
* the weight of every ``Conv2d`` / ``Linear``;
* the output of every ``Conv2d`` / ``Linear`` / unfolded ``BatchNorm`` / ``add`` — unless a ReLU (or, for a
  layer, an unfolded BatchNorm) is its only consumer, in which case the tensor after that consumer is
  quantized instead (conv+bn+relu and add+relu are single integer ops);
* the output of every other op of the op table (:data:`lit_quant.quant.optable.OPS`) marked ``quantized``:
  activations, average pooling, ``mul``, ``cat``, ``matmul``, LayerNorm, softmax, mean.

The table's other ops (max pooling, flatten, dropout, identity), reshapes and slices are left alone: their
outputs stay on the input's grid. BatchNorm following a Conv/Linear is folded first when ``plan.fold_bn``
(inference / PTQ).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
import torch.fx
from torch import nn

from lit_quant.quant.errors import CalibrationError, QuantConfigError
from lit_quant.quant.fake_quant import (
    FakeQuantize,
    build_fake_quantize,
    enable_fake_quant,
    enable_observer,
    set_batch_index,
    sync_observers,
    update_qparams,
)
from lit_quant.quant.fuse import BN_TYPES, WEIGHTED_TYPES, fold_bn, set_submodule
from lit_quant.quant.graph import ModuleGraph, bn_pairs, module_graph, trace
from lit_quant.quant.layers import WEIGHTED_QUANT, QuantConvBn2d, QuantOutput, QuantWeightLayer
from lit_quant.quant.optable import (
    OUTPUT_TYPES,
    PASSTHROUGH_TYPES,
    RELU_ABSORBING_TYPES,
    RELU_TYPES,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
)
from lit_quant.quant.plan import DEPTHWISE, FIRST, INPUT, LAST, OUTPUT, LayerOverride, QuantPlan

QUANTIZED_TYPES: tuple[type, ...] = (QuantWeightLayer, QuantOutput)

M = TypeVar("M", bound=nn.Module)


def is_depthwise(module: nn.Module | None) -> bool:
    """A Conv2d with one input channel per group (``@depthwise`` in a plan)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


class QuantizedModel(nn.Module):
    """The prepared model: ``model(input_quant(x))``; see :func:`prepare`.

    Attributes:
        model: the float model's copy with quantized modules swapped in.
        input_quant: quantizer of the model input (None with ``QuantStub`` models or ``quantize_input=False``).
        plan: the :class:`QuantPlan` it was prepared with.
        applied_overrides: the plan's overrides that matched a tensor of this model, in plan order (a role
            such as ``@depthwise`` matches nothing in a model without such layers).
    """

    def __init__(self, model: nn.Module, input_quant: FakeQuantize | None, plan: QuantPlan,
                 applied_overrides: tuple[LayerOverride, ...] = ()) -> None:
        super().__init__()
        self.input_quant = input_quant
        self.model = model
        self.plan = plan
        self.applied_overrides = applied_overrides
        self.train(model.training)  # the float model's mode: an eval-mode model prepares into an eval-mode one

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.input_quant is not None:
            x = self.input_quant(x)
        return self.model(x, *args, **kwargs)

    def to_float(self) -> nn.Module:
        """A float copy: every quantized module replaced by its ``to_float()`` (folded BN stays folded)."""
        model = copy.deepcopy(self.model)
        for name, module in list(model.named_modules()):
            if isinstance(module, QUANTIZED_TYPES):
                set_submodule(model, name, module.to_float())
        return model


def _input_quantizer(node: torch.fx.Node, modules: dict[str, nn.Module],
                     input_quant: FakeQuantize | None) -> FakeQuantize | None:
    """The quantizer whose grid the tensor of ``node`` is on, looking back through pass-through ops."""
    while True:
        if node.op == "placeholder":
            return input_quant
        if _passes_through(node, modules):
            node = node.args[0]
            continue
        if node.op == "call_module":
            return getattr(modules[str(node.target)], "act_quant", None)
        return None


def _passes_through(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` keeps its first argument's values on their grid (a pass-through module or a reshape)."""
    return (node.op == "call_module" and isinstance(modules[str(node.target)], PASSTHROUGH_TYPES)) or (
        node.op == "call_function" and node.target in SHAPE_FUNCTIONS) or (
        node.op == "call_method" and node.target in SHAPE_METHODS)


def output_layer(model: torch.fx.GraphModule) -> str | None:
    """The Conv2d / Linear whose output the traced ``model`` returns (through reshapes and pass-through
    modules): the layer that computes the logits, ``@output`` in a plan. None when the model returns
    something else (several tensors, or the output of a pooling or an activation)."""
    modules = dict(model.named_modules())
    out = next(n for n in model.graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, torch.fx.Node) and _passes_through(node, modules) and node.args:
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "call_module" \
            and isinstance(modules[str(node.target)], WEIGHTED_TYPES):
        return str(node.target)
    return None


def logits_quantizer(qmodel: QuantizedModel) -> FakeQuantize | None:
    """The output quantizer of ``qmodel``'s logits layer (:func:`output_layer`); None when the logits are
    float, as the default plans leave them."""
    name = output_layer(qmodel.model)
    return None if name is None else getattr(qmodel.model.get_submodule(name), "act_quant", None)


def link_input_quantizers(qmodel: QuantizedModel) -> None:
    """Tell every quantized Conv2d / Linear which quantizer produces its input, so that its bias can be
    rounded to the accumulator grid ``s_x s_w`` as a deployment does (:meth:`deployed_bias`).

    The link is a plain attribute (not a submodule: the quantizer stays owned by its producer).
    """
    modules = dict(qmodel.model.named_modules())
    for node in qmodel.model.graph.nodes:
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, QuantWeightLayer) and node.args and isinstance(node.args[0], torch.fx.Node):
            fq = _input_quantizer(node.args[0], modules, qmodel.input_quant)
            module.link_input_quantizer(fq)


def _absorbed(modules: dict[str, nn.Module], graph: ModuleGraph, folded: set[str]
              ) -> tuple[set[str], dict[str, str]]:
    """Producers whose output quantization moves to their consumer, and each consumer's governing name."""
    def consumer(name: str) -> str | None:
        nxt = graph.next_module(name)
        while nxt in folded:
            nxt = graph.next_module(nxt)
        return nxt

    absorbed: set[str] = set()
    owner: dict[str, str] = {}
    for name in graph.order:
        nxt = consumer(name)
        if nxt is None or graph.calls.get(nxt, 0) != 1:
            continue
        m, n = modules[name], modules[nxt]
        if (isinstance(m, WEIGHTED_TYPES) and isinstance(n, BN_TYPES)) or (
                isinstance(m, (*WEIGHTED_TYPES, *BN_TYPES, *RELU_ABSORBING_TYPES)) and isinstance(n, RELU_TYPES)):
            absorbed.add(name)
            owner[nxt] = owner.get(name, name)
    return absorbed, owner



#: torch.ao's marker modules in torchvision's quantizable models, as ``(module prefix, class name)``. The core
#: recognises them by the name of their class (or of a base class) so that it never imports torch.ao.
_AO_STUBS = (("torch.ao.quantization", "QuantStub"),)


def _is_ao(module: nn.Module, names: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``module``'s class, or one of its bases, is one of torch.ao's ``names``."""
    return any(cls.__module__.startswith(prefix) and cls.__qualname__ == name
               for cls in type(module).__mro__ for prefix, name in names)


def is_ao_stub(module: nn.Module) -> bool:
    """A torch.ao ``QuantStub``: where the model input is quantized."""
    return _is_ao(module, _AO_STUBS)


def prepare(model: nn.Module, plan: QuantPlan | None = None, qat: bool = False,
            leaf_types: Iterable[type[nn.Module]] = ()) -> QuantizedModel:
    """A quantized copy of ``model`` (``model`` itself is not modified).

    Steps: deep copy; trace it once into a graph module (:func:`lit_quant.quant.graph.trace`, with
    ``leaf_types`` kept whole and float); fold Conv/Linear-BN pairs if ``plan.fold_bn`` (with ``qat``, a
    quantized Conv-BN pair becomes a :class:`QuantConvBn2d` that folds as it trains, so BatchNorm keeps
    learning statistics); swap Conv2d / Linear for :class:`QuantConv2d` / :class:`QuantLinear` and wrap the
    output-producing modules listed in the module docstring, each with the specs ``plan.resolve(name)``
    gives; last, every quantized layer is linked to the quantizer of its input (:func:`link_input_quantizers`,
    for its int32-grid bias). Quantizers start in calibration mode (observers on, fake quant off), so the
    prepared model computes exactly what the (folded) float model does until :func:`enable_fake_quant` is
    called. Modules the traced ``forward`` never calls are left as they are.

    Raises:
        QuantConfigError: the model cannot be traced, has nothing to quantize, or a plan override matches no
            layer (with the closest names).
    """
    plan = plan or QuantPlan()
    model = trace(copy.deepcopy(model), leaf_types)
    graph = module_graph(model)
    modules = dict(model.named_modules())
    folded: set[str] = set()
    live_bn: dict[str, nn.Module] = {}  # QAT: conv name -> its BatchNorm, folded in QuantConvBn2d.forward
    if plan.fold_bn:
        for layer_name, bn_name in bn_pairs(model, graph):
            if qat and type(modules[layer_name]) is nn.Conv2d:
                live_bn[layer_name] = modules[bn_name]
            else:
                set_submodule(model, layer_name, fold_bn(modules[layer_name], modules[bn_name]))
            set_submodule(model, bn_name, nn.Identity())
            folded.add(bn_name)
        modules = dict(model.named_modules())
    absorbed, owner = _absorbed(modules, graph, folded)

    weighted = [n for n in graph.order if isinstance(modules[n], WEIGHTED_TYPES)]
    logits = output_layer(model)
    outputs = [n for n in graph.order if isinstance(modules[n], (*OUTPUT_TYPES, *BN_TYPES)) and n not in absorbed]
    stubs = [n for n in graph.order if is_ao_stub(modules[n])]
    if not weighted and not outputs:
        raise QuantConfigError(f"{type(model).__name__} has nothing to quantize: its traced forward calls no "
                               "Conv2d / Linear, activation, pooling or arithmetic op")
    # an absorbed producer (an add before its ReLU) names the quantizer of the tensor it hands on
    plan.check_names([INPUT, *weighted, *outputs, *stubs, *owner.values()])

    resolved: list[tuple[str, list[str]]] = [(INPUT, [])]  # every name resolved, with its roles

    def resolve(name: str) -> Any:
        governing = owner.get(name, name)
        aliases = ([FIRST] if weighted and governing == weighted[0] else []) + (
            [LAST] if weighted and governing == weighted[-1] else []) + ([OUTPUT] if name == logits else []) + (
            [DEPTHWISE] if is_depthwise(modules.get(governing)) else [])
        resolved.append((governing, aliases))
        return plan.resolve(governing, aliases)

    for name in weighted:
        lq = resolve(name)
        if lq.weight is None and lq.act is None:  # skipped (or fully float) layer stays the user's module
            if name in live_bn:  # ...with its BatchNorm folded, as every other pair
                set_submodule(model, name, fold_bn(modules[name], live_bn[name]))
            continue
        act = None if name in absorbed else lq.act
        if name in live_bn:
            layer = QuantConvBn2d.from_float(modules[name], lq.weight, act, lq.accum_bits, bn=live_bn[name])
        else:
            qcls = next(q for f, q in WEIGHTED_QUANT.items() if isinstance(modules[name], f))
            layer = qcls.from_float(modules[name], lq.weight, act, lq.accum_bits)
        _tag_quantizers(layer, owner.get(name, name))
        set_submodule(model, name, layer)
    shared = [n for n in outputs if graph.calls.get(n, 1) > 1]
    if shared:
        warnings.warn(f"module(s) {', '.join(shared)} are called more than once; each shares one output quantizer "
                      "(give every use its own module instance to quantize each tensor separately)", stacklevel=2)
    for name in (*outputs, *stubs):
        spec = resolve(name).act
        if spec is not None:
            set_submodule(model, name, _tag_quantizers(QuantOutput.from_float(modules[name], spec),
                                                       owner.get(name, name)))

    input_quant = None
    if plan.quantize_input and not stubs:
        spec = plan.resolve(INPUT).act
        input_quant = _tag_quantizers(build_fake_quantize(spec, "act"), INPUT) if spec is not None else None
    applied = tuple(o for o in plan.overrides if any(o.matches(n, a) for n, a in resolved))
    qmodel = QuantizedModel(model, input_quant, plan, applied)
    link_input_quantizers(qmodel)
    return qmodel


def _tag_quantizers(module: M, plan_name: str) -> M:
    """Record on every quantizer of ``module`` the plan name that governs it (:attr:`FakeQuantize.plan_name`)."""
    for sub in module.modules():
        if isinstance(sub, FakeQuantize):
            sub.plan_name = plan_name
    return module


def start_calibration(model: nn.Module) -> None:
    """Start of calibration: observers on, fake quant off (the model computes exactly in float).

    Weight observers see each layer's current (BN-folded) weight once, here: the weights do not change
    while calibrating, so observing them again in every batch would only cost time.
    """
    enable_observer(model, True)
    enable_fake_quant(model, False)
    for module in model.modules():
        if isinstance(module, QuantWeightLayer) and module.weight_quant is not None:
            module.weight_quant.observer.reset()
            module.weight_quant.observer(module.float_weight().detach())


def finish_calibration(model: nn.Module, group: Any = None) -> None:
    """End of calibration: merge statistics across ranks, compute qparams, switch to fake-quantized eval."""
    sync_observers(model, group)
    update_qparams(model)
    enable_observer(model, False)
    enable_fake_quant(model, True)


def calibrate(model: nn.Module, batches: Iterable[Any], group: Any = None) -> int:
    """PTQ calibration: run ``batches`` (tensors or ``(inputs, targets)`` pairs) with observers on and fake
    quant off, under ``no_grad`` in eval mode, then :func:`finish_calibration`.

    The ``i``-th batch is observed as global batch ``i * W + r`` (:func:`set_batch_index`; ``W`` ranks in
    ``group``, this one ``r``; ``i`` in one process): when rank ``r`` is given batches ``r, r + W, ...`` of one
    process's batching (as the data module's ``predict_dataloader`` does under DDP), every rank ends with
    bit for bit the qparams of one process calibrating on all the batches.

    Returns:
        Number of samples seen.

    Raises:
        CalibrationError: no batches, or some quantizer saw no data.
    """
    was_training = model.training
    model.eval()
    start_calibration(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size(group) if distributed else 1
    rank = torch.distributed.get_rank(group) if distributed else 0
    seen = 0
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                set_batch_index(model, i * world + rank)
                model(x)
                seen += len(x)
    finally:
        set_batch_index(model, None)
    if seen == 0:
        model.train(was_training)
        raise CalibrationError("empty calibration: the calibration data produced no batches")
    finish_calibration(model, group)
    model.train(was_training)
    return seen
