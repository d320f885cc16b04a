"""Small modules that make every tensor operation of a model visible as a module.

Quantization swaps modules (``from_float``) instead of patching ``forward``. A residual ``x + y``, a
``torch.cat`` or an ``F.relu`` written inline in ``forward`` has no module to swap, so
:func:`lit_quant.quant.graph.trace` rewrites each of them into a call of one of these modules (or of the
``torch.nn`` module that computes the same function), one instance per use so that each tensor gets its own
quantizer. Models in :mod:`lit_quant.app.models` use :class:`Add` directly.
"""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """Element-wise addition ``y = a + b`` as a module (the residual join of a ResNet block)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class Mul(nn.Module):
    """Element-wise product ``y = a * b`` of two tensors (a squeeze-excite scale, a gate)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class MatMul(nn.Module):
    """Matrix product ``y = a @ b`` of two activations (``torch.matmul`` / ``torch.bmm``: attention scores)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class Cat(nn.Module):
    """Concatenation ``torch.cat(tensors, dim)`` of the tensors passed as separate arguments."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return torch.cat(tensors, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Mean(nn.Module):
    """``x.mean(dim, keepdim)`` as a module (global average pooling written as a mean over H and W)."""

    def __init__(self, dim: int | tuple[int, ...], keepdim: bool = False) -> None:
        super().__init__()
        self.dim = tuple(dim) if isinstance(dim, (list, tuple)) else dim
        self.keepdim = keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"
