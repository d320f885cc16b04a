"""Small modules that make every operation of a model visible as a module.

Quantization swaps modules (``from_float``) instead of patching ``forward``; a residual ``x + y`` written
inline in ``forward`` cannot be swapped, so models in :mod:`lit_quant.models` express it as an
:class:`Add` module. Each use gets its own instance so that each tensor can get its own quantizer.
"""

from __future__ import annotations

import torch
from torch import nn


class Add(nn.Module):
    """Element-wise addition ``y = a + b`` as a module (the residual join of a ResNet block)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b
