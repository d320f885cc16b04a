"""``FakeQuantize``: one observer + one spec + two switches; and helpers that flip the switches model-wide.

PTQ calibration, QAT and evaluation are settings of the two buffers:

=====================  ==================  ======================
stage                  ``observer_enabled``  ``fake_quant_enabled``
=====================  ==================  ======================
PTQ calibration        on                  off (model is float)
QAT                    on (then frozen)    on
evaluation / export    off                 on
=====================  ==================  ======================

Qparams live in the ``scale`` / ``zero_point`` buffers (``qparams_valid`` says whether they were computed),
so a saved state dict restores a calibrated model without re-running calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_quant.quant.errors import CalibrationError, QuantConfigError
from lit_quant.quant.functional import SCALE_EPS, QParams, calculate_qparams, fake_quantize, lsq_fake_quantize
from lit_quant.quant.observers import Observer, ResizingBuffersMixin, build_observer
from lit_quant.quant.spec import QuantSpec

KINDS: tuple[str, ...] = ("weight", "act")


class FakeQuantize(ResizingBuffersMixin, nn.Module):
    """Observe and/or fake-quantize one tensor per ``spec``.

    Forward: if ``observer_enabled``, the observer records ``x``; if ``fake_quant_enabled``, qparams are
    (re)computed when the observer is running or none were computed yet, and ``x`` goes through
    :func:`lit_quant.quant.functional.fake_quantize`; otherwise ``x`` is returned untouched, so a model
    with fake quant off computes exactly what the float model does, forward and backward. ``forward(x,
    relu=True)`` does all that for ``relu(x)`` (the output quantizer of a ReLU), fused where it can be.
    When the qparams stay fixed for the call (QAT's per-step qparams) and the observer needs only the
    batch's min and max, those come out of the fake-quant pass itself.

    Args:
        spec: an enabled :class:`QuantSpec`.
        kind: ``"weight"`` or ``"act"`` (stats files store activations; exporters tell them apart).
    """

    def __init__(self, spec: QuantSpec, kind: str = "act") -> None:
        super().__init__()
        if not spec.enabled:
            raise QuantConfigError("FakeQuantize needs a spec with bits set; bits=0/None means: do not quantize")
        if kind not in KINDS:
            raise QuantConfigError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.spec = spec
        self.kind = kind
        # the plan pattern that sets this quantizer's spec (a layer name or "input"), so that per-quantizer
        # results (sensitivity) can be written back as plan overrides; set by prepare
        self.plan_name: str | None = None
        self.observer: Observer = build_observer(spec)
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1, dtype=torch.int32))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("fake_quant_enabled", torch.tensor(False))
        self.register_buffer("qparams_valid", torch.tensor(False))

    @property
    def axis(self) -> int | None:
        """Channel axis of per-channel qparams, ``None`` per tensor."""
        return self.spec.axis if self.spec.per_channel else None

    #: QAT under DDP: activation qparams are not recomputed from this process's observer in ``forward``;
    #: they change only through :func:`update_qparams` after :func:`sync_observers` (the QAT callback does
    #: both after every step), so every rank fake-quantizes with the same qparams at every step. Weights
    #: are the same on every rank, so weight qparams always follow the current weight.
    step_qparams: bool = False

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """The quantized ``x`` (of ``relu(x)`` with ``relu``: a ReLU fused into its output quantizer)."""
        # Scale arithmetic and rounding in fp32 even under autocast or with a half model: a half-precision
        # scale can underflow and round-to-nearest on a half grid is not the integer grid (pytorch#94371).
        if x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float(), relu).to(x.dtype)
        return self._forward(x, relu)

    def _forward(self, x: torch.Tensor, relu: bool) -> torch.Tensor:
        fake_quant = bool(self.fake_quant_enabled)
        # A weight is observed only while it is used quantized (QAT, where it changes every step); with fake
        # quant off (PTQ calibration) it does not change, and start_calibration observed it once.
        observe = bool(self.observer_enabled) and (fake_quant or self.kind == "act")
        if not fake_quant:
            if relu:
                x = torch.relu(x)
            if observe:
                self._observe(x)
            return x
        if (observe and self.kind == "act" and self.axis is None and self.observer.RANGE_ONLY and x.numel() > 0
                and not self._needs_qparams()):
            # QAT with qparams fixed for this step: the observer's min / max come out of the fake-quant pass
            observed = torch.empty(2, device=x.device)
            out = self._fake_quantize(x, relu, observed)
            self.observer.observe_range(observed[:1], observed[1:])
            return out
        if observe:  # the observer sees what is quantized; the ReLU of the quantized value stays fused
            self._observe(torch.relu(x.detach()) if relu else x)
        if self._needs_qparams():
            self.update_qparams()
        return self._fake_quantize(x, relu)

    def _observe(self, x: torch.Tensor) -> None:
        if self.kind == "weight":
            self.observer.reset()  # the range of the weight as it is now, not of every past weight (QAT)
        self.observer(x.detach())

    def _needs_qparams(self) -> bool:
        if not bool(self.qparams_valid):
            return True
        return bool(self.observer_enabled) and not (self.step_qparams and self.kind == "act")

    def _fake_quantize(self, x: torch.Tensor, relu: bool = False, observed: torch.Tensor | None = None
                       ) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.spec.quant_min, self.spec.quant_max, self.axis,
                             relu=relu, observed=observed)

    def update_qparams(self) -> None:
        """Recompute ``scale`` / ``zero_point`` from the observer (raises if it has seen no data)."""
        self.set_qparams(*self.observer.calculate_qparams())

    def set_range(self, min_val: torch.Tensor, max_val: torch.Tensor) -> None:
        """Set qparams from a known range (a stats file) through the same qparams function as the observers."""
        self.set_qparams(*calculate_qparams(min_val.to(self.scale.device), max_val.to(self.scale.device), self.spec))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set ``scale`` / ``zero_point`` (reshaped to the given ones) and mark them valid: qparams computed
        elsewhere (a deploy file, an initial step size) take effect as the observer's would."""
        with torch.no_grad():
            if self.scale.shape != scale.shape:
                self.scale = torch.empty_like(scale, device=self.scale.device)
            if self.zero_point.shape != zero_point.shape:
                self.zero_point = torch.empty_like(zero_point, device=self.zero_point.device)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            self.qparams_valid.fill_(True)

    def qparams(self) -> QParams:
        """Current qparams with their integer range, for reports and exporters."""
        if not bool(self.qparams_valid):
            if not self.observer.has_data:
                raise CalibrationError("no qparams yet: calibrate (observe data) or load a stats file first")
            self.update_qparams()
        return QParams(self.scale.detach().float().clone(), self.zero_point.detach().clone(), self.spec.quant_min,
                       self.spec.quant_max, self.axis, int(self.spec.bits), self.spec.scheme)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, bits={self.spec.bits}, scheme={self.spec.scheme}, axis={self.axis}, "
                f"observer={self.spec.observer}, quantizer={self.spec.quantizer}")


