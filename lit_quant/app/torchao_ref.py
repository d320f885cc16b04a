"""PyTorch's built-in ``torch.ao`` quantization: the side-by-side reference for our own quantizer.

This module and :mod:`lit_quant.deploy.int8` (torch.ao modules built from our qparams) are the only ones
importing ``torch.ao``. Every result of ``lit_quant.quant`` is compared with what PyTorch itself produces
on the same float model and the same calibration batches:

* :func:`builtin_ptq` — static int8 post-training quantization: FX graph mode where the model traces
  (``prepare_fx`` with the backend's default ``QConfigMapping`` → calibrate → ``convert_fx``), eager mode
  otherwise (``fuse_model()`` where the model has one → ``QuantStub`` / ``DeQuantStub`` → ``prepare`` →
  calibrate → ``convert``);
* :func:`builtin_qat_prepare` / :func:`builtin_qat_convert` — FX quantization-aware training; the training
  in between is done by the Lightning layer;
* :func:`builtin_dynamic` — dynamic int8 ``nn.Linear`` (``quantize_dynamic``);
* :func:`builtin_half` — a half-precision copy (``model.half()``).

Backends (``torch.backends.quantized.engine``) decide both the default qconfig and the packed weight format:

========  ==========================================================================================
fbgemm    x86 server kernels; activations observed with ``reduce_range=True`` (7-bit range, to avoid
          overflow in the 16-bit accumulation of CPUs without VNNI); per-channel weights
x86       fbgemm or oneDNN kernels chosen per op; same qconfig as fbgemm (``reduce_range=True``)
qnnpack   ARM / mobile kernels (also run on x86); full 8-bit activations, per-tensor weights
onednn    oneDNN kernels; full 8-bit activations (torch warns that this may lose accuracy without VNNI)
========  ==========================================================================================

``torch.ao.quantization`` is deprecated upstream (it moves to torchao) and warns on every call; those
warnings are silenced inside :func:`lit_quant.deploy.engines.quiet_torch_ao` only, never with a global
filter, so that the rest of the
program still sees every other warning.
"""

from __future__ import annotations

import copy
import functools
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lit_quant.deploy.engines import check_backend, quiet_torch_ao, use_engine
from lit_quant.errors import UserError

