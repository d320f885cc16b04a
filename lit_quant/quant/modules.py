"""Quantized layers, built with ``from_float`` and turned back with ``to_float``.

* :class:`QuantConv2d`, :class:`QuantLinear` — subclasses of the float layers (same parameters, same
  ``isinstance``), with an optional weight quantizer, an optional output quantizer, and the accumulator
  width recorded for the integer engine;
* :class:`QuantOutput` — any module whose output is an integer tensor on a real backend (ReLU after a
  fused producer, residual ``Add``, average pooling, an unfolded BatchNorm, a ``QuantStub``) wrapped with
  an output quantizer;
* :class:`QuantFunctional` — torch.ao ``FloatFunctional`` (torchvision's quantizable models) with its
  output quantized.

Parameters are shared with the module passed to ``from_float`` (``prepare`` works on a copy), so a
prepared layer trains the same tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.quant.fake_quant import FakeQuantize, build_fake_quantize
from lit_quant.quant.spec import QuantSpec


def _maybe_quantizer(spec: QuantSpec | None, kind: str) -> FakeQuantize | None:
    return build_fake_quantize(spec, kind) if spec is not None and spec.enabled else None


class _QuantWeightLayer:
    """Shared part of :class:`QuantConv2d` and :class:`QuantLinear`."""

    _FLOAT: ClassVar[type[nn.Module]]
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quant: FakeQuantize | None
    act_quant: FakeQuantize | None
    accum_bits: int

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls, mod: nn.Module, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                   accum_bits: int = 32) -> Any:
        """Quantized layer sharing ``mod``'s parameters.

        Args:
            mod: the float layer (exact type ``nn.Conv2d`` / ``nn.Linear`` or a subclass).
            weight_spec: weight quantization (per channel along axis 0 for output channels); None = float.
            act_spec: output quantization; None when the output is not an integer tensor (a fused ReLU or an
                unfolded BatchNorm follows and quantizes instead).
            accum_bits: accumulator width for the integer engine (recorded, not simulated).
        """
        new = cls(**cls._float_args(mod), bias=mod.bias is not None, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new.weight_quant = _maybe_quantizer(weight_spec, "weight")
        new.act_quant = _maybe_quantizer(act_spec, "act")
        new.accum_bits = int(accum_bits)
        if new.weight_quant is not None:
            new.weight_quant.observer(mod.weight)  # weights are known now: qparams never lack data
        new.train(mod.training)
        return new

    def to_float(self) -> nn.Module:
        """The float layer with the same (shared) parameters."""
        mod = self._FLOAT(**self._float_args(self), bias=self.bias is not None, device="meta")  # type: ignore
        mod.weight, mod.bias = self.weight, self.bias
        return mod.train(self.training)  # type: ignore[attr-defined]

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the integer engine will see it (fake-quantized when enabled)."""
        return self.weight if self.weight_quant is None else self.weight_quant(self.weight)

    def _quant_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.act_quant is None else self.act_quant(y)


class QuantConv2d(_QuantWeightLayer, nn.Conv2d):
    """``Conv2d`` with fake-quantized weight and (optionally) output; see :meth:`from_float`."""

    _FLOAT = nn.Conv2d

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "kernel_size": mod.kernel_size,
                "stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups,
                "padding_mode": mod.padding_mode}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(self._conv_forward(x, self.quantized_weight(), self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", accum_bits={self.accum_bits}"


class QuantLinear(_QuantWeightLayer, nn.Linear):
    """``Linear`` with fake-quantized weight and (optionally) output; see :meth:`from_float`."""

    _FLOAT = nn.Linear

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        return {"in_features": mod.in_features, "out_features": mod.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(F.linear(x, self.quantized_weight(), self.bias))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", accum_bits={self.accum_bits}"


class QuantOutput(nn.Module):
    """``act_quant(module(*args))``: the wrapped module's output quantized per ``spec``."""

    def __init__(self, module: nn.Module, act_quant: FakeQuantize) -> None:
        super().__init__()
        self.module = module
        self.act_quant = act_quant

    @classmethod
    def from_float(cls, mod: nn.Module, act_spec: QuantSpec) -> QuantOutput:
        """Wrap ``mod`` (kept as ``.module``) with an output quantizer."""
        return cls(mod, build_fake_quantize(act_spec, "act"))

    def to_float(self) -> nn.Module:
        """The wrapped module."""
        return self.module

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.act_quant(self.module(*args, **kwargs))


class QuantFunctional(nn.Module):
    """Drop-in for torch.ao's ``FloatFunctional`` whose results are quantized by ``act_quant``.

    Implements the methods torchvision's quantizable models call: ``add``, ``add_relu``, ``add_scalar``,
    ``mul``, ``mul_scalar``, ``cat``, ``matmul``.
    """

    def __init__(self, act_quant: FakeQuantize, float_cls: type[nn.Module]) -> None:
        super().__init__()
        self.act_quant = act_quant
        self._float_cls = float_cls

    @classmethod
    def from_float(cls, mod: nn.Module, act_spec: QuantSpec) -> QuantFunctional:
        """Replacement for the ``FloatFunctional`` ``mod`` (which holds no state)."""
        return cls(build_fake_quantize(act_spec, "act"), type(mod))

    def to_float(self) -> nn.Module:
        """A fresh ``FloatFunctional``."""
        return self._float_cls()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("QuantFunctional is called through add / add_relu / mul / cat ..., not forward")

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act_quant(torch.add(x, y))

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act_quant(torch.relu(torch.add(x, y)))

    def add_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self.act_quant(torch.add(x, y))

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act_quant(torch.mul(x, y))

    def mul_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self.act_quant(torch.mul(x, y))

    def cat(self, x: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        return self.act_quant(torch.cat(x, dim=dim))

    def matmul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.act_quant(torch.matmul(x, y))


#: Float type -> quantized type for weighted layers (exact types; subclasses of these are swapped too).
WEIGHTED_QUANT: dict[type[nn.Module], type[_QuantWeightLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
