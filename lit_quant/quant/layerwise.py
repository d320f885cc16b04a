"""Layer-wise PTQ on the calibration data, after calibration has set the grids: weight rounding behind one
interface (:class:`WeightRounding`: GPTQ, AdaRound, round-to-nearest, or a user's own), and empirical bias
correction.

**GPTQ** (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1): each conv / linear layer's weights are rounded one input column at a time, the
rounding error of each column pushed onto the columns not yet rounded. For a layer with weight ``W``
(output channels x inputs) and calibration inputs ``X`` (inputs x samples; a convolution's are the unfolded
patches), rounding minimises the layer's output error ``||W X - Q X||^2`` rather than the weight error
``||W - Q||^2``. With ``H = 2 X X^T + lambda I`` (``lambda = damp * mean(diag H)``) and ``U`` the upper
Cholesky factor of ``H^-1``, column ``i`` is rounded to ``q_i = quant(w_i)`` and the columns after it absorb
its error::

    W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j]        for j > i

which is the optimal (OBS) update of the remaining weights for that one rounding. With act-order, columns
go in order of decreasing ``diag H`` (the inputs with the most energy first, while the most columns are
left to compensate); blocks of columns apply their updates to later blocks at once (the "lazy batch" form,
the same arithmetic). The grid is the layer's calibrated one (the weight quantizer's scale and zero point
stay as its observer set them), so the result is a weight on that grid, placed better than by
round-to-nearest. A grouped (depthwise) convolution has one ``H`` per group.

**AdaRound** (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"): each weight
rounds down or up, ``Q = s (clamp(floor(W / s) + h(V) + z, q_min, q_max) - z)`` with the rectified sigmoid
``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (``zeta = 1.1``, ``gamma = -0.1``), and ``V`` is
learned with Adam to minimise the layer's output error plus a regulariser that drives every ``h`` to 0 or 1::

    ||(W - Q) X||^2 / (N O)  +  lambda * sum(1 - |2 h(V) - 1|^beta)

with ``beta`` annealed from 20 to 2 after a warm-up fifth of the iterations without the regulariser
(``lambda = 0.01``; the paper's and AIMET's defaults). The output error is the linear-layer objective of the
paper (its eq. 21) on the quantized inputs, computed exactly from the same ``H = X X^T`` as GPTQ's
(``trace(E H E^T)``), so an iteration costs ``O(O D^2)`` whatever the number of calibration images. ``V``
starts where ``h(V)`` is the fractional part of ``W / s`` (the float weight); the result is ``h(V) >= 0.5``
rounded up.

**Bias correction**: see :func:`layerwise_ptq`.

Layers go in the order the forward pass reaches them and each sees its input as the quantized model
computes it, with every layer before it already processed: later layers compensate earlier ones' errors
(the "sequential" setting of GPTQ; AIMET corrects biases in the same order).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.quant.errors import CalibrationError, QuantConfigError
from lit_quant.quant.fake_quant import enable_fake_quant, iter_quantizers
from lit_quant.quant.functional import fake_quantize
from lit_quant.quant.layers import QuantWeightLayer
from lit_quant.quant.spec import ROUNDINGS

#: AdaRound's rectified sigmoid stretch (Nagel et al. 2020, sec. 4.1) and its regulariser's schedule.
_ZETA, _GAMMA = 1.1, -0.1
_ADAROUND_LAMBDA = 0.01
_ADAROUND_WARMUP = 0.2
_ADAROUND_BETA = (20.0, 2.0)


class _Stop(Exception):
    """Raised by the input hook once the layer under GPTQ has seen its input: the rest of the forward
    pass is not needed."""


def _inputs(batches: Iterable[Any]) -> list[torch.Tensor]:
    return [b[0] if isinstance(b, (list, tuple)) else b for b in batches]


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as ``(groups, D, samples)`` columns of ``X`` (a convolution's unfolded patches,
    channel-major as the weight's ``(in / groups) * kh * kw`` axis)."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            padding: Any = 0
        else:
            padding = layer.padding
        if isinstance(padding, str):  # "same" / "valid": torch computes it; unfold needs the numbers
            padding = tuple(d * (k - 1) // 2 for d, k in zip(layer.dilation, layer.kernel_size)) \
                if padding == "same" else 0
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        g = layer.groups
        return cols.reshape(cols.shape[0], g, cols.shape[1] // g, -1).permute(1, 2, 0, 3).reshape(g, cols.shape[1] // g, -1)
    return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)


def _grouped(layer: QuantWeightLayer, w: torch.Tensor) -> torch.Tensor:
    """The weight as ``(groups, out / groups, D)``."""
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    return w.reshape(g, w.shape[0] // g, -1)


def _rounder(layer: QuantWeightLayer) -> Any:
    """Round-to-nearest on the layer's calibrated grid for ``(groups, out / groups)`` weight columns: the
    weight quantizer's own :func:`fake_quantize` (float32 arithmetic, as the model computes it)."""
    fq = layer.weight_quant
    assert fq is not None
    qp = fq.qparams()

    def round_(w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w.reshape(-1), qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.axis).reshape(w.shape)

    return round_