with warnings.catch_warnings():
    # Importing is enough to trigger the deprecation notice on some versions; keep it local to this import.
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats, update_bn_stats
    from torch.ao.quantization import (
        DeQuantStub,
        QuantStub,
        convert,
        disable_observer,
        enable_observer,
        get_default_qat_qconfig_mapping,
        get_default_qconfig,
        get_default_qconfig_mapping,
        prepare,
        quantize_dynamic,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

#: Values of ``method`` for :func:`builtin_ptq`.
METHODS: tuple[str, ...] = ("auto", "fx", "eager")
#: Key under which :func:`builtin_qat_prepare` records the backend in the prepared ``GraphModule.meta``.
_META_BACKEND = "lit_quant_builtin_backend"

@dataclass(frozen=True)
class BuiltinResult:
    """Outcome of :func:`builtin_ptq`.

    Attributes:
        model: the converted int8 model (a ``GraphModule`` for FX, the stub-wrapped module for eager);
            it takes and returns float tensors.
        backend: quantized engine the weights were packed for.
        method: ``"fx"`` (graph mode) or ``"eager"``.
        calib_s: wall time of the calibration forward passes only (not prepare / convert), in seconds.
        fx_error: with ``method="auto"`` and an eager result, why FX graph mode failed; else ``None``.
    """

    model: nn.Module
    backend: str
    method: Literal["fx", "eager"]
    calib_s: float
    fx_error: str | None = None


class _Stubbed(nn.Module):
    """Eager-mode wrapper: quantize the float input, run the model, dequantize the output.

    Eager mode quantizes only between a ``QuantStub`` and a ``DeQuantStub``; a plain float model has
    neither, so they go around it (torchvision's quantizable models have their own and are not wrapped).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.module = module
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.module(self.quant(x)))


def _inputs(batch: Any) -> torch.Tensor:
    """The model input of a calibration batch: the tensor itself, or the first item of ``(x, y)``."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"calibration batches must be tensors or (x, y) pairs, got {type(x).__name__}")
    return x.cpu()  # quantized kernels are CPU only


def _calibrate(model: nn.Module, batches: Iterable) -> float:
    """Run every batch through ``model`` under no-grad (observers record); return the seconds it took.

    Raises:
        UserError: no batches at all (observers without data would give meaningless scales).
    """
    seen = 0
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(_inputs(batch))
            seen += 1
    if not seen:
        raise UserError("no calibration batches: the built-in quantizer needs at least one batch to observe")
    return time.perf_counter() - start


def _ptq_eager(model: nn.Module, batches: Iterable, backend: str) -> tuple[nn.Module, float]:
    float_copy = copy.deepcopy(model).eval()
    if callable(getattr(float_copy, "fuse_model", None)):
        # torchvision's quantizable models know their conv-bn-relu groups; eval mode gives PTQ fusion
        # (BatchNorm folded into the conv).
        float_copy.fuse_model()
    has_stubs = any(isinstance(m, QuantStub) for m in float_copy.modules())
    wrapped = float_copy if has_stubs else _Stubbed(float_copy)
    wrapped.qconfig = get_default_qconfig(backend)
    prepare(wrapped, inplace=True)
    calib_s = _calibrate(wrapped, batches)
    convert(wrapped, inplace=True)
    return wrapped, calib_s


def builtin_ptq(model: nn.Module, calib_batches: Iterable, backend: str, example_input: torch.Tensor,
                method: str = "auto") -> BuiltinResult:
    """Static int8 post-training quantization with torch.ao's defaults for ``backend``.

    The float ``model`` is deep-copied and never modified. FX graph mode traces the model, fuses
    conv-bn(-relu), inserts the observers of ``get_default_qconfig_mapping(backend)`` (HistogramObserver
    for activations, per-channel MinMax for weights on fbgemm / x86 / onednn, per-tensor on qnnpack),
    calibrates and converts. Eager mode (fallback, or ``method="eager"``) needs the model to be
    eager-quantizable: residual adds as ``FloatFunctional`` (torchvision's quantizable models); a plain
    ``a + b`` on quantized tensors fails when the converted model runs.

    Args:
        model: float classifier on CPU.
        calib_batches: tensors or ``(x, y)`` pairs, iterated once; use the same batches as our quantizer.
        backend: one of :func:`available_backends`.
        example_input: one input batch, used by FX to trace.
        method: ``"auto"`` (FX, eager when FX fails to prepare), ``"fx"`` or ``"eager"``.

    Returns:
        the converted model, backend, method used and calibration time.

    Raises:
        UserError: unknown / unavailable backend, unknown method, no calibration batches, or
            ``method="fx"`` on a model FX cannot trace.
    """
    check_backend(backend)
    if method not in METHODS:
        raise UserError(f"unknown built-in quantization method '{method}'; choose from {', '.join(METHODS)}")
    example_input = example_input.cpu()
    with quiet_torch_ao(), use_engine(backend):
        fx_error: str | None = None
        if method in ("auto", "fx"):
            try:
                prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(backend),
                                      (example_input,))
            except Exception as err:  # tracing fails in many ways (TraceError, TypeError, ...)
                fx_error = f"{type(err).__name__}: {err}".strip().splitlines()[0]
                if method == "fx":
                    raise UserError(f"FX graph mode cannot trace this model ({fx_error}); try method 'eager'") from err
            else:
                # Only a failed trace falls back: errors while calibrating or converting are real errors,
                # and the calibration batches may be a one-shot iterator.
                calib_s = _calibrate(prepared, calib_batches)
                return BuiltinResult(convert_fx(prepared), backend, "fx", calib_s)
        quantized, calib_s = _ptq_eager(model, calib_batches, backend)
        return BuiltinResult(quantized, backend, "eager", calib_s, fx_error)


def builtin_qat_prepare(model: nn.Module, backend: str, example_input: torch.Tensor) -> nn.Module:
    """A fake-quantized copy of ``model`` for quantization-aware training (FX graph mode).

    ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping(backend)``: conv-bn pairs become QAT
    ``ConvBn2d`` modules (BatchNorm still trains and is folded at convert time), and fake-quantize modules
    with moving-average observers sit on weights and activations. The copy is in train mode; ``model`` is
    not modified. The backend is recorded in the returned ``GraphModule.meta`` for
    :func:`builtin_qat_convert`.

    Raises:
        UserError: unknown or unavailable backend.
    """
    check_backend(backend)
    with quiet_torch_ao(), use_engine(backend):
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping(backend),
                                  (example_input.cpu(),))
    prepared.meta[_META_BACKEND] = backend
    return prepared


