"""The one traced graph of a model, which ``prepare``, BatchNorm folding and every exporter read.

:func:`trace` runs torch.fx's symbolic tracer once (no data) and returns a ``torch.fx.GraphModule`` whose
nodes are module calls wherever an int8 backend computes an integer op:

* every ``torch.nn`` module (and our quantized layers, quantizers and :mod:`lit_quant.quant.ops`) is a leaf;
* functional ops on tensors become module calls: each form of an op in :data:`lit_quant.quant.optable.OPS`
  (``x + y`` / ``torch.add`` / ``add_`` -> :class:`Add`, ``torch.cat`` -> :class:`Cat`, ``F.relu`` /
  ``x.relu()`` -> ``nn.ReLU``, ``F.layer_norm`` -> ``nn.LayerNorm`` sharing its parameters, ...) becomes
  that op's module, named after the op in the module that called it (``layer1.0.add``, ``features.3.relu_1``);
* ``nn.MultiheadAttention`` becomes :class:`lit_quant.quant.attention.DecomposedMultiheadAttention`: its
  projections, score and value products and softmax are separate modules;
* a parameter-free module called more than once (torchvision's ResNet blocks call one ``relu`` twice) gets
  one copy per call (``layer1.0.relu_1``), so each tensor can have its own quantizer.

The graph module keeps the model's own top-level children (its structure, attribute access and state-dict
names); what ``forward`` runs is the traced graph. Python control flow is evaluated once at trace time, in
eval mode: a branch on ``self.training`` keeps its inference side (dropout *modules* still follow
``train()``). Why torch.fx and not torch.export: FX keeps module boundaries and names, which plans,
reports and checkpoints address, and traces every torchvision classifier; torch.export's ATen graph does
not keep them without re-deriving them from stack metadata.
"""

from __future__ import annotations

import copy
import operator
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from lit_quant.quant.attention import decompose_attention
from lit_quant.quant.errors import QuantConfigError
from lit_quant.quant.fake_quant import FakeQuantize
from lit_quant.quant.fuse import BN_TYPES, WEIGHTED_TYPES, fold_bn, set_submodule
from lit_quant.quant.layers import QuantOutput, QuantWeightLayer
from lit_quant.quant.optable import FORMS, OP_TYPES

#: Modules a trace never enters: their call is one node. ``torch.nn``'s own modules are leaves already, and
#: listing them here would also make their subclasses leaves (torchvision's channels-first ``LayerNorm2d``).
LEAF_TYPES: tuple[type[nn.Module], ...] = (  # type: ignore[assignment]
    QuantWeightLayer, QuantOutput, FakeQuantize, *(t for t in OP_TYPES if not t.__module__.startswith("torch.nn")))
#: Containers whose children are indexed or iterated: new op modules go to the nearest other ancestor.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
#: ``Tensor`` methods whose result is not a tensor.
_NON_TENSOR_METHODS = {"size", "dim", "numel", "item", "tolist", "type", "get_device", "__len__"}


class QuantTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps ``torch.nn`` modules, our quantized modules, quantizers, op modules and
    ``leaf_types`` as leaves."""

    def __init__(self, leaf_types: Iterable[type[nn.Module]] = ()) -> None:
        super().__init__()
        self.leaf_types = (*LEAF_TYPES, *leaf_types)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


def _untraceable(model: nn.Module, exc: Exception) -> QuantConfigError:
    """One line naming where tracing failed in the user's code and what to do about it."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} `{(frames[-1].line or '').strip()}`" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return QuantConfigError(
        f"torch.fx cannot trace {type(model).__name__}{where}: {message}. Remove the data-dependent Python "
        "control flow there, or move that code into its own nn.Module and pass its class as "
        "prepare(..., leaf_types=(ThatModule,)) so that it stays float")


def tensor_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes whose value is a tensor, inferred without data: inputs, attributes and module outputs are;
    ``x.shape``, ``x.size()`` and what is computed from them only are not."""
    tensors: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_module"):
            tensors.add(node)
        elif node.op == "call_method":
            if node.args and node.args[0] in tensors and node.target not in _NON_TENSOR_METHODS:
                tensors.add(node)
        elif node.op == "call_function":
            if node.target is getattr:
                continue
            if node.target is operator.getitem:
                if node.args[0] in tensors:
                    tensors.add(node)
            elif any(a in tensors for a in node.all_input_nodes):
                tensors.add(node)
    return tensors


def _constant(values: Iterable[Any]) -> bool:
    """Whether no value is (or contains) a graph node: the op's configuration is fixed at trace time."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(tuple(values), found.append)
    return not found