class LSQFakeQuantize(FakeQuantize):
    """Learned step size (LSQ, Esser et al. 2020) for QAT below 8 bits.

    ``scale`` is an ``nn.Parameter`` initialised once from the observer's qparams (calibrate first, or it is
    initialised on the first fake-quantized forward), then learned with the LSQ gradient
    (:func:`lit_quant.quant.functional.lsq_fake_quantize`); the observer keeps recording but no longer
    overrides it. The zero point stays at its calibrated value. The scale stays positive by projection, as in
    torch.ao's ``_LearnableFakeQuantize``: each forward first clamps the parameter's data to ``>= eps``.
    Create the optimizer after calibration: per-channel activation scales change shape then.
    """

    def __init__(self, spec: QuantSpec, kind: str = "act") -> None:
        super().__init__(spec, kind)
        del self.scale
        self.scale = nn.Parameter(torch.ones(1))

    def _needs_qparams(self) -> bool:
        return not bool(self.qparams_valid)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        if self.scale.shape != scale.shape:
            self.scale = nn.Parameter(torch.empty_like(scale, device=self.scale.device))
        super().set_qparams(scale, zero_point)

    def qparams(self) -> QParams:
        """As :meth:`FakeQuantize.qparams`, with the scale forward really uses, ``max(scale, eps)``."""
        qp = super().qparams()
        return dataclasses.replace(qp, scale=qp.scale.clamp_min(SCALE_EPS))

    def _fake_quantize(self, x: torch.Tensor, relu: bool = False, observed: torch.Tensor | None = None
                       ) -> torch.Tensor:
        # Projected gradient descent: an optimizer step that took a step size below eps is undone here, through
        # .data so autograd does not see it (a quantizer used twice in one forward stays valid), and the
        # forward uses the parameter itself. Clamping inside the graph instead (max(scale, eps)) gives a scale
        # that crossed eps a zero gradient for good: its channel's weights would quantize to ~0 for the rest of
        # the run.
        self.scale.data.clamp_(min=SCALE_EPS)
        return lsq_fake_quantize(x, self.scale, self.zero_point, self.spec.quant_min, self.spec.quant_max,
                                 self.axis, relu=relu, observed=observed)


#: Weights of this many bits or more keep observer ranges (STE) under ``quantizer: lsq``; see
#: :func:`build_fake_quantize`.
LSQ_WEIGHT_BITS_LIMIT = 8