def gptq_weight(w: torch.Tensor, h: torch.Tensor, round_: Any, damp: float = 0.01, act_order: bool = True,
                block: int = 128) -> torch.Tensor:
    """GPTQ of grouped weights ``w`` ``(G, O, D)`` with Hessians ``h`` ``(G, D, D)`` (float64); ``round_``
    rounds a ``(G, O)`` column to the grid. Returns the rounded weights, shaped like ``w``."""
    w, h = w.clone(), h.clone()
    groups, _, d = w.shape
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag == 0  # an input that is always 0: its weights do nothing, and H is singular there
    diag.masked_fill_(dead, 1.0)
    w.masked_fill_(dead[:, None, :], 0.0)
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True)
        w = w.gather(2, perm[:, None, :].expand_as(w))
        h = h.gather(1, perm[:, :, None].expand_as(h)).gather(2, perm[:, None, :].expand_as(h))
        diag = h.diagonal(dim1=1, dim2=2)
    diag.add_(damp * diag.mean(dim=1, keepdim=True))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty_like(w)
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        w1, u1 = w[:, :, b0:b1].clone(), u[:, b0:b1, b0:b1]
        err = torch.empty_like(w1)
        for i in range(b1 - b0):
            col = w1[:, :, i]
            qcol = round_(col)
            q[:, :, b0 + i] = qcol
            e = (col - qcol) / u1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, None, i, i:]
            err[:, :, i] = e
        w[:, :, b1:] -= err @ u[:, b0:b1, b1:]
    if act_order:
        q = torch.empty_like(q).scatter_(2, perm[:, None, :].expand_as(q), q)
    return q


