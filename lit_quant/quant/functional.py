"""Pure quantization math: qparams from a range, quantize, dequantize, fake quantize (STE and LSQ).

Every observer computes its range and hands it to :func:`calculate_qparams`; every quantizer module calls
:func:`fake_quantize` or :func:`lsq_fake_quantize`. Nothing else in the package does this arithmetic.

Conventions (identical to torch.ao so results compare with ``atol=0``)::

    inv_scale = 1 / scale                                   (float32)
    q         = clamp(round_half_even(x * inv_scale) + zero_point, quant_min, quant_max)
    x_hat     = (q - zero_point) * scale                    (fake quantize = dequantize(quantize(x)))

Integer values only ever leave :func:`quantize` inside a :class:`QuantizedTensor` that carries its scale
and zero point, and :func:`fake_quantize` always maps them back through the scale — the failure of using
raw integers as float weights cannot be expressed with this API.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch

from lit_quant.quant.errors import CalibrationError, QuantConfigError
from lit_quant.quant.kernels import available as kernels_available
from lit_quant.quant.kernels import fused_fake_quantize, fused_lsq_backward
from lit_quant.quant.spec import QuantSpec

#: Smallest scale: torch.ao's ``eps`` (float32 machine epsilon); keeps ``1 / scale`` finite.
SCALE_EPS = torch.finfo(torch.float32).eps


def calculate_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range ``[min_val, max_val]`` (element-wise, so per-channel works too).

    The range is first widened to contain zero, ``min = min(min_val, 0)``, ``max = max(max_val, 0)``, so
    that 0.0 (padding, ReLU output) is exactly representable. Then, with ``qmin, qmax`` from ``spec``:

    * ``sym``: ``scale = max(|min|, max) / ((qmax - qmin) / 2)``, ``zero_point = 0``. With the full signed
      range that is ``amax / 127.5`` at 8 bits (torch.ao's ``per_tensor_symmetric`` with ``qint8``); with
      ``narrow_range`` it is ``amax / 127``.
    * ``asym_u`` / ``asym_s``: ``scale = (max - min) / (qmax - qmin)``,
      ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.

    Edge cases: ``scale`` is clamped to at least :data:`SCALE_EPS`, so ``min == max == 0`` gives
    ``scale = eps`` and (affine) ``zero_point = qmin``; an all-positive range has ``min = 0`` hence
    ``zero_point = qmin``; an all-negative one ``zero_point = qmax``. The arithmetic is float32 in the same
    order as torch.ao's ``UniformQuantizationObserverBase._calculate_qparams``, so results match bit for bit.

    Args:
        min_val: range minimum, shape ``(1,)`` per tensor or ``(C,)`` per channel (any shape broadcasts).
        max_val: range maximum, same shape.
        spec: an enabled :class:`QuantSpec` (bits, scheme, narrow range).

    Returns:
        ``(scale, zero_point)``: float32 and int32 tensors shaped like ``min_val``.

    Raises:
        CalibrationError: non-finite bounds or ``min_val > max_val``.
    """
    min_val = min_val.detach().to(torch.float32)
    max_val = max_val.detach().to(torch.float32)
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise CalibrationError(f"cannot compute qparams from a non-finite range [{min_val}, {max_val}]")
    if bool((min_val > max_val).any()):
        raise CalibrationError(f"range minimum above maximum: [{min_val}, {max_val}]")
    qmin, qmax = spec.quant_min, spec.quant_max
    zeros = torch.zeros_like(min_val)
    min_neg = torch.minimum(min_val, zeros)
    max_pos = torch.maximum(max_val, zeros)
    if spec.scheme == "sym":
        amax = torch.maximum(-min_neg, max_pos)
        scale = torch.clamp_min(amax / (float(qmax - qmin) / 2), SCALE_EPS)
        zero_point = torch.zeros_like(min_val, dtype=torch.int32)
    else:
        scale = torch.clamp_min((max_pos - min_neg) / float(qmax - qmin), SCALE_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale).to(torch.int32), qmin, qmax)
    return scale, zero_point.to(torch.int32)