def build_fake_quantize(spec: QuantSpec, kind: str = "act") -> FakeQuantize:
    """``FakeQuantize`` or ``LSQFakeQuantize`` according to ``spec.quantizer``, except that weights of
    :data:`LSQ_WEIGHT_BITS_LIMIT` bits or more keep ranges that follow the weight (STE) under ``lsq``.

    Why: a learned weight step ``s`` moves by ``lr g sum_i (round(w_i/s) - w_i/s) dL/dq_i`` per step, ``g =
    1/sqrt(N Q_P)``; at 8 bits almost no weight clips, so that sum is rounding noise, and it is large next to
    ``s = max|w| / 127``: per channel of a small layer (a stem conv, ``N`` = 9; a classifier row) the step
    drifts away from its calibrated value. Activation steps stay learned at 8 bits (they have many elements
    per step and do not drift).
    """
    lsq = spec.quantizer == "lsq" and not (kind == "weight" and spec.bits >= LSQ_WEIGHT_BITS_LIMIT)
    return (LSQFakeQuantize if lsq else FakeQuantize)(spec, kind)


# --- model-wide switches -----------------------------------------------------------------------------------
def iter_quantizers(model: nn.Module, kind: str | None = None) -> Iterator[tuple[str, FakeQuantize]]:
    """``(qualified name, FakeQuantize)`` for every quantizer in ``model`` (optionally of one ``kind``)."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantize) and (kind is None or module.kind == kind):
            yield name, module


def enable_observer(model: nn.Module, enabled: bool = True) -> None:
    """Switch every observer of ``model`` on or off."""
    for _, fq in iter_quantizers(model):
        fq.observer_enabled.fill_(bool(enabled))


def set_batch_index(model: nn.Module, index: int | None) -> None:
    """Tell every observer of ``model`` the global number of the batch about to be observed (``None``: none).

    Calibration numbers its batches so that the same batch has the same number however the batches are
    spread over ranks (rank ``r`` of ``W`` observing batches ``r, r + W, ...`` numbers its ``i``-th one
    ``i * W + r``): then :func:`sync_observers` gives every rank bit for bit the qparams one process gets on
    all the batches (see :attr:`lit_quant.quant.observers.Observer.batch_index`). Clear it (``None``) when
    the calibration pass ends.
    """
    for _, fq in iter_quantizers(model):
        fq.observer.batch_index = None if index is None else int(index)


def enable_fake_quant(model: nn.Module, enabled: bool = True) -> None:
    """Switch fake quantization of ``model`` on or off (off: the model computes in float)."""
    for _, fq in iter_quantizers(model):
        fq.fake_quant_enabled.fill_(bool(enabled))


def sync_observers(model: nn.Module, group: Any = None, kind: str | None = None) -> None:
    """Merge every observer's (of ``kind``) statistics across DDP ranks (no-op without ``torch.distributed``).

    Call it on every rank, at the same point (it is a sequence of collectives).
    """
    for _, fq in iter_quantizers(model, kind):
        fq.observer.sync(group)


def set_step_qparams(model: nn.Module, enabled: bool = True) -> None:
    """Activation qparams updated between steps (after a sync) instead of in ``forward``; see
    :attr:`FakeQuantize.step_qparams`."""
    for _, fq in iter_quantizers(model):
        fq.step_qparams = bool(enabled)


def reset_observers(model: nn.Module) -> None:
    """Forget all statistics and qparams (before a new calibration)."""
    for _, fq in iter_quantizers(model):
        fq.observer.reset()
        fq.qparams_valid.fill_(False)


def update_qparams(model: nn.Module, kind: str | None = None) -> None:
    """Compute qparams of every quantizer (of ``kind``) from its observer; learned LSQ scales are kept.

    Raises:
        CalibrationError: naming every quantizer that saw no data (a layer not used in forward, or no
            calibration batches at all).
    """
    missing = [name for name, fq in iter_quantizers(model, kind) if not fq.observer.has_data and not fq.qparams_valid]
    if missing:
        raise CalibrationError(f"{len(missing)} quantizer(s) observed no data: {', '.join(missing[:8])}"
                               + (" ..." if len(missing) > 8 else ""))
    for _, fq in iter_quantizers(model, kind):
        if fq.observer.has_data and not (isinstance(fq, LSQFakeQuantize) and fq.qparams_valid):
            fq.update_qparams()


def model_qparams(model: nn.Module) -> dict[str, QParams]:
    """Qparams of every quantizer, keyed by the quantizer's qualified name."""
    return {name: fq.qparams() for name, fq in iter_quantizers(model)}