def _grid(layer: QuantWeightLayer) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The layer's weight grid as ``(scale, zero point)`` shaped ``(G, O / G, 1)`` for grouped weights, and
    ``(q_min, q_max)``."""
    fq = layer.weight_quant
    assert fq is not None
    qp = fq.qparams()
    out = layer.weight.shape[0]
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    scale = qp.scale.double().reshape(-1).expand(out)  # per tensor (1) or per output channel (out)
    zero = qp.zero_point.double().reshape(-1).expand(out)
    return scale.reshape(g, out // g, 1), zero.reshape(g, out // g, 1), int(qp.quant_min), int(qp.quant_max)


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


def adaround_weight(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int,
                    qmax: int, samples: int, iters: int = 2000, lr: float = 1e-2) -> torch.Tensor:
    """AdaRound (module docstring) of grouped weights ``w`` ``(G, O, D)`` with Hessians ``h = X X^T``
    ``(G, D, D)`` summed over ``samples`` columns, on the grid ``scale`` / ``zero`` ``(G, O, 1)`` and
    ``[qmin, qmax]``. Returns the rounded weights (on the grid), shaped like ``w``."""
    ws = w / scale
    base = torch.floor(ws)
    rest = (ws - base).clamp(1e-4, 1 - 1e-4)
    # h(V) = rest at the start: sigmoid(V) = (rest - gamma) / (zeta - gamma)
    v = torch.logit((rest - _GAMMA) / (_ZETA - _GAMMA)).float().requires_grad_(True)
    hf = (h / max(samples * w.shape[1] * w.shape[0], 1)).float()  # the error as a mean over outputs
    wf, basef, scalef, zerof = w.float(), base.float(), scale.float(), zero.float()
    opt = torch.optim.Adam([v], lr=lr)
    warm = int(_ADAROUND_WARMUP * iters)
    with torch.enable_grad():
        for it in range(iters):
            soft = _rectified_sigmoid(v)
            q = scalef * (torch.clamp(basef + soft + zerof, qmin, qmax) - zerof)
            e = wf - q
            loss = torch.einsum("god,gde,goe->", e, hf, e)
            if it >= warm:
                frac = (it - warm) / max(iters - warm, 1)
                beta = _ADAROUND_BETA[1] + 0.5 * (_ADAROUND_BETA[0] - _ADAROUND_BETA[1]) * (1 + math.cos(math.pi * frac))
                loss = loss + _ADAROUND_LAMBDA * (1 - (2 * soft - 1).abs().pow(beta)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    up = (v.detach() >= 0).double()  # h(V) >= 0.5
    return scale * (torch.clamp(base + up + zero, qmin, qmax) - zero)


class WeightRounding(Protocol):
    """How :func:`layerwise_ptq` rounds one layer's weights onto its calibrated grid.

    Called with the layer, its float weight as ``(groups, out / groups, D)`` float64, the Hessian
    ``H = X X^T`` of its calibration inputs ``(groups, D, D)`` and the number of input columns summed into
    ``H``; returns the rounded weights, shaped like ``w`` and on the layer's grid. :attr:`name` is the
    ``--weight-rounding`` value; :attr:`changes_weights` is False for a rounding that leaves the weights to
    fake quantization.
    """

    name: ClassVar[str]
    changes_weights: ClassVar[bool]

    def __call__(self, layer: QuantWeightLayer, w: torch.Tensor, h: torch.Tensor, samples: int) -> torch.Tensor:
        ...


@dataclass(frozen=True)
class NearestRounding:
    """Round-to-nearest on the layer's grid: what fake quantization does; the weights are left as they are."""

    name: ClassVar[str] = "nearest"
    changes_weights: ClassVar[bool] = False

    def __call__(self, layer: QuantWeightLayer, w: torch.Tensor, h: torch.Tensor, samples: int) -> torch.Tensor:
        return _grouped(layer, layer.quantized_weight().detach().double())


@dataclass(frozen=True)
class GPTQRounding:
    """GPTQ on the layer's grid (:func:`gptq_weight`).

    Attributes:
        damp: ``lambda`` as a fraction of the mean of ``diag H`` (the paper's 1 %).
        act_order: round the inputs with the largest ``diag H`` first.
        block: columns per lazy-update block.
    """

    damp: float = 0.01
    act_order: bool = True
    block: int = 128
    name: ClassVar[str] = "gptq"
    changes_weights: ClassVar[bool] = True

    def __call__(self, layer: QuantWeightLayer, w: torch.Tensor, h: torch.Tensor, samples: int) -> torch.Tensor:
        return gptq_weight(w, h, _rounder(layer), damp=self.damp, act_order=self.act_order, block=self.block)


@dataclass(frozen=True)
class AdaRoundRounding:
    """AdaRound on the layer's grid (:func:`adaround_weight`).

    Attributes:
        iters: Adam steps per layer.
        lr: Adam learning rate.
    """

    iters: int = 2000
    lr: float = 1e-2
    name: ClassVar[str] = "adaround"
    changes_weights: ClassVar[bool] = True

    def __call__(self, layer: QuantWeightLayer, w: torch.Tensor, h: torch.Tensor, samples: int) -> torch.Tensor:
        return adaround_weight(w, h, *_grid(layer), samples=samples, iters=self.iters, lr=self.lr)


