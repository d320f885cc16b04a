"""Conv-BN / Linear-BN folding for inference and PTQ, and the module swap every transformation uses.

Which BatchNorm follows which layer is read from the traced graph (:func:`lit_quant.quant.graph.bn_pairs`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
WEIGHTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


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