def _layer_norm(root: nn.Module, node: torch.fx.Node) -> tuple[nn.Module, tuple[Any, ...]] | None:
    """``F.layer_norm(x, shape, weight, bias, eps)`` with attribute weights -> an ``nn.LayerNorm`` sharing them."""
    kw = {**dict(zip(("normalized_shape", "weight", "bias", "eps"), node.args[1:])), **node.kwargs}
    params = {k: kw.get(k) for k in ("weight", "bias")}
    if any(p is not None and not (isinstance(p, torch.fx.Node) and p.op == "get_attr") for p in params.values()):
        return None
    if not _constant([kw["normalized_shape"], kw.get("eps", 1e-5)]) or (params["weight"] is None) != (
            params["bias"] is None):
        return None
    norm = nn.LayerNorm(kw["normalized_shape"], eps=kw.get("eps", 1e-5),
                        elementwise_affine=params["weight"] is not None, device="meta")
    for key, p in params.items():
        if p is not None:
            setattr(norm, key, root.get_parameter(str(p.target)))
    return norm, (node.args[0],)


def _op_module(root: nn.Module, node: torch.fx.Node, tensors: set[torch.fx.Node]
               ) -> tuple[str, nn.Module, tuple[Any, ...]] | None:
    """The module (with its op name and tensor arguments) that computes ``node``'s op, or None to leave it."""
    if node.op not in ("call_function", "call_method"):
        return None
    op = FORMS.get(node.target)
    args, kwargs = node.args, dict(node.kwargs)
    if op is None or not args:
        return None
    if op.arity == "binary":
        if len(args) == 2 and not kwargs and all(a in tensors for a in args):
            return op.name, op.module(), tuple(args)
        return None
    if op.arity == "list":
        if isinstance(args[0], (list, tuple)) and all(a in tensors for a in args[0]):
            kw = op.bind(node.target, tuple(args[1:]), kwargs)
            if _constant(kw.values()) and set(kw) <= set(op.params):
                return op.name, op.make(kw), tuple(args[0])
        return None
    if args[0] not in tensors:
        return None
    if op.arity == "norm":
        built = _layer_norm(root, node)
        return (op.name, *built) if built else None
    kw = op.bind(node.target, tuple(args[1:]), kwargs)
    module = op.make(kw) if _constant(kw.values()) else None
    return (op.name, module, (args[0],)) if module is not None else None


def _owner(root: nn.Module, path: str) -> str:
    """``path`` or its nearest ancestor that is not a container (new children must not join an
    ``nn.Sequential``'s iteration)."""
    while path and isinstance(root.get_submodule(path), _CONTAINERS):
        path = path.rpartition(".")[0]
    return path


#: Functions that are the identity when their ``training`` argument is False, as a trace in eval mode records
#: it: ``(module, name, position of training after the input)``. Matched by name: the core imports no torchvision.
_TRAINING_ONLY = (("torch.nn.functional", "dropout", 1), ("torch.nn.functional", "dropout2d", 1),
                  ("torchvision.ops.stochastic_depth", "stochastic_depth", 2))


