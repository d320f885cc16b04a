"""Cross-layer equalization with bias absorption (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.1 and 4.2), on a float model before ``prepare``.

**Equalization.** Where a layer's output feeds only an activation ``f`` with ``f(s x) = s f(x)`` for ``s >
0`` (ReLU, LeakyReLU, none) that feeds only the next layer, output channel ``i`` of the first layer can be
divided by ``s_i`` and input channel ``i`` of the second multiplied by it without changing the network::

    W1[i] /= s_i,  b1[i] /= s_i,  W2[:, i] *= s_i,      s_i = sqrt(r1_i / r2_i)

with ``r1_i = max |W1[i]|`` and ``r2_i = max |W2[:, i]|``; both channel ranges become ``sqrt(r1_i r2_i)``,
which makes a per-tensor weight grid fit every channel about equally (the paper's objective). Chains of
more than two layers are equalized pair by pair, repeatedly, until no scale moves by more than ``tol``.

**Bias absorption.** Equalization can leave large biases in the first layer, which widen the activation
range. Where BatchNorm followed the first layer, its pre-activation per channel is about ``N(beta, gamma)``
(scaled as the layer was); ``c = max(0, beta - 3 |gamma|)`` is then almost always below the activation, and
for a ReLU ``relu(x) = relu(x - c) + c`` there. ``c`` moves into the next layer's bias::

    b1 -= c,   b2 += W2 c      (a convolution: W2 summed over its kernel window)

which is exact where the ReLU input stays above ``c`` and the convolution window away from zero padding.
A second layer without a bias keeps none (the quantized checkpoint keeps the model's structure).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lit_quant.quant.graph import BN_TYPES, WEIGHTED_TYPES, fuse_conv_bn, module_graph

#: Activations between two layers that commute with a positive per-channel scale.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)


@dataclass(frozen=True)
class EqualizeResult:
    """What :func:`equalize` did: the equalized ``(first, second)`` layer pairs, passes over them, and the
    pairs whose first layer's bias was absorbed into the second."""

    pairs: list[tuple[str, str]]
    passes: int
    absorbed: list[tuple[str, str]]


def _pairs(model: torch.fx.GraphModule) -> list[tuple[str, str, bool]]:
    """``(first, second, through_activation)``: a Conv2d / Linear whose output goes, directly or through one
    homogeneous activation, called once each and used by nothing else, into a Conv2d / Linear whose input
    channels are its output channels (dense, or depthwise)."""
    graph = module_graph(model)
    modules = dict(model.named_modules())
    found = []
    for name in graph.order:
        first = modules.get(name)
        if not isinstance(first, WEIGHTED_TYPES) or graph.calls.get(name) != 1:
            continue
        relu, nxt = False, graph.next_module(name)
        if nxt is not None and isinstance(modules.get(nxt), _HOMOGENEOUS) and graph.calls.get(nxt) == 1:
            relu, nxt = True, graph.next_module(nxt)
        second = modules.get(nxt) if nxt is not None else None
        if not isinstance(second, WEIGHTED_TYPES) or graph.calls.get(nxt) != 1:
            continue
        channels = first.weight.shape[0]
        groups = second.groups if isinstance(second, nn.Conv2d) else 1
        dense = groups == 1 and second.weight.shape[1] == channels
        depthwise = groups == channels and second.weight.shape[0] == channels and second.weight.shape[1] == 1
        if dense or depthwise:
            found.append((name, str(nxt), relu))
    return found


def _drop_identities(gm: torch.fx.GraphModule) -> None:
    """Remove the graph's calls of ``nn.Identity`` modules (the folded BatchNorms), so that ``prepare`` sees
    the layer feeding its activation directly and fuses them as it fuses the model's Conv-BN-ReLU."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def _in_channel_view(layer: nn.Module) -> torch.Tensor:
    """``layer``'s weight with input channels on axis 0, as ``(in, -1)`` (a depthwise convolution's input
    channel ``i`` is its output channel ``i``)."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        return w.reshape(w.shape[0], -1)
    return w.transpose(0, 1).reshape(w.shape[1], -1)


def _scale_in_channels(layer: nn.Module, s: torch.Tensor) -> None:
    w = layer.weight
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        w.mul_(s.reshape(-1, *([1] * (w.dim() - 1))))
    else:
        w.mul_(s.reshape(1, -1, *([1] * (w.dim() - 2))))


def equalize(model: nn.Module, absorb_bias: bool = True, max_passes: int = 100, tol: float = 1e-6
             ) -> tuple[torch.fx.GraphModule, EqualizeResult]:
    """A copy of ``model`` with BatchNorm folded (as ``prepare`` folds it), cross-layer equalized and its
    biases absorbed (module docstring); ``model`` is untouched. The copy computes the same function in
    float (up to rounding, and to bias absorption's approximation).

    Args:
        absorb_bias: absorb biases after equalizing (the copy is then exact only approximately).
        max_passes: equalization sweeps over all pairs at most.
        tol: stop when every scale of a sweep is within ``1 +- tol``.
    """
    fused, folded = fuse_conv_bn(model)
    # the pre-activation statistics bias absorption needs, per layer BatchNorm followed: (beta, |gamma|)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer_name, bn_name in folded:
        bn = model.get_submodule(bn_name)  # the copy's is an Identity now; names are the model's
        if isinstance(bn, BN_TYPES) and bn.affine:
            stats[layer_name] = (bn.bias.detach().clone(), bn.weight.detach().abs().clone())
    _drop_identities(fused)
    pairs = _pairs(fused)
    total: dict[str, torch.Tensor] = {}  # the product of the scales each first layer's outputs were divided by
    passes = 0
    with torch.no_grad():
        for passes in range(1, max_passes + 1):
            moved = 0.0
            for first_name, second_name, _ in pairs:
                first, second = fused.get_submodule(first_name), fused.get_submodule(second_name)
                r1 = first.weight.reshape(first.weight.shape[0], -1).abs().amax(1)
                r2 = _in_channel_view(second).abs().amax(1)
                s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
                first.weight.div_(s.reshape(-1, *([1] * (first.weight.dim() - 1))))
                if first.bias is not None:
                    first.bias.div_(s)
                _scale_in_channels(second, s)
                total[first_name] = total.get(first_name, torch.ones_like(s)) * s
                moved = max(moved, float((s - 1).abs().max()))
            if moved <= tol:
                break
        absorbed = []
        for first_name, second_name, relu in pairs if absorb_bias else []:
            first, second = fused.get_submodule(first_name), fused.get_submodule(second_name)
            # a second layer without a bias is left so: the quantized checkpoint keeps the model's structure
            if first_name not in stats or first.bias is None or second.bias is None or not relu:
                continue
            beta, gamma = stats[first_name]
            c = ((beta - 3.0 * gamma).clamp_min(0.0) / total[first_name]).to(first.bias.dtype)
            if not bool((c > 0).any()):
                continue
            first.bias.sub_(c)
            w = second.weight
            if isinstance(second, nn.Conv2d) and second.groups > 1:
                shift = w.reshape(w.shape[0], -1).sum(1) * c
            else:
                shift = w.reshape(w.shape[0], w.shape[1], -1).sum(2) @ c
            second.bias.add_(shift)
            absorbed.append((first_name, second_name))
    return fused, EqualizeResult([(a, b) for a, b, _ in pairs], passes, absorbed)
