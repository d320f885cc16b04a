"""Quantized layers, built with ``from_float`` and turned back with ``to_float``.

* :class:`QuantConv2d`, :class:`QuantLinear` — subclasses of the float layers (same parameters, same
  ``isinstance``), with an optional weight quantizer, an optional output quantizer, and the accumulator
  width (:func:`default_accum_bits` unless the plan sets one) that bounds its bias and the integer engine;
* :class:`QuantOutput` — any module whose output is an integer tensor on a real backend (an activation,
  a residual ``Add``, pooling, an unfolded BatchNorm, a ``QuantStub``) wrapped with an output quantizer.

Parameters are shared with the module passed to ``from_float`` (``prepare`` works on a copy), so a
prepared layer trains the same tensors.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.quant.fake_quant import FakeQuantize, LSQFakeQuantize, build_fake_quantize
from lit_quant.quant.functional import SCALE_EPS, fake_quantize
from lit_quant.quant.fuse import bn_factor, fold_bn_weights
from lit_quant.quant.spec import QuantSpec

#: Accumulator width of a layer whose weight and input are both at most 8 bits: int32, as in gemmlowp,
#: fbgemm, QNNPACK and TFLite's int8 kernels.
NARROW_ACCUM_BITS = 32
#: Accumulator width of a layer with a wider weight or input: int64, as TFLite's 16x8 kernels (int16
#: activations, int8 weights) accumulate and store their biases.
WIDE_ACCUM_BITS = 64


def default_accum_bits(weight_bits: int | None, input_bits: int | None) -> int:
    """The accumulator a deployment gives a layer with ``weight_bits`` weights and ``input_bits`` inputs
    (None: float), when the plan names none: 32 bits if both are at most 8, else 64.

    A product of a ``b_w``-bit and a ``b_x``-bit integer needs ``b_w + b_x - 1`` bits, a sum of ``K`` of them
    ``log2 K`` more: 8-bit operands leave int32 room for ``K = 2^16`` products; 16-bit ones overflow it at
    ``K = 1``. The bias shares the accumulator's grid ``s_x s_w``, so at 16-bit scales a 32-bit register
    also saturates ordinary biases (``|b| > 2^31 s_x s_w``, about 0.1-0.5 on a ResNet-20).
    """
    return WIDE_ACCUM_BITS if max(weight_bits or 0, input_bits or 0) > 8 else NARROW_ACCUM_BITS


def signed_range(bits: int) -> tuple[int, int]:
    """``[-2^(bits-1), 2^(bits-1) - 1]``: a ``bits``-wide two's-complement register (an accumulator)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def bias_range(accum_bits: int) -> tuple[int, int]:
    """Integer range of a bias on the accumulator grid: an int32 register, or the accumulator's width when
    that is wider (a narrower accumulator still adds an int32 bias and saturates the sum)."""
    return signed_range(max(NARROW_ACCUM_BITS, accum_bits))


def _maybe_quantizer(spec: QuantSpec | None, kind: str) -> FakeQuantize | None:
    return build_fake_quantize(spec, kind) if spec is not None and spec.enabled else None


def _lsq_weight_init(fq: FakeQuantize, weight: torch.Tensor) -> None:
    """LSQ's own initial step size for a symmetric weight quantizer with ``minmax`` ranges (Esser et al.
    2020, sec. 2.1): ``s = 2 * mean(|w|) / sqrt(Q_P)`` (per output channel when per-channel).

    The min/max step (``max|w| / Q_P``) rounds most weights to 0 at 2-3 bits, where LSQ is meant to be
    used; a learned scale then starts from a collapsed network. A clipping observer (``mse``: the range of
    least squared error, per channel) is a better start and is kept, as are other quantizers' ranges.
    """
    if not isinstance(fq, LSQFakeQuantize) or fq.spec.scheme != "sym" or fq.spec.observer != "minmax":
        return
    w = weight.detach().float()
    mean_abs = w.abs().mean() if fq.axis is None else w.abs().transpose(0, fq.axis).reshape(w.shape[fq.axis], -1).mean(1)
    scale = (2.0 * mean_abs / math.sqrt(fq.spec.quant_max)).clamp_min(SCALE_EPS).reshape(-1)
    fq.set_qparams(scale, torch.zeros_like(scale, dtype=torch.int32))