def builtin_qat_switches(model: nn.Module, observing: bool, bn_training: bool | None = None) -> None:
    """Set a :func:`builtin_qat_prepare` model's observers and (unless ``bn_training`` is None) BatchNorm
    statistics on or off, with torch.ao's own ``enable_observer`` / ``disable_observer`` and
    ``update_bn_stats`` / ``freeze_bn_stats`` (the calls torchvision's QAT reference recipe makes at its
    ``--num-observer-update-epochs`` and ``--num-batch-norm-update-epochs``). Frozen observers keep their
    last qparams; frozen BatchNorm folds its running statistics. ``update_bn_stats`` also puts the
    BatchNorm in train mode, so call it for training only."""
    model.apply(enable_observer if observing else disable_observer)
    if bn_training is not None:
        model.apply(update_bn_stats if bn_training else freeze_bn_stats)


def builtin_qat_convert(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Convert a (trained) :func:`builtin_qat_prepare` model into a real int8 model in eval mode.

    Args:
        model: the prepared ``GraphModule``; it is copied, not modified.
        backend: engine to pack the weights for; default: the one the model was prepared for.

    Raises:
        UserError: unknown or unavailable backend, or a model that did not come from
            :func:`builtin_qat_prepare` and no ``backend`` given.
    """
    meta = getattr(model, "meta", None)
    if backend is None:
        backend = meta.get(_META_BACKEND) if isinstance(meta, dict) else None
        if backend is None:
            raise UserError("builtin_qat_convert needs a model from builtin_qat_prepare or an explicit backend")
    check_backend(backend)
    with quiet_torch_ao(), use_engine(backend):
        return convert_fx(copy.deepcopy(model).eval())


def builtin_dynamic(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Dynamic int8 quantization of every ``nn.Linear`` (``quantize_dynamic``), on a copy of ``model``.

    Weights are int8 (per tensor); activations stay float and are quantized on the fly per batch, so no
    calibration is needed. Convolutions stay float: dynamic quantization only covers Linear / RNN layers.

    Args:
        model: float model; not modified.
        backend: engine to pack the weights for; default: the current ``torch.backends.quantized.engine``.

    Raises:
        UserError: unknown or unavailable backend.
    """
    backend = check_backend(backend) if backend is not None else torch.backends.quantized.engine
    with quiet_torch_ao(), use_engine(backend):
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


class HalfPrecision(nn.Module):
    """A half-precision model that takes and returns float32, so it drops into the float evaluation loop.

    The input is cast to :attr:`dtype` on the way in and the logits back to float32 on the way out; the
    weights (and so ``state_dict`` size) are in :attr:`dtype`.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).float()


def _half_runs(model: nn.Module, example_input: torch.Tensor, dtype: torch.dtype) -> bool:
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).to(dtype)(example_input.to(dtype))
        return bool(torch.isfinite(out).all())
    except (RuntimeError, NotImplementedError):  # "... not implemented for 'Half'" on older CPU kernels
        return False


def builtin_half(model: nn.Module, example_input: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> HalfPrecision:
    """A half-precision copy of ``model`` (``model.half()``), wrapped as :class:`HalfPrecision`.

    Choice of format: fp16 when a forward on ``example_input`` runs on this CPU in fp16 and gives finite
    logits, else bf16. fp16 is what the seed does (``model.half()``) and keeps 10 mantissa bits, so its
    logits stay closer to float32; bf16 is the fallback because every CPU op implements it and its 8-bit
    exponent cannot overflow. Both halve the size on disk. Note that on CPUs without native fp16 / bf16
    arithmetic (AVX2-only, like this project's machine) either is usually *slower* than float32: the
    point of this mode is size and the accuracy cost, not CPU speed.

    Args:
        model: float model; not modified.
        example_input: one input batch to try fp16 on; without it, fp16 is tried on a tiny conv-bn-linear.
        dtype: force ``torch.float16`` or ``torch.bfloat16`` instead of deciding.

    Raises:
        UserError: ``dtype`` is not a 16-bit float type.
    """
    if dtype is None:
        if example_input is not None:
            dtype = torch.float16 if _half_runs(model, example_input.cpu(), torch.float16) else torch.bfloat16
        else:
            dtype = torch.float16 if _fp16_probe() else torch.bfloat16
    if dtype not in (torch.float16, torch.bfloat16):
        raise UserError(f"half precision must be torch.float16 or torch.bfloat16, got {dtype}")
    return HalfPrecision(copy.deepcopy(model).eval().to(dtype), dtype)


@functools.cache
def _fp16_probe() -> bool:
    probe = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2)).eval()
    return _half_runs(probe, torch.randn(2, 1, 8, 8), torch.float16)
