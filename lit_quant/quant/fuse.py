"""Which module feeds which (from an FX trace), and Conv-BN / Linear-BN folding for inference and PTQ.

The trace is only *read*: modules are swapped by name on the original module tree, the model's own
``forward`` keeps running. Models that FX cannot trace fall back to adjacency inside ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn

from lit_quant.quant.ops import Add

#: Modules whose output can absorb a following ReLU (conv+relu, add+relu are one integer op).
RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


class _Tracer(torch.fx.Tracer):
    """Keeps :class:`lit_quant.quant.ops.Add` a leaf so the residual join shows up as a module call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Add) or super().is_leaf_module(m, qualname)


@dataclass
class ModuleGraph:
    """Producer -> consumer relations between leaf modules, by qualified name.

    Attributes:
        order: module names in execution order (each once, first call).
        consumer: ``name -> consumer name`` for modules whose output feeds exactly one module call and
            nothing else.
        calls: how many times each module is called (a module called twice shares one quantizer).
        traced: False when FX failed and only ``nn.Sequential`` adjacency is known.
    """

    order: list[str] = field(default_factory=list)
    consumer: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    traced: bool = True

    def next_module(self, name: str) -> str | None:
        """The single module consuming ``name``'s output, or None."""
        return self.consumer.get(name)


def module_graph(model: nn.Module) -> ModuleGraph:
    """Trace ``model`` with FX (symbolically, no data) and read the module-to-module edges."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the fallback
        warnings.warn(f"FX could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); fusion falls back "
                      "to nn.Sequential neighbours", stacklevel=3)
        return _sequential_graph(model)
    out = ModuleGraph()
    for node in graph.nodes:
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


def _sequential_graph(model: nn.Module) -> ModuleGraph:
    out = ModuleGraph(traced=False)
    for prefix, module in model.named_modules():
        names = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_children()]
        if isinstance(module, nn.Sequential):
            out.consumer.update(zip(names, names[1:]))
    out.order = [n for n, m in model.named_modules() if n and not list(m.children())]
    out.calls = {n: 1 for n in out.order}
    return out


def bn_factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Per-channel ``gamma / sqrt(running_var + eps)``: what an eval-mode BatchNorm multiplies by."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def fold_bn_weights(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer's weight and bias.

    ``w' = w * gamma / sqrt(var + eps)`` (per output channel, axis 0) and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta`` (``b = 0`` when the layer has no bias). Uses the
    running statistics, so the result equals ``bn(layer(x))`` in eval mode.
    """
    mean = bn.running_mean
    beta = bn.bias if bn.affine else torch.zeros_like(mean)
    factor = bn_factor(bn)
    b = torch.zeros_like(mean) if bias is None else bias
    new_w = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))
    return new_w, (b - mean) * factor + beta


def fold_bn(layer: nn.Conv2d | nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> nn.Conv2d | nn.Linear:
    """A copy of ``layer`` with ``bn`` folded in (always with a bias); ``layer`` and ``bn`` are untouched."""
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        w, b = fold_bn_weights(layer.weight, layer.bias, bn)
        fused.weight = nn.Parameter(w.detach().clone())
        fused.bias = nn.Parameter(b.detach().clone())
    return fused


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (the only way modules are swapped in this package)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


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


def fuse_conv_bn(model: nn.Module, graph: ModuleGraph | None = None) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every Conv2d-BN / Linear-BN pair of a copy of ``model`` (BN replaced by ``nn.Identity``).

    Returns:
        The fused copy (in eval mode: folding uses running statistics) and the folded ``(layer, bn)`` names.
    """
    fused = copy.deepcopy(model).eval()
    graph = graph or module_graph(fused)
    pairs = bn_pairs(fused, graph)
    for layer_name, bn_name in pairs:
        set_submodule(fused, layer_name, fold_bn(fused.get_submodule(layer_name), fused.get_submodule(bn_name)))
        set_submodule(fused, bn_name, nn.Identity())
    return fused, pairs