@dataclass(frozen=True)
class QParams:
    """Everything an exporter needs to rebuild one quantized tensor.

    Attributes:
        scale: float32, shape ``(1,)`` or ``(C,)``.
        zero_point: int32, same shape.
        quant_min, quant_max: integer range.
        axis: channel axis for per-channel qparams, ``None`` per tensor.
        bits, scheme: from the spec (``signed`` tells int8 from uint8 storage).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None
    bits: int
    scheme: str

    @property
    def signed(self) -> bool:
        """True when the integers are stored signed (``sym`` / ``asym_s``)."""
        return self.scheme != "asym_u"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports and YAML: lists of floats / ints."""
        return {"scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(), "quant_min": self.quant_min,
                "quant_max": self.quant_max, "axis": self.axis, "bits": self.bits, "scheme": self.scheme}


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers plus the qparams that give them meaning; :func:`dequantize` is the only way back to float."""

    int_repr: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None


def _broadcast(param: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Reshape per-channel ``param`` of shape ``(C,)`` to broadcast against ``x`` along ``axis``."""
    if axis is None:
        return param
    if x.dim() <= axis:
        raise QuantConfigError(f"per-channel quantization along axis {axis} needs a tensor with more than {axis} "
                               f"dimension(s); got shape {tuple(x.shape)}")
    shape = [1] * x.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _round_clamp(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 ``q = clamp(round(x / scale) + zp)``; also the unclamped ``round(x / scale)`` and ``x / scale``.

    ``x / scale`` is computed as ``x * (1 / scale)`` like torch's kernels, which is what makes the results
    bit-identical to ``torch.fake_quantize_per_tensor_affine``.
    """
    scaled = x * torch.reciprocal(scale)
    rounded = torch.round(scaled)
    q = torch.clamp(rounded + zero_point, quant_min, quant_max)
    return q, rounded, scaled


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
             axis: int | None = None) -> QuantizedTensor:
    """``q = clamp(round(x / scale) + zero_point, quant_min, quant_max)`` as int32, wrapped with its qparams."""
    s, z = _broadcast(scale.float(), x, axis), _broadcast(zero_point.float(), x, axis)
    q, _, _ = _round_clamp(x.float(), s, z, quant_min, quant_max)
    return QuantizedTensor(q.to(torch.int32), scale, zero_point, quant_min, quant_max, axis)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """``x_hat = (q - zero_point) * scale`` in float32."""
    s = _broadcast(qt.scale.float(), qt.int_repr, qt.axis)
    z = _broadcast(qt.zero_point.float(), qt.int_repr, qt.axis)
    return (qt.int_repr.float() - z) * s


def _f32(v: float) -> float:
    """``v`` rounded to the nearest float32 (round half to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _f32_step(v: float, up: bool) -> float:
    """The float32 next to the float32 ``v``, towards +inf (``up``) or -inf (finite ``v``)."""
    bits = struct.unpack("<i", struct.pack("<f", v))[0]
    if v == 0.0:
        return _f32(1e-45 if up else -1e-45)
    bits += 1 if (v > 0) == up else -1
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _ste_interval(inv: float, lo: float, hi: float) -> tuple[float, float]:
    """The float32 values just below and just above ``{x : lo <= round(fl32(x * inv)) <= hi}``.

    ``x * inv`` of two float32 values is exact in float64, so ``_f32(x * inv)`` is the float32 product
    torch computes, and Python's ``round`` is round half to even like ``torch.round``: the predicate is the
    forward's own. It is monotone in ``x`` (``inv > 0``), so the set is one interval ``[x_lo, x_hi]``; each
    end starts at the float32 nearest ``(bound -/+ 1/2) / inv`` and walks a few ulps until the predicate
    flips. Returns ``(prev(x_lo), next(x_hi))``, the open bounds of ``hardtanh_backward``.
    """
    inv = _f32(inv)

    def inside(x: float) -> bool:
        return lo <= round(_f32(x * inv)) <= hi

    def edge(start: float, up: bool) -> float:
        # the last float32 inside the interval walking towards +inf (up) or -inf from near its end
        x = _f32(start)
        while not inside(x):
            x = _f32_step(x, not up)
        while inside(nxt := _f32_step(x, up)):
            x = nxt
        return x

    x_lo, x_hi = edge((lo - 0.5) / inv, up=False), edge((hi + 0.5) / inv, up=True)
    return _f32_step(x_lo, up=False), _f32_step(x_hi, up=True)


def _store_range(observed: torch.Tensor, x: torch.Tensor) -> None:
    """``observed[:] = (min x, max x)`` (NaN propagates), for callers that asked for the range."""
    lo, hi = torch.aminmax(x.detach())
    observed.copy_(torch.stack([lo, hi]).float())


class _FakeQuantizeSTE(torch.autograd.Function):
    """Fake quantization; backward is the clipped straight-through estimator (see :func:`fake_quantize`).

    QAT spends much of a step here. Per tensor on the CPU the forward is one pass of the fused kernel
    (:mod:`lit_quant.quant.kernels`); otherwise it runs in place on one buffer, which is several times faster
    than torch's ``fake_quantize_per_tensor_affine`` kernel on CPU. Both give torch's bits (tested). The zero
    point moves into the clamp bounds, ``(clamp(r + z, qmin, qmax) - z) s = clamp(r, qmin - z, qmax - z) s`` with
    ``r = round(x / s)`` (exact in float32 for integers below 2^24).

    Per tensor on the CPU, scale and bounds are Python scalars (an in-place multiply by a one-element tensor
    is about 3x slower than by a scalar) and nothing but ``x`` is saved: ``lo <= round(fl(x * inv)) <= hi``
    holds exactly on a float interval ``[x_lo, x_hi]`` of ``x`` (both steps are monotone), whose ends
    :func:`_ste_interval` finds once per call in float32 arithmetic, so backward is one fused
    ``hardtanh_backward`` pass over ``x`` and the gradient. Comparisons into a bool mask and a float-by-bool
    multiply cost about 1 ms and 4 ms per 1.6M values on this CPU. Per channel (weights, small) and on CUDA
    (no host sync for ``float(scale)``) a bool mask is saved and applied with ``torch.where``; there the
    wrapper applies ``relu`` and takes the range before calling.

    ``relu`` (per tensor on the CPU): quantize ``relu(x)`` without computing it. ``round`` is monotone with
    ``round(0) = 0`` and ``lo <= 0``, so ``clamp(round(relu(x) / s), lo, hi) = clamp(round(x / s), max(lo, 0), hi)``
    (``-0.0`` where ``relu`` gives ``0.0``, equal as numbers), and the gradient of both steps together passes
    exactly where ``max(x_lo', 0) < x < x_hi'``: one ``hardtanh_backward`` on ``x`` replaces ReLU's forward
    and backward passes. ``observed``: receives ``(min, max)`` of the quantized input from the same pass.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                quant_max: int, relu: bool = False, observed: torch.Tensor | None = None) -> torch.Tensor:
        ctx.scalars = None
        if _per_tensor_cpu(x, scale):
            inv, z = float(torch.reciprocal(scale)), float(zero_point)
            lo, hi = quant_min - z, quant_max - z
            if relu:
                lo = max(lo, 0.0)
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(x)
                below, above = _ste_interval(inv, lo, hi)
                ctx.scalars = (max(below, 0.0) if relu else below, above)
            out = fused_fake_quantize(x, inv, lo, hi, float(scale), observed)  # one pass instead of four
            if out is None:
                if observed is not None:
                    _store_range(observed, x)
                out = torch.mul(x, inv).round_().clamp_(lo, hi).mul_(float(scale))  # round(x / s), clamp, * s
            if observed is not None and relu:
                observed.clamp_min_(0.0)  # the range of relu(x)
            return out
        assert not relu and observed is None, "the wrapper applies relu and takes the range off the fast path"
        r = torch.mul(x, torch.reciprocal(scale)).round_()
        lo_t, hi_t = quant_min - zero_point, quant_max - zero_point
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward((r >= lo_t) & (r <= hi_t))
        return r.clamp_(lo_t, hi_t).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (saved,) = ctx.saved_tensors
        if ctx.scalars is None:
            return torch.where(saved, grad, 0.0), None, None, None, None, None, None
        below, above = ctx.scalars  # the floats just outside [x_lo, x_hi]: hardtanh_backward's open bounds
        return torch.ops.aten.hardtanh_backward(grad, saved, below, above), None, None, None, None, None, None


class _FakeQuantizeLSQ(torch.autograd.Function):
    """Fake quantization with the LSQ gradient for the scale (see :func:`lsq_fake_quantize`).

    Per tensor on the CPU with the kernels built, forward is the STE's one-pass kernel and backward one
    pass of :func:`lit_quant.quant.kernels.fused_lsq_backward` over the saved ``x`` (``relu`` and
    ``observed`` as in :class:`_FakeQuantizeSTE`); otherwise the eager ops below, which save a mask and
    the scale gradient's per-element factor.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                quant_max: int, grad_factor: float, relu: bool = False,
                observed: torch.Tensor | None = None) -> torch.Tensor:
        ctx.scale_shape = scale.shape
        ctx.grad_factor = grad_factor
        ctx.fused = None
        if _per_tensor_cpu(x, scale) and kernels_available():
            inv, z = float(torch.reciprocal(scale)), float(zero_point)
            lo, hi = quant_min - z, quant_max - z
            out = fused_fake_quantize(x, inv, max(lo, 0.0) if relu else lo, hi, float(scale), observed)
            assert out is not None  # kernels loaded, float32 CPU x: the kernel ran
            if observed is not None and relu:
                observed.clamp_min_(0.0)
            ctx.save_for_backward(x)
            ctx.fused = (inv, lo, hi, relu)
            return out
        assert not relu and observed is None, "the wrapper applies relu and takes the range off the fast path"
        q, rounded, scaled = _round_clamp(x, scale, zero_point, quant_min, quant_max)
        unclamped = rounded + zero_point
        below, above = unclamped < quant_min, unclamped > quant_max
        inside = ~(below | above)
        # d x_hat / d scale: round(x/s) - x/s inside the range, the clamp bound (minus zp) outside it.
        dscale = torch.where(inside, rounded - scaled, torch.where(below, quant_min - zero_point,
                                                                   quant_max - zero_point))
        ctx.save_for_backward(inside, dscale)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        if ctx.fused is not None:
            (x,) = ctx.saved_tensors
            result = fused_lsq_backward(grad.float(), x, *ctx.fused)
            assert result is not None  # the kernels that ran forward are loaded
            dx, dscale = result
            grad_scale = (dscale * ctx.grad_factor).float().reshape(ctx.scale_shape)
            return dx.view(grad.shape), grad_scale, None, None, None, None, None, None
        inside, dscale = ctx.saved_tensors
        grad_scale = (grad * dscale).sum_to_size(ctx.scale_shape) * ctx.grad_factor
        # torch.where, not grad * inside: a float-by-bool multiply is several times slower on CPU
        return torch.where(inside, grad, 0.0), grad_scale, None, None, None, None, None, None


def _in_float32(fn: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """Run ``fn`` on ``x`` cast to float32 and cast the result back (bf16 / fp16 / autocast inputs)."""
    if x.dtype == torch.float32:
        return fn(x, *args)
    return fn(x.float(), *args).to(x.dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                  axis: int | None = None, *, relu: bool = False, observed: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Quantize and dequantize: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``, differentiable.

    Forward equals ``torch.fake_quantize_per_tensor_affine`` (``axis=None``) or
    ``torch.fake_quantize_per_channel_affine`` bit for bit. Computation is float32 whatever the input dtype
    (bf16 / fp16 / autocast): ``x`` is cast up, quantized, and the result cast back.

    Gradient (documented choice, the same as torch.ao): straight-through on rounding, so ``d x_hat / d x = 1``
    where ``round(x / s) + z`` lies in ``[qmin, qmax]``, and ``0`` where the value is clamped — a clipped value
    does not move when ``x`` moves, and zeroing its gradient keeps QAT from pushing weights or activations
    further into saturation. ``scale`` and ``zero_point`` receive no gradient (use :func:`lsq_fake_quantize`).

    Args:
        x: tensor to fake-quantize.
        scale: float32, shape ``(1,)`` per tensor or ``(C,)`` per channel.
        zero_point: int or float tensor, same shape.
        quant_min, quant_max: integer range.
        axis: channel axis of ``x`` for per-channel qparams; ``None`` per tensor.
        relu: fake-quantize ``relu(x)`` (values and gradient as ``fake_quantize(torch.relu(x))``; per tensor
            on the CPU without computing ``relu(x)``, see :class:`_FakeQuantizeSTE`).
        observed: a float32 tensor of 2 elements on ``x``'s device that receives ``(min, max)`` of the
            quantized input (of ``relu(x)`` with ``relu``; NaN when it holds a NaN), from the same pass per
            tensor on the CPU: an observer's statistics without a pass of its own.
    """
    s = _broadcast(scale.detach().float(), x, axis)
    z = _broadcast(zero_point.detach().float(), x, axis)
    relu, observed, x = _off_fast_path(x, _per_tensor_cpu(x, s), relu, observed)
    return _in_float32(_FakeQuantizeSTE.apply, x, s, z, quant_min, quant_max, relu, observed)


def _per_tensor_cpu(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether the autograd functions take their per-tensor CPU path (which fuses ``relu`` and the range)."""
    return s.numel() == 1 and x.device.type == "cpu"


def _off_fast_path(x: torch.Tensor, fast: bool, relu: bool, observed: torch.Tensor | None
                   ) -> tuple[bool, torch.Tensor | None, torch.Tensor]:
    """Off the fused path (``fast`` false: per channel, CUDA), apply ``relu`` and take the range here,
    eagerly; returns the ``relu`` / ``observed`` arguments left for the autograd function, and ``x``."""
    if fast:
        return relu, observed, x
    if relu:
        x = torch.relu(x)
    if observed is not None:
        _store_range(observed, x)
    return False, None, x


def lsq_grad_factor(x: torch.Tensor, quant_max: int, axis: int | None = None) -> float:
    """LSQ gradient scale ``g = 1 / sqrt(N * Q_P)`` (Esser et al. 2020), ``N`` = elements per scale."""
    n = x.numel() if axis is None else x.numel() // max(x.shape[axis], 1)
    return 1.0 / float(max(n, 1) * max(quant_max, 1)) ** 0.5


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                      quant_max: int, axis: int | None = None, grad_factor: float | None = None, *,
                      relu: bool = False, observed: torch.Tensor | None = None) -> torch.Tensor:
    """Fake quantization with a learnable step size (LSQ, Esser et al. 2020).

    Forward is :func:`fake_quantize` (same values). Backward: ``d x_hat / d x`` is the same clipped STE;
    ``d x_hat / d scale`` is ``round(x / s) - x / s`` inside the range, ``qmin - z`` below it and ``qmax - z``
    above it, summed over the elements sharing a scale and multiplied by ``grad_factor`` (default
    :func:`lsq_grad_factor`, ``1 / sqrt(N * qmax)``) so the step size learns at the rate of the weights. The
    zero point stays fixed (from calibration). Matches ``torch._fake_quantize_learnable_per_tensor_affine``.
    ``relu`` and ``observed`` as in :func:`fake_quantize` (per tensor on the CPU, one forward pass and one
    backward pass of :mod:`lit_quant.quant.kernels` when they are built).
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, quant_max, axis)
    s = _broadcast(scale.float(), x, axis)
    z = _broadcast(zero_point.detach().float(), x, axis)
    # the eager LSQ path (no kernels) has no fused relu or range
    relu, observed, x = _off_fast_path(x, _per_tensor_cpu(x, s) and kernels_available(), relu, observed)
    return _in_float32(_FakeQuantizeLSQ.apply, x, s, z, quant_min, quant_max, grad_factor, relu, observed)