class QuantWeightLayer:
    """Shared part of :class:`QuantConv2d` and :class:`QuantLinear`."""

    _FLOAT: ClassVar[type[nn.Module]]
    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quant: FakeQuantize | None
    act_quant: FakeQuantize | None
    accum_bits_setting: int | None  # the plan's width; None: default_accum_bits of the operands

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_float(cls, mod: nn.Module, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                   accum_bits: int | None = None, **extra: Any) -> Any:
        """Quantized layer sharing ``mod``'s parameters.

        Args:
            mod: the float layer (exact type ``nn.Conv2d`` / ``nn.Linear`` or a subclass).
            weight_spec: weight quantization (per channel along axis 0 for output channels); None = float.
            act_spec: output quantization; None when the output is not an integer tensor (a fused ReLU or an
                unfolded BatchNorm follows and quantizes instead).
            accum_bits: accumulator width (the integer engine's; the bias saturates at it, see
                :func:`bias_range`); None: :func:`default_accum_bits` of the weight and input widths.
            extra: modules the subclass folds in (``bn=`` for :class:`QuantConvBn2d`).
        """
        new = cls(**cls._float_args(mod), bias=mod.bias is not None, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new._attach(**extra)
        new.weight_quant = _maybe_quantizer(weight_spec, "weight")
        new.act_quant = _maybe_quantizer(act_spec, "act")
        new.accum_bits_setting = None if accum_bits is None else int(accum_bits)
        if new.weight_quant is not None:
            w = new.float_weight().detach()
            new.weight_quant.observer(w)  # weights are known now: qparams never lack data
            _lsq_weight_init(new.weight_quant, w)
        new.train(mod.training)
        return new

    @property
    def accum_bits(self) -> int:
        """Accumulator width: the plan's, else :func:`default_accum_bits` of the weight and the linked input."""
        if self.accum_bits_setting is not None:
            return self.accum_bits_setting
        fx, fw = self.input_quantizer(), self.weight_quant
        return default_accum_bits(fw.spec.bits if fw is not None else None, fx.spec.bits if fx is not None else None)

    def _attach(self) -> None:
        """Extra modules a subclass takes in :meth:`from_float` (keyword arguments after ``accum_bits``)."""

    def to_float(self) -> nn.Module:
        """The float layer with the same (shared) parameters."""
        mod = self._FLOAT(**self._float_args(self), bias=self.bias is not None, device="meta")  # type: ignore
        mod.weight, mod.bias = self.weight, self.bias
        return mod.train(self.training)  # type: ignore[attr-defined]

    def float_weight(self) -> torch.Tensor:
        """The float weight the weight quantizer sees (the deployed layer's weight)."""
        return self.weight

    def set_float_weight(self, w: torch.Tensor) -> None:
        """Make :meth:`float_weight` equal ``w`` (a weight rounded elsewhere, e.g. by GPTQ)."""
        with torch.no_grad():
            self.weight.copy_(w)

    def shift_bias(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to :meth:`float_bias` (bias correction); the layer must have a bias."""
        with torch.no_grad():
            self.bias.add_(delta)  # type: ignore[union-attr]

    def float_bias(self) -> torch.Tensor | None:
        """The bias of the deployed layer (folded with the BatchNorm in :class:`QuantConvBn2d`)."""
        return self.bias

    def input_quantizer(self) -> FakeQuantize | None:
        """The quantizer of this layer's input, linked by ``prepare`` (None: unknown or a float input)."""
        linked = self.__dict__.get("_input_quant")
        return linked[0] if linked else None

    def link_input_quantizer(self, fq: FakeQuantize | None) -> None:
        """Record ``fq`` as the quantizer of this layer's input (None: a float input), for
        :meth:`deployed_bias`. Held in a plain list, so the quantizer stays owned by its producer and is not a
        submodule (nor a state-dict entry) of this layer."""
        self.__dict__["_input_quant"] = [fq] if fq is not None else []

    def deployed_bias(self) -> torch.Tensor | None:
        """The bias as an integer deployment adds it: an integer on the accumulator's grid ``s_x s_w``,

            b_hat = clamp(round(b / (s_x s_w)), bias_range(accum_bits)) * s_x s_w    (per output channel
                                                                                   with per-channel weights)

        (Jacob et al. 2018, sec. 2.4; the integer engine's ``q_b``), once both the input and the weight are
        fake-quantized; otherwise the float bias. Straight-through gradient to ``b``. The rounding moves a
        layer's output by at most half an accumulator unit, but those rare one-step flips compounded
        through a network were most of the difference between the fake-quant model and the integer engine.
        """
        return self._on_accumulator_grid(self.float_bias())

    def _on_accumulator_grid(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`deployed_bias` of a given float bias ``b`` (callers that already hold it)."""
        fx, fw = self.input_quantizer(), self.weight_quant
        if b is None or fx is None or fw is None or fx.scale.numel() != 1:
            return b
        if not (bool(fx.fake_quant_enabled) and bool(fx.qparams_valid) and bool(fw.fake_quant_enabled)
                and bool(fw.qparams_valid)):
            return b
        acc_scale = (fx.scale.detach() * fw.scale.detach()).reshape(-1)
        return fake_quantize(b, acc_scale, torch.zeros_like(acc_scale, dtype=torch.int32), *bias_range(self.accum_bits),
                             0 if acc_scale.numel() > 1 else None)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the integer engine will see it (fake-quantized when enabled)."""
        w = self.float_weight()
        return w if self.weight_quant is None else self.weight_quant(w)

    def refresh_weight_qparams(self) -> None:
        """Weight qparams from the current weight (after an optimizer step moved it); learned LSQ scales stay."""
        fq = self.weight_quant
        if fq is None or isinstance(fq, LSQFakeQuantize):
            return
        fq.observer.reset()
        fq.observer(self.float_weight().detach())
        fq.update_qparams()

    def _quant_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.act_quant is None else self.act_quant(y)


class QuantConv2d(QuantWeightLayer, nn.Conv2d):
    """``Conv2d`` with fake-quantized weight and (optionally) output; see :meth:`from_float`."""

    _FLOAT = nn.Conv2d

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        return {"in_channels": mod.in_channels, "out_channels": mod.out_channels, "kernel_size": mod.kernel_size,
                "stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation, "groups": mod.groups,
                "padding_mode": mod.padding_mode}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(self._conv_forward(x, self.quantized_weight(), self.deployed_bias()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", accum_bits={self.accum_bits}"


def _plain_batch_norm(bn: nn.Module) -> bool:
    """Whether :func:`_rescaled_batch_norm` can stand in for ``bn``: a single-process BatchNorm that tracks
    running statistics (a SyncBatchNorm must run its own cross-rank reduction)."""
    return (isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, nn.SyncBatchNorm)
            and bn.track_running_stats and bn.running_mean is not None)


class _RescaledBatchNormFn(torch.autograd.Function):
    """Training-mode BatchNorm of ``z / f`` computed on ``z``, with the exact value and gradient.

    Per channel, ``BN(z / f) = gamma (z/f - mean(z)/f) / sqrt(var(z)/f^2 + eps) + beta
    = |gamma| (z - mean(z)) / sqrt(var(z) + eps f^2) + beta`` (``f = gamma / sqrt(running_var + eps)``
    has the sign of ``gamma``). So the division by ``f`` folds into the normalisation: ATen's statistics
    pass over ``z``, its inference pass with the batch statistics, and its fused BatchNorm backward with
    the per-channel ``invstd = 1 / sqrt(var + eps f^2)``, instead of a multiply over the activation and its
    two-pass backward on top of BatchNorm's. Gradients: ``z``, ``|gamma|`` and ``beta`` from
    ``native_batch_norm_backward``; through ``eps f^2``, ``dL/df = -eps f |gamma| dL/d|gamma| invstd^2``
    (``dL/dinvstd = |gamma| dL/d|gamma| / invstd``).
    """

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, factor: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # ATen's BatchNorm statistics kernel (biased variance; torch.var_mean over (0, 2, 3) is 4x slower
        # on CPU), then its inference kernel with the batch statistics and the per-channel epsilon
        mean, var = torch.batch_norm_update_stats(z, None, None, 0.0)
        var_eps = var + eps * factor * factor
        out = F.batch_norm(z, mean, var_eps, weight, beta, training=False, eps=0.0)
        invstd = torch.rsqrt(var_eps)
        ctx.save_for_backward(z, weight, mean, invstd, factor)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor, _gm: torch.Tensor, _gv: torch.Tensor
                 ) -> tuple[torch.Tensor | None, ...]:
        z, weight, mean, invstd, factor = ctx.saved_tensors
        grad_z, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_out.contiguous(), z, weight, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], True, ctx.needs_input_grad[2]])
        grad_f = -ctx.eps * factor * weight * grad_w * invstd * invstd if ctx.needs_input_grad[3] else None
        return grad_z, grad_w, grad_b, grad_f, None


