"""Integer-only reference engine (Jacob et al. 2018, "integer-arithmetic-only inference").

Runs a calibrated / QAT-trained model with integers only between the input quantizer and the output
dequantization, following :func:`lit_quant.deploy.graph.deploy_graph`:

* activations: ``n``-bit integers ``q`` with ``x = s (q - z)`` (the plan's activation specs);
* weights: ``n``-bit integers (BatchNorm folded), zero point ``z_w`` (0 for ``sym``);
* convolution / linear: ``acc = sum (q_x - z_x)(q_w - z_w) + q_b`` in an ``--accum-bits`` accumulator
  (default: each layer's, 32 bits for operands of at most 8 bits, else 64), with the bias at the
  accumulator's scale, ``q_b = round(b / (s_x s_w))``, in an int32 register (the accumulator's width when
  wider: :func:`lit_quant.quant.layers.bias_range`);
* requantization to the output scale by a fixed-point multiplier and a right shift:
  ``M = s_x s_w / s_y ~ M0 / 2^n`` with ``M0`` an integer of ``--scale-approx-bits`` bits (Distiller's
  ``--qe-scale-approx-bits``), ``q_y = clamp(((acc M0 + 2^(n-1)) >> n) + z_y, q_min, q_max)``;
* ReLU is the lower clamp bound ``z_y`` (ReLU6 also clamps at ``z_y + round(6 / s_y)``: the op table's
  range of each ReLU-like op);
* a residual add rescales both operands to a common fine scale ``max(s_a, s_b) / 2^20`` with fixed-point
  multipliers, adds, and requantizes; average pooling sums integers and folds ``1 / count`` into ``M``;
  a concatenation requantizes each input to the output grid;
* reshapes, permutes, slices and splits move integers; the engine computes only the op table's ops marked
  ``integer`` (ReLU / ReLU6, add, cat, average pooling): a model with Hardswish, SiLU, GELU, softmax,
  LayerNorm, mul or matmul is refused, naming the op.

Integer convolutions run as float64 convolutions of integer-valued tensors: every product and partial sum
is an integer below ``2^53`` (checked), so float64 holds them exactly — it is an exact integer container,
not an approximation (PyTorch has no int64 convolution on CPU). Accumulators outside the ``accum_bits``
range are counted per layer and saturated, as a saturating integer unit would.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.deploy.graph import ExportError, Step, act_qparams, deploy_graph, layer_weight
from lit_quant.deploy.options import DEFAULT_SCALE_APPROX_BITS
from lit_quant.quant.functional import QParams, quantize
from lit_quant.quant.layers import QuantWeightLayer, bias_range, signed_range
from lit_quant.quant.optable import OPS, op_of
from lit_quant.quant.preparation import QuantizedModel

#: Fixed-point multiplier widths accepted by ``--scale-approx-bits``: ``acc * M0`` must fit int64.
SCALE_APPROX_BITS = range(2, 32)
#: Accumulator widths accepted by ``--accum-bits``.
ACCUM_BITS = range(8, 65)
#: Extra fractional bits of the common scale of a residual add.
ADD_SHIFT = 20
_EXACT = 2 ** 53  # float64 holds every integer below this exactly


def check_engine_widths(accum_bits: int | None, scale_approx_bits: int) -> None:
    """:class:`ExportError` for an accumulator or multiplier width the engine cannot run."""
    if scale_approx_bits not in SCALE_APPROX_BITS:
        raise ExportError(f"--scale-approx-bits must be in {SCALE_APPROX_BITS.start}..{SCALE_APPROX_BITS.stop - 1} "
                          f"(the product acc * M0 must fit 64 bits), got {scale_approx_bits}")
    if accum_bits is not None and accum_bits not in ACCUM_BITS:
        raise ExportError(f"--accum-bits must be in {ACCUM_BITS.start}..{ACCUM_BITS.stop - 1}, got {accum_bits}")


def fixed_point(m: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``M ~ M0 / 2^n`` with ``M0`` an integer in ``[2^(bits-1), 2^bits)`` (full precision for ``bits``).

    ``n = bits - 1 - floor(log2 M)`` and ``M0 = round(M 2^n)`` (``M0`` becomes ``2^bits`` when rounding
    carries; then ``M0 / 2, n - 1``). ``n`` may be negative for ``M >= 2^bits`` (a left shift).
    Relative error at most ``2^-bits``. Element-wise for per-channel ``M``.
    """
    m = m.double()
    if bool((m <= 0).any()):
        raise ExportError("requantization multiplier must be positive (a zero or negative scale)")
    n = (bits - 1 - torch.floor(torch.log2(m))).long()
    m0 = torch.round(m * torch.pow(2.0, n.double())).long()
    carry = m0 >= 2 ** bits
    m0 = torch.where(carry, m0 // 2, m0)
    n = torch.where(carry, n - 1, n)
    return m0, n


def shift_round(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``round(x / 2^n)`` in integers: ``(x + 2^(n-1)) >> n`` for ``n > 0`` (ties toward +inf, as a
    rounding right shift does), ``x << -n`` for ``n <= 0``."""
    pos = n.clamp_min(1)
    right = (x + (torch.ones_like(pos) << (pos - 1))) >> pos
    left = x << (-n).clamp_min(0)
    return torch.where(n > 0, right, left)


#: Bits of the low half of ``M0`` in :func:`mul_shift_round`'s split product.
_SPLIT = 16


def mul_shift_round(x: torch.Tensor, m0: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``shift_round(x M0, n)``, exactly in int64 even where the product ``x M0`` passes 64 bits (a 16-bit
    model's 64-bit accumulator times a 31-bit ``M0``), as a wide multiplier unit computes it.

    With ``M0 = h 2^k + l`` (``k = 16``, ``0 <= l < 2^k``) and ``n >= k``::

        floor((x M0 + 2^(n-1)) / 2^n) = floor((x h + floor((x l + 2^(n-1)) / 2^k)) / 2^(n-k))

    (floors of divisions by powers of two compose), so no intermediate exceeds ``|x| 2^16 + 2^(n-1)``.
    Raises :class:`ExportError` when even that does not fit (``|x| > 2^46``, a shift outside ``[k, 61]``).
    """
    big = x.abs().max().item() if x.numel() else 0
    if big * float(m0.max()) < 2 ** 63:
        return shift_round(x * m0, n)
    # |x l| <= 2^62 and 2^(n-1) <= 2^60 keep the low half's sum inside int64
    if big > 2 ** (62 - _SPLIT) or bool((n < _SPLIT).any()) or bool((n > 61).any()):
        raise ExportError("requantization product overflows 64 bits: lower --scale-approx-bits or --accum-bits")
    h, low = m0 >> _SPLIT, m0 & (2 ** _SPLIT - 1)
    carry = (x * low + (torch.ones_like(n) << (n - 1))) >> _SPLIT
    return (x * h + carry) >> (n - _SPLIT)


#: What a requantized op may be in the engine: the op table's ops with an integer-only form.
INTEGER_OPS: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS if op.integer)


@dataclass
class IntValue:
    """A tensor of integers and the affine map back to reals, ``x = scale (q - zero_point)``.

    ``scale`` is per tensor (a 0-d tensor) or per channel along dim 1 (an accumulator of a per-channel
    layer). ``qmin`` / ``qmax`` are None for accumulators, which are not stored at a fixed width.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: int = 0
    qmin: int | None = None
    qmax: int | None = None

    def centred(self) -> torch.Tensor:
        return self.q - self.zero_point

    def channel_scale(self) -> torch.Tensor:
        """``scale`` shaped to broadcast against ``q`` (channel dim 1)."""
        if self.scale.dim() == 0:
            return self.scale
        return self.scale.reshape([1, -1] + [1] * (self.q.dim() - 2))

    def dequantize(self) -> torch.Tensor:
        return (self.centred().double() * self.channel_scale()).float()


@dataclass
class LayerStats:
    """What one accumulating layer did over all batches run so far."""

    accum_bits: int
    products: int  # multiply-accumulates per output value
    max_abs_acc: int = 0
    overflows: int = 0
    values: int = 0

    @property
    def bits_needed(self) -> int:
        """Signed accumulator bits the largest observed ``|acc|`` needs."""
        return int(self.max_abs_acc).bit_length() + 1


@dataclass
class _Layer:
    """Integer constants of one Conv2d / Linear, prepared once."""

    step: Step
    w: torch.Tensor  # centred integer weight (q_w - z_w), float64 container
    w_scale: torch.Tensor  # (C_out,) float64
    bias: torch.Tensor | None  # float64 real-valued bias; quantized per batch at s_x s_w
    conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    out: QParams | None
    stats: LayerStats


class IntegerEngine(nn.Module):
    """Integer-only inference of a prepared model; ``forward(x_float) -> float logits``.

    Args:
        qmodel: a calibrated / QAT-trained :class:`QuantizedModel` (fake quant enabled).
        accum_bits: accumulator width for every layer; None = each layer's plan ``accum_bits``.
        scale_approx_bits: width of the fixed-point requantization multiplier ``M0``.

    Attributes:
        stats: per-layer :class:`LayerStats` (accumulator range and overflows), updated by every forward.
    """

    def __init__(self, qmodel: QuantizedModel, accum_bits: int | None = None,
                 scale_approx_bits: int = DEFAULT_SCALE_APPROX_BITS) -> None:
        super().__init__()
        check_engine_widths(accum_bits, scale_approx_bits)
        self.steps = deploy_graph(qmodel)
        for step in self.steps:
            if step.kind == "const":
                raise ExportError(f"the integer engine cannot run {step.target}, a float tensor the graph reads; "
                                  "export to ONNX instead")
            if step.kind == "requant" and not isinstance(step.module.module, INTEGER_OPS):
                op = type(step.module.module).__name__
                raise ExportError(f"{step.target}: the integer engine has no integer-only {op} (only "
                                  f"{', '.join(t.__name__ for t in INTEGER_OPS)}); export to ONNX instead")
        self.scale_bits = scale_approx_bits
        self.input_qparams = act_qparams(self.steps[0], qmodel.input_quant)
        self.out_qparams: dict[str, QParams] = {}
        self.layers: dict[str, _Layer] = {}
        for step in self.steps:
            if step.kind in ("layer", "requant") and step.module.act_quant is not None:
                self.out_qparams[step.name] = act_qparams(step)
            if step.kind == "layer":
                self.layers[step.name] = self._layer(step, accum_bits)
        self.stats: dict[str, LayerStats] = {s.step.target: s.stats for s in self.layers.values()}

    def _layer(self, step: Step, accum_bits: int | None) -> _Layer:
        module = step.module
        qw = layer_weight(module)
        if qw.axis not in (None, 0):
            raise ExportError(f"{step.target}: per-channel weights must be along the output channels (axis 0)")
        zp = qw.zero_point.double().reshape([-1] + [1] * (qw.int_repr.dim() - 1)) if qw.axis == 0 else \
            qw.zero_point.double()
        w = qw.int_repr.double() - zp
        c_out = w.shape[0]
        w_scale = qw.scale.double().reshape(-1).expand(c_out).clone()
        bias = module.float_bias()
        if isinstance(module, nn.Conv2d):
            stride, padding, dilation, groups = module.stride, module.padding, module.dilation, module.groups
            if module.padding_mode != "zeros":
                raise ExportError(f"{step.target}: padding_mode {module.padding_mode!r} is not supported; use zeros")

            def conv(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
                return F.conv2d(x, wt, None, stride, padding, dilation, groups)

            products = w[0].numel()
        else:
            def conv(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
                return F.linear(x, wt)

            products = w.shape[1]
        bits = accum_bits if accum_bits is not None else module.accum_bits
        out = self.out_qparams.get(step.name)  # filled for this step just before
        return _Layer(step, w, w_scale, None if bias is None else bias.detach().double(), conv, out,
                      LayerStats(bits, products))

    # --- integer building blocks -------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> IntValue:
        """The one float-to-integer step: ``q = clamp(round(x / s) + z)`` with the input quantizer."""
        qp = self.input_qparams
        q = quantize(x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max).int_repr.long()
        return IntValue(q, qp.scale.double().reshape(()), int(qp.zero_point), qp.quant_min, qp.quant_max)

    def accumulate(self, layer: _Layer, x: IntValue) -> IntValue:
        """``acc = sum (q_x - z_x)(q_w - z_w) + round(b / (s_x s_w))``, counted and saturated at ``accum_bits``."""
        if x.scale.dim() != 0:
            raise ExportError(f"{layer.step.target}: input is an unrequantized accumulator")
        xc = x.centred()
        bound = xc.abs().max().item() * layer.w.abs().max().item() * layer.stats.products
        if bound >= _EXACT:
            raise ExportError(f"{layer.step.target}: accumulator bound {bound:.3g} beyond exact float64 integers")
        acc = torch.round(layer.conv(xc.double(), layer.w)).long()
        acc_scale = x.scale * layer.w_scale  # (C_out,)
        if layer.bias is not None:
            q_b = torch.round(layer.bias / acc_scale).long()
            q_b = q_b.clamp(*bias_range(layer.stats.accum_bits))
            acc = acc + q_b.reshape([1, -1] + [1] * (acc.dim() - 2))
        # inclusive bounds, both int64 values: 2^63 does not fit one, and a 64-bit accumulator compared with
        # it would count every value as an overflow
        st = layer.stats
        lo, hi = signed_range(st.accum_bits)
        st.max_abs_acc = max(st.max_abs_acc, int(acc.abs().max()))
        st.overflows += int(((acc > hi) | (acc < lo)).sum())
        st.values += acc.numel()
        acc = acc.clamp(lo, hi)
        return IntValue(acc, acc_scale)

    def requantize(self, v: IntValue, out: QParams, clamp_low: float | None = None,
                   clamp_high: float | None = None) -> IntValue:
        """``q_y = clamp(shift_round((q - z) M0, n) + z_y)`` (:func:`mul_shift_round`) with ``M0 / 2^n ~ s / s_y``; ``clamp_low`` /
        ``clamp_high`` (reals, e.g. 0 and 6 for ReLU6) tighten the integer bounds."""
        s_out = out.scale.double().reshape(())
        m0, n = fixed_point(v.scale / s_out, self.scale_bits)
        shape = [1, -1] + [1] * (v.q.dim() - 2) if v.scale.dim() else []
        m0, n = (m0.reshape(shape), n.reshape(shape)) if shape else (m0, n)
        centred = v.centred()
        zp = int(out.zero_point)
        low, high = out.quant_min, out.quant_max
        if clamp_low is not None:
            low = max(low, zp + round(clamp_low / float(s_out)))
        if clamp_high is not None:
            high = min(high, zp + round(clamp_high / float(s_out)))
        q = (mul_shift_round(centred, m0, n) + zp).clamp(low, high)
        return IntValue(q, s_out, zp, out.quant_min, out.quant_max)

    def add(self, a: IntValue, b: IntValue) -> IntValue:
        """``a + b`` at the common scale ``s_c = max(s_a, s_b) / 2^ADD_SHIFT``: each operand is
        ``shift_round((q - z) M0, n)`` with ``M0 / 2^n ~ s / s_c``, then summed (an accumulator)."""
        s_c = torch.maximum(a.scale.max(), b.scale.max()) / 2 ** ADD_SHIFT
        terms = []
        for v in (a, b):
            m0, n = fixed_point(v.scale / s_c, self.scale_bits)
            shape = [1, -1] + [1] * (v.q.dim() - 2) if v.scale.dim() else []
            m0, n = (m0.reshape(shape), n.reshape(shape)) if shape else (m0, n)
            terms.append(mul_shift_round(v.centred(), m0, n))
        return IntValue(terms[0] + terms[1], s_c)

    def pool_sum(self, pool: nn.Module, v: IntValue, name: str) -> IntValue:
        """Average pooling as an integer window sum; ``1 / count`` goes into the scale (and so into ``M``)."""
        x = v.centred().double()
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            oh, ow = (pool.output_size, pool.output_size) if isinstance(pool.output_size, int) else pool.output_size
            h, w = x.shape[-2:]
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise ExportError(f"{name}: adaptive pooling {h}x{w} -> {oh}x{ow} has unequal windows")
            kernel, stride, padding = (h // oh, w // ow), (h // oh, w // ow), 0
        else:
            if pool.ceil_mode or (pool.padding and not pool.count_include_pad) or pool.divisor_override:
                raise ExportError(f"{name}: average pooling with varying window counts is not supported")
            kernel, stride, padding = pool.kernel_size, pool.stride, pool.padding
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        total = F.avg_pool2d(x, kernel, stride, padding, divisor_override=1)
        return IntValue(torch.round(total).long(), v.scale / (kernel[0] * kernel[1]))

    def _requant_step(self, step: Step, values: list[IntValue]) -> IntValue:
        module, out = step.module.module, self.out_qparams[step.name]
        op = op_of(module)
        if op.arity == "binary":  # the add: INTEGER_OPS has no other two-input op
            return self.requantize(self.add(*values), out)
        if op.relu is not None:
            return self.requantize(values[0], out, *op.relu)
        if op.arity == "list":  # each input requantized to the output grid, then joined
            parts = [self.requantize(v, out) for v in values]
            return IntValue(torch.cat([p.q for p in parts], module.dim), parts[0].scale, parts[0].zero_point,
                            out.quant_min, out.quant_max)
        return self.requantize(self.pool_sum(module, values[0], step.target), out)

    def _passthrough(self, step: Step, v: IntValue | tuple[IntValue, ...], raw: dict[str, Any]) -> Any:
        """Max pooling, or a reshape / permute / slice / split run on the integers (``raw``: every step's
        integers or Python value, what the reshape's arguments read)."""
        if isinstance(step.module, nn.MaxPool2d):  # max commutes with the increasing map s (q - z)
            m = step.module
            q = F.max_pool2d(v.q.double(), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
            return IntValue(q.long(), v.scale, v.zero_point, v.qmin, v.qmax)
        grid = v[0] if isinstance(v, tuple) else v
        if grid.scale.dim() != 0:
            raise ExportError(f"{step.target}: reshaping a per-channel accumulator is not supported")
        q = step.module(grid.q) if step.module is not None else step.call(raw)
        if isinstance(q, (tuple, list)):  # chunk / split: every part on the same grid
            return tuple(IntValue(t, grid.scale, grid.zero_point, grid.qmin, grid.qmax) for t in q)
        return IntValue(q, grid.scale, grid.zero_point, grid.qmin, grid.qmax)

    def run(self, x: torch.Tensor) -> dict[str, IntValue]:
        """Every step's integer value for one batch (what :meth:`forward` and :meth:`explain` read)."""
        env: dict[str, IntValue] = {}
        raw: dict[str, Any] = {}  # integers (or parts, or shape numbers) by step, for the reshapes' arguments
        for step in self.steps:
            if step.kind == "shape":
                raw[step.name] = step.call(raw)
                continue
            values = [env[name] for name in step.inputs if name in env]
            if step.kind == "input":
                env[step.name] = self.quantize_input(x)
            elif step.kind == "layer":
                layer = self.layers[step.name]
                acc = self.accumulate(layer, values[0])
                env[step.name] = acc if layer.out is None else self.requantize(acc, layer.out)
            elif step.kind == "requant":
                env[step.name] = self._requant_step(step, values)
            elif step.kind == "add":
                env[step.name] = self.add(*values)
            elif step.kind == "passthrough":
                env[step.name] = self._passthrough(step, values[0], raw)
            else:  # output
                env[step.name] = values[0]
            value = env[step.name]
            raw[step.name] = tuple(v.q for v in value) if isinstance(value, tuple) else value.q
        return env

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits: ``s (q - z)`` of the last integer tensor (the one integer-to-float step)."""
        return self.run(x)[self.steps[-1].name].dequantize()

    def reset_stats(self) -> None:
        """Forget accumulator ranges and overflow counts."""
        for st in self.stats.values():
            st.max_abs_acc = st.overflows = st.values = 0

    def overflow_layers(self) -> dict[str, LayerStats]:
        """Layers whose accumulator left its ``accum_bits`` range in some forward so far."""
        return {name: st for name, st in self.stats.items() if st.overflows}

    def layer_names(self) -> list[str]:
        """Module names of the accumulating layers (what :meth:`explain` takes)."""
        return [layer.step.target for layer in self.layers.values()]

    def explain(self, target: str, x: torch.Tensor) -> str:
        """One real layer's integer dataflow and the bit width at each step,
        with this layer's scales, multiplier and the ranges observed on ``x``."""
        check_layer_name(self.layer_names(), target)
        layer = next(lay for lay in self.layers.values() if lay.step.target == target)
        env = self.run(x)
        step = layer.step
        xin = env[step.inputs[0]]
        consumer = next((s for s in self.steps if step.name in s.inputs), None)
        fused_relu = layer.out is None and consumer is not None and consumer.kind == "requant"
        out_q = layer.out or (self.out_qparams[consumer.name] if fused_relu else None)
        acc_scale = xin.scale * layer.w_scale
        acc = torch.round(layer.conv(xin.centred().double(), layer.w)).long()
        w_int = layer.w.long()
        mod = step.module
        kind = (f"Conv2d {mod.in_channels}->{mod.out_channels}, kernel {tuple(mod.kernel_size)}, stride "
                f"{tuple(mod.stride)}, groups {mod.groups}" if isinstance(mod, nn.Conv2d)
                else f"Linear {mod.in_features}->{mod.out_features}")
        k = layer.stats.products
        xin_bits = (xin.qmax - xin.qmin).bit_length()
        w_q = layer_weight(mod)
        w_bits = (w_q.quant_max - w_q.quant_min).bit_length()
        prod_bits = (xin_bits + 1) + w_bits  # centred input is one bit wider (signed)
        worst_bits = prod_bits + math.ceil(math.log2(k))
        lines = [f"{target}: {kind}; K = {k} multiply-accumulates per output value",
                 f"  input   {xin_bits}-bit {'unsigned' if xin.qmin >= 0 else 'signed'} q_x in [{xin.qmin}, "
                 f"{xin.qmax}], zero point z_x = {xin.zero_point}, scale s_x = {float(xin.scale):.6g}"
                 f"  (real x = s_x (q_x - z_x))",
                 f"  weight  {w_bits}-bit signed q_w in [{w_q.quant_min}, {w_q.quant_max}], "
                 + (f"{len(layer.w_scale)} per-channel scales s_w in [{float(layer.w_scale.min()):.4g}, "
                    f"{float(layer.w_scale.max()):.4g}]" if w_q.axis == 0 else f"scale s_w = {float(layer.w_scale[0]):.4g}")
                 + f", observed q_w in [{int(w_int.min())}, {int(w_int.max())}]",
                 f"  1. centre       q_x - z_x                         {xin_bits + 1}-bit signed, observed "
                 f"[{int(xin.centred().min())}, {int(xin.centred().max())}]",
                 f"  2. multiply     (q_x - z_x) q_w                   {prod_bits}-bit signed products",
                 f"  3. accumulate   sum of K = {k} products            {layer.stats.accum_bits}-bit accumulator "
                 f"(worst case needs {worst_bits} bits); observed |acc| <= {int(acc.abs().max())} "
                 f"({int(acc.abs().max()).bit_length() + 1} bits)"]
        if layer.bias is not None:
            q_b = torch.round(layer.bias / acc_scale).long()
            lines.append(f"  4. bias         + q_b = round(b / (s_x s_w))      32-bit, values in [{int(q_b.min())}, "
                         f"{int(q_b.max())}]")
        if out_q is None:
            lines.append("  output  the accumulator, requantized by the next step")
            return "\n".join(lines)
        m = acc_scale / out_q.scale.double().reshape(())
        m0, n = fixed_point(m, self.scale_bits)
        approx = m0.double() / torch.pow(2.0, n.double())
        rel = float(((approx - m) / m).abs().max())
        lines.append(f"  5. requantize   (acc M0 + 2^(n-1)) >> n           M = s_x s_w / s_y in [{float(m.min()):.4g}, "
                     f"{float(m.max()):.4g}] ~ M0 / 2^n, M0 {self.scale_bits}-bit in [{int(m0.min())}, {int(m0.max())}], "
                     f"n in [{int(n.min())}, {int(n.max())}], relative error <= {rel:.2g}; 64-bit product")
        lines.append(f"  6. zero point   + z_y = {int(out_q.zero_point)}")
        low = f"z_y = {int(out_q.zero_point)} (fused ReLU: real 0)" if fused_relu else str(out_q.quant_min)
        lines.append(f"  7. clamp        to [{low}, {out_q.quant_max}]")
        lines.append(f"  output  {out_q.bits}-bit {'signed' if out_q.signed else 'unsigned'} q_y, scale s_y = "
                     f"{float(out_q.scale):.6g}" + (f" (after {consumer.target})" if fused_relu else ""))
        return "\n".join(lines)


def check_layer_name(model_or_names: nn.Module | list[str], target: str) -> None:
    """:class:`ExportError` with the closest names unless ``target`` is a quantized Conv2d / Linear."""
    names = model_or_names if isinstance(model_or_names, list) else [
        n for n, m in model_or_names.named_modules() if isinstance(m, QuantWeightLayer)]
    prefix = "model."  # a QuantizedModel's layers sit under .model; users name them as in the float model
    names = [n.removeprefix(prefix) for n in names]
    if target not in names:
        close = difflib.get_close_matches(target, names, n=3, cutoff=0.3)
        raise ExportError(f"--explain {target}: no such quantized layer; closest: {', '.join(close) or '-'} "
                          f"(layers: {', '.join(names[:4])}, ...)")


__all__ = ["IntegerEngine", "IntValue", "LayerStats", "check_engine_widths", "check_layer_name", "fixed_point",
           "mul_shift_round", "shift_round"]