#: Each weight rounding by its name (:data:`lit_quant.quant.spec.ROUNDINGS`).
ROUNDING_STRATEGIES: dict[str, type[WeightRounding]] = {
    cls.name: cls for cls in (NearestRounding, GPTQRounding, AdaRoundRounding)}
if tuple(ROUNDING_STRATEGIES) != ROUNDINGS:  # a real check: python -O keeps it
    raise ImportError(f"weight roundings {tuple(ROUNDING_STRATEGIES)} differ from spec.ROUNDINGS {ROUNDINGS}")


def weight_rounding(name: str, **options: Any) -> WeightRounding:
    """The rounding called ``name`` with its ``options`` (``weight_rounding("adaround", iters=500)``);
    options another rounding takes are ignored, so one set of flags serves them all."""
    if name not in ROUNDING_STRATEGIES:
        raise QuantConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}; got {name!r}")
    cls = ROUNDING_STRATEGIES[name]
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in options.items() if k in fields})


def _output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``||(W - Q) X|| / ||W X||`` from ``H = X X^T``: ``trace(E H E^T) / trace(W H W^T)``, square-rooted."""
    e = w - q
    num = torch.einsum("god,gde,goe->", e, h, e)
    den = torch.einsum("god,gde,goe->", w, h, w)
    return float((num / den.clamp_min(1e-300)).clamp_min(0).sqrt())


def _weight_layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, QuantWeightLayer]]:
    """Weight-quantized conv / linear layers in the order the forward pass of ``x`` first calls them (an LSQ
    quantizer's grid is its current step size: the start QAT goes on to learn from)."""
    order: list[tuple[str, QuantWeightLayer]] = []
    called: set[int] = set()
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, QuantWeightLayer) and m.weight_quant is not None:
            def seen(mod: nn.Module, _args: Any, name: str = name) -> None:
                if id(mod) not in called:
                    called.add(id(mod))
                    order.append((name, mod))  # type: ignore[arg-type]
            hooks.append(m.register_forward_pre_hook(seen))
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return order


@dataclass(frozen=True)
class LayerwiseResult:
    """What :func:`layerwise_ptq` did: layers visited, calibration samples, wall time, and per layer the
    relative output error ``||(W - Q) X|| / ||W X||`` on its calibration inputs with round-to-nearest and
    with the rounding used, and the largest bias shift of bias correction (0 without it)."""

    layers: int
    samples: int
    seconds: float
    errors: dict[str, tuple[float, float]]  # layer -> (nearest, used)
    bias_shift: dict[str, float]  # layer -> max |shift| of its bias