def _rescaled_batch_norm(z: torch.Tensor, factor: torch.Tensor, bias: torch.Tensor | None,
                         bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``bn(z / f + bias)`` in training mode, running statistics updated as ``bn`` would (see
    :class:`_RescaledBatchNormFn`); the conv ``bias`` cancels in the batch mean and only moves
    ``running_mean``. ``z`` is taken in fp32, as the rescale by the fp32 ``f`` would promote it."""
    z = z.float()
    gamma = bn.weight if bn.affine else torch.ones_like(factor)
    beta = bn.bias if bn.affine else torch.zeros_like(factor)
    out, mean, var = _RescaledBatchNormFn.apply(z, gamma.abs(), beta, factor, bn.eps)
    with torch.no_grad():
        # nn.BatchNorm's update: momentum, or the cumulative average when momentum is None
        bn.num_batches_tracked.add_(1)
        m = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        n = z.numel() // z.shape[1]
        f = factor.detach()
        batch_mean = mean / f + (0.0 if bias is None else bias.detach())
        bn.running_mean.lerp_(batch_mean.to(bn.running_mean.dtype), m)
        bn.running_var.lerp_((var / (f * f) * (n / max(n - 1, 1))).to(bn.running_var.dtype), m)
    return out


class QuantConvBn2d(QuantConv2d):
    """Conv2d + BatchNorm2d for QAT with the BatchNorm folded into the quantized weight as it trains.

    Simulated folding (Jacob et al. 2018, sec. 3.2; Krishnamoorthi 2018, sec. 3.2.2; torch.ao's
    ``ConvBn2d``): with ``f = gamma / sqrt(running_var + eps)`` the quantized weight is ``q(w * f)``, the
    weight the deployed (folded) layer has. While BatchNorm trains, the convolution with it is divided back
    by ``f`` and BatchNorm applies batch statistics (and updates its running ones)::

        y = bn_batch(conv(x, q(w f)) / f + b)          # training, BN not frozen

    which is the float Conv-BN's output up to weight quantization; the division by the *running* factor is
    the running-statistics correction that keeps the quantized weight on the deploy grid. In eval mode or
    with BN frozen the layer is exactly the folded one::

        y = conv(x, q(w f)) + (b - running_mean) f + beta

    ``to_float()`` returns that folded Conv2d. ``bn`` stays a real BatchNorm module, so Lightning's
    ``sync_batchnorm`` turns it into a SyncBatchNorm under DDP.
    """

    bn: nn.modules.batchnorm._BatchNorm

    def _attach(self, bn: nn.modules.batchnorm._BatchNorm | None = None) -> None:
        """``from_float(conv, ..., bn=bn)``: the BatchNorm that follows ``conv`` (shared, not copied)."""
        if bn is None:
            raise ValueError("QuantConvBn2d needs the BatchNorm that follows the convolution (bn=...)")
        self.bn = bn
        if self.bias is not None:
            # A conv bias before BatchNorm cancels in the batch mean: it would get no gradient (an unused
            # parameter under DDP). It moves into the running mean, m' = m - b, which leaves the folded bias
            # (b - m) f + beta = (0 - m') f + beta, and so eval and deployment, unchanged.
            with torch.no_grad():
                bn.running_mean.sub_(self.bias.detach().to(bn.running_mean.dtype))
            self.bias = None
        self.register_buffer("bn_frozen", torch.tensor(False, device=bn.running_var.device))

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed layer's ``(w * f, (b - running_mean) * f + beta)``."""
        return fold_bn_weights(self.weight, self.bias, self.bn)

    def float_weight(self) -> torch.Tensor:
        """The folded weight ``w * f`` (running statistics), which is what gets quantized and deployed."""
        return self._folded()[0]

    def set_float_weight(self, w: torch.Tensor) -> None:
        """Make the folded weight ``w * f`` equal ``w``: the parameter becomes ``w / f``."""
        with torch.no_grad():
            self.weight.copy_(w / bn_factor(self.bn).reshape(-1, 1, 1, 1))

    def shift_bias(self, delta: torch.Tensor) -> None:
        """Add ``delta`` to the folded bias ``(b - running_mean) f + beta``: through ``beta``, or through the
        running mean (``-delta / f``) of a BatchNorm without affine parameters."""
        with torch.no_grad():
            if self.bn.affine:
                self.bn.bias.add_(delta.to(self.bn.bias.dtype))
            else:
                self.bn.running_mean.sub_((delta / bn_factor(self.bn)).to(self.bn.running_mean.dtype))

    def float_bias(self) -> torch.Tensor:
        """The folded bias ``(b - running_mean) f + beta``."""
        return self._folded()[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.bn_frozen):
            factor = bn_factor(self.bn)
            w = self.weight * factor.reshape(-1, 1, 1, 1)
            wq = w if self.weight_quant is None else self.weight_quant(w)
            z = self._conv_forward(x, wq, None)
            if _plain_batch_norm(self.bn) and z.is_cpu:
                return self._quant_output(_rescaled_batch_norm(z, factor, self.bias, self.bn))
            # SyncBatchNorm (DDP), BatchNorms without running statistics, and accelerators (the statistics
            # kernel's output is verified on CPU only): the module itself normalises z / f, so its own
            # reduction (the all-reduce of batch statistics) is the one that runs
            y = z * torch.reciprocal(factor).reshape(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
            return self._quant_output(self.bn(y))
        w, b = self._folded()
        wq = w if self.weight_quant is None else self.weight_quant(w)
        return self._quant_output(self._conv_forward(x, wq, self._on_accumulator_grid(b)))

    def to_float(self) -> nn.Module:
        """The folded Conv2d (running statistics), with new parameters."""
        mod = nn.Conv2d(**self._float_args(self), bias=True, device=self.weight.device)
        with torch.no_grad():
            w, b = self._folded()
            mod.weight.copy_(w)
            mod.bias.copy_(b)
        return mod.train(self.training)


def refresh_weight_qparams(model: nn.Module) -> None:
    """Every quantized layer's weight qparams from its current weight (end of QAT, before evaluating)."""
    for module in model.modules():
        if isinstance(module, QuantWeightLayer):
            module.refresh_weight_qparams()


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """QAT: stop (or restart) BatchNorm statistics in every :class:`QuantConvBn2d`; frozen layers compute
    the folded deploy form with running statistics (torchvision's ``freeze_bn_stats`` step)."""
    for module in model.modules():
        if isinstance(module, QuantConvBn2d):
            module.bn_frozen.fill_(bool(frozen))


class QuantLinear(QuantWeightLayer, nn.Linear):
    """``Linear`` with fake-quantized weight and (optionally) output; see :meth:`from_float`."""

    _FLOAT = nn.Linear

    @staticmethod
    def _float_args(mod: nn.Module) -> dict[str, Any]:
        return {"in_features": mod.in_features, "out_features": mod.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant_output(F.linear(x, self.quantized_weight(), self.deployed_bias()))

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
        if type(self.module) is nn.ReLU and len(args) == 1 and not kwargs:
            # the quantizer applies the ReLU in its own pass (forward and backward): same values, two passes
            # fewer each way; an in-place ReLU's input is then left as it was (nothing here reads it again)
            return self.act_quant(args[0], relu=True)
        return self.act_quant(self.module(*args, **kwargs))


#: Float type -> quantized type for weighted layers (exact types; subclasses of these are swapped too).
WEIGHTED_QUANT: dict[type[nn.Module], type[QuantWeightLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