def _eval_identity(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a dropout-like function traced with ``training=False`` (it returns its input)."""
    if node.op != "call_function":
        return False
    fn = node.target
    for module, name, position in _TRAINING_ONLY:
        if getattr(fn, "__name__", None) == name and getattr(fn, "__module__", "") == module:
            training = node.kwargs.get("training", node.args[position + 1] if len(node.args) > position + 1 else True)
            return training is False
    return False


def _scope(root: nn.Module, node: torch.fx.Node) -> str:
    """Qualified name of the module whose ``forward`` issued ``node`` (see :func:`_owner`)."""
    stack = node.meta.get("nn_module_stack") or {}
    return _owner(root, list(stack.values())[-1][0] if stack else "")


def _add_module(root: nn.Module, scope: str, base: str, module: nn.Module) -> str:
    """Install ``module`` as ``scope.base`` (``base_1``, ``base_2``, ... when taken); return its name."""
    parent = root.get_submodule(scope) if scope else root
    name, k = base, 0
    while hasattr(parent, name):
        k += 1
        name = f"{base}_{k}"
    parent.add_module(name, module)
    return f"{scope}.{name}" if scope else name


def _stateless(module: nn.Module) -> bool:
    return next(module.parameters(), None) is None and next(module.buffers(), None) is None


def modularize(gm: torch.fx.GraphModule) -> None:
    """Rewrite ``gm`` in place so every quantizable op is a module call (see the module docstring)."""
    graph = gm.graph
    tensors = tensor_nodes(graph)
    seen: set[str] = set()
    for node in list(graph.nodes):
        if node.op == "call_module":
            target = str(node.target)
            module = gm.get_submodule(target)
            if target in seen and _stateless(module):
                scope = _owner(gm, target.rpartition(".")[0])
                base = target[len(scope) + 1 if scope else 0:].replace(".", "_")
                node.target = _add_module(gm, scope, base, copy.deepcopy(module))
            seen.add(str(node.target))
            continue
        if _eval_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            continue
        found = _op_module(gm, node, tensors)
        if found is None:
            continue
        base, module, args = found
        name = _add_module(gm, _scope(gm, node), base, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, args)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        tensors.add(new)
        seen.add(name)
    for node in list(graph.nodes):  # attributes only a rewritten op read (a layer norm's weight)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()


def trace(model: nn.Module, leaf_types: Iterable[type[nn.Module]] = ()) -> torch.fx.GraphModule:
    """The traced, modularized graph module of ``model`` (see the module docstring). The graph module shares
    ``model``'s submodules, and ``model``'s attention modules are decomposed in place: pass a copy to keep
    them apart.

    Raises:
        QuantConfigError: torch.fx cannot trace the model (one line naming the failing code).
    """
    tracer = QuantTracer(leaf_types)
    decompose_attention(model)
    was_training = model.training
    model.eval()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - every tracing failure is reported the same way
        raise _untraceable(model, exc) from None
    finally:
        model.train(was_training)
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name, child in model.named_children():  # the model's own structure, unused children included
        setattr(gm, name, child)
    modularize(gm)
    return gm.train(was_training)


@dataclass
class ModuleGraph:
    """Producer -> consumer relations between the module calls of a traced graph, by qualified name.

    Attributes:
        order: module names in execution order (each once, first call).
        consumer: ``name -> consumer name`` for modules whose output feeds exactly one module call and
            nothing else.
        calls: how many times each module is called (a module called twice shares one quantizer).
    """

    order: list[str] = field(default_factory=list)
    consumer: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def next_module(self, name: str) -> str | None:
        """The single module consuming ``name``'s output, or None."""
        return self.consumer.get(name)


def module_graph(gm: torch.fx.GraphModule) -> ModuleGraph:
    """The module-to-module edges of ``gm``'s graph."""
    out = ModuleGraph()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        out.calls[name] = out.calls.get(name, 0) + 1
        if out.calls[name] == 1:
            out.order.append(name)
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            out.consumer[name] = str(users[0].target)
    return out


def bn_pairs(model: nn.Module, graph: ModuleGraph) -> list[tuple[str, str]]:
    """``(layer, bn)`` name pairs where a Conv2d / Linear feeds only a BatchNorm with matching channels."""
    modules = dict(model.named_modules())
    pairs = []
    for name in graph.order:
        nxt = graph.next_module(name)
        layer, bn = modules.get(name), modules.get(nxt) if nxt else None
        if (isinstance(layer, WEIGHTED_TYPES) and isinstance(bn, BN_TYPES) and graph.calls.get(nxt) == 1
                and bn.track_running_stats and bn.num_features == layer.weight.shape[0]):
            pairs.append((name, nxt))
    return pairs


def fuse_conv_bn(model: nn.Module) -> tuple[torch.fx.GraphModule, list[tuple[str, str]]]:
    """The traced graph module of a copy of ``model`` with every Conv2d-BN / Linear-BN pair folded (BN
    replaced by ``nn.Identity``).

    Returns:
        The fused copy (in eval mode: folding uses running statistics) and the folded ``(layer, bn)`` names.
    """
    fused = trace(copy.deepcopy(model).eval())
    pairs = bn_pairs(fused, module_graph(fused))
    for layer_name, bn_name in pairs:
        set_submodule(fused, layer_name, fold_bn(fused.get_submodule(layer_name), fused.get_submodule(bn_name)))
        set_submodule(fused, bn_name, nn.Identity())
    return fused, pairs