def _output_means(model: nn.Module, layers: list[tuple[str, QuantWeightLayer]], inputs: list[torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each layer in the float model: the same prepared model with fake
    quantization off (BatchNorm folded, nothing rounded), before any layer is changed."""
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []
    for name, layer in layers:
        def record(mod: nn.Module, _args: Any, out: torch.Tensor, name: str = name) -> None:
            y = out.detach().double()
            y = y.transpose(0, 1).reshape(y.shape[1], -1) if isinstance(mod, nn.Conv2d) else y.reshape(-1, y.shape[-1]).t()
            sums[name] = y.sum(1) + sums.get(name, 0.0)
            count[name] = y.shape[1] + count.get(name, 0)
        hooks.append(layer.register_forward_hook(record))
    enabled = {fq: bool(fq.fake_quant_enabled) for _, fq in iter_quantizers(model)}
    enable_fake_quant(model, False)
    try:
        for x in inputs:
            model(x.to(device))
    finally:
        for fq, on in enabled.items():
            fq.fake_quant_enabled.fill_(on)
        for hook in hooks:
            hook.remove()
    return {name: sums[name] / count[name] for name in sums}


def layerwise_ptq(model: nn.Module, batches: Iterable[Any], rounding: str | WeightRounding = "gptq",
                  bias_correction: bool = False, progress: Any = None) -> LayerwiseResult:
    """Layer by layer, in forward order (module docstring), round the weights of every weight-quantized
    conv / linear layer of a calibrated ``model`` and optionally correct its bias, on the inputs
    ``batches`` (tensors or ``(inputs, targets)`` pairs) give it.

    * ``rounding``: a :class:`WeightRounding` (:class:`GPTQRounding`, :class:`AdaRoundRounding`,
      :class:`NearestRounding`: the weights are left to fake quantization), or its name with default options.
    * ``bias_correction`` (empirical bias correction, Nagel et al. 2019 sec. 4.2; AIMET's empirical
      variant): the per-channel mean output of the quantized model at this layer, with every earlier layer
      already corrected, is set to the float model's, ``b_c += E[y_float]_c - (Q_c E[x_q] + b_c)``, where
      ``E[x_q]`` is the mean of the layer's (unfolded) quantized inputs. It removes the systematic shift that
      rounding and clipping leave in each channel, which a ReLU network otherwise passes on and adds up.
      Layers without a bias (a convolution with no BatchNorm and no bias) are left as they are.

    ``model`` must be calibrated (qparams set, fake quantization on). Weights are replaced by their rounded
    values on the layer's grid and biases shifted, so fake quantization, a saved checkpoint and every
    exporter see them; qparams are not changed. Under DDP every process runs this on the same batches and
    gets the same model.

    Args:
        progress: called as ``progress(done, total)`` after each layer.

    Raises:
        CalibrationError: no batches, or the model is not calibrated.
    """
    round_layer = weight_rounding(rounding) if isinstance(rounding, str) else rounding
    start = time.perf_counter()
    inputs = _inputs(batches)
    if not inputs:
        raise CalibrationError("layer-wise PTQ needs calibration batches; none were given")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    errors: dict[str, tuple[float, float]] = {}
    shifts: dict[str, float] = {}
    with torch.no_grad():
        layers = _weight_layers(model, inputs[0].to(device))
        for name, layer in layers:
            if not bool(layer.weight_quant.qparams_valid):  # type: ignore[union-attr]
                raise CalibrationError(f"layer-wise PTQ needs a calibrated model: layer {name} has no weight qparams")
        reference = _output_means(model, layers, inputs, device) if bias_correction else {}
        for done, (name, layer) in enumerate(layers):
            stats: dict[str, Any] = {}

            def accumulate(mod: nn.Module, args: Sequence[torch.Tensor]) -> None:
                cols = _columns(mod, args[0].detach().float())
                xxt = (cols @ cols.transpose(1, 2)).double()  # float32 products, float64 running sums
                stats["h"] = xxt + stats.get("h", 0.0)
                stats["sum"] = cols.double().sum(2) + stats.get("sum", 0.0)
                stats["n"] = cols.shape[2] + stats.get("n", 0)
                raise _Stop

            hook = layer.register_forward_pre_hook(accumulate)
            try:
                for x in inputs:
                    try:
                        model(x.to(device))
                    except _Stop:
                        pass
            finally:
                hook.remove()
            w = _grouped(layer, layer.float_weight().detach().double())
            nearest = NearestRounding()(layer, w, stats["h"], stats["n"])
            q = round_layer(layer, w, stats["h"], stats["n"])
            errors[name] = (_output_error(w, nearest, stats["h"]), _output_error(w, q, stats["h"]))
            if round_layer.changes_weights:
                layer.set_float_weight(q.reshape(layer.weight.shape).to(layer.weight.dtype))
            bias = layer.float_bias()
            if bias_correction and bias is not None:
                mean_in = stats["sum"] / stats["n"]  # (G, D)
                quantized = torch.einsum("god,gd->go", q, mean_in).reshape(-1) + bias.detach().double()
                shift = reference[name] - quantized
                layer.shift_bias(shift.to(bias.dtype))
                shifts[name] = float(shift.abs().max())
            if progress is not None:
                progress(done + 1, len(layers))
    model.train(was_training)
    return LayerwiseResult(len(layers), sum(len(x) for x in inputs), time.perf_counter() - start, errors, shifts)
