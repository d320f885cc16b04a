"""torch.ao's quantized engines on this CPU: which run here, selecting one for a block, and torch.ao's
deprecation noise kept out of the way. The int8 export packs weights for an engine; the torch.ao reference
rows of the application run on the same ones.

``torch.ao.quantization`` is deprecated upstream (it moves to torchao) and warns on every call; those
warnings are silenced inside :func:`quiet_torch_ao` only, never with a global filter, so that the rest of
the program still sees every other warning.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from lit_quant.deploy.graph import ExportError
from lit_quant.deploy.options import BACKENDS

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

# Warnings torch.ao emits on every call that say nothing about the model: the module-level deprecation,
# the deprecation of quantized tensor dtypes (raised from C++ as a UserWarning), and the notice that torch's
# *own* default fbgemm / x86 qconfig uses the old ``reduce_range`` argument. oneDNN's warning about
# ``reduce_range=False`` without VNNI stays visible: it is a real accuracy caveat on CPUs like this one.
_NOISE = (
    r".*quantized tensor creation functions.*deprecated",
    r"Please use quant_min and quant_max to specify the range for observers",
)


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation noise for the duration of the block (restored on exit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for pattern in _NOISE:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
        yield


@contextlib.contextmanager
def use_engine(backend: str) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` to ``backend`` for the block and restore the previous one.

    The engine is process-global state: it decides how weights are packed at convert time, so every
    conversion runs under its backend's engine, and nothing leaks to the caller afterwards.
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _engine_runs(backend: str) -> bool:
    """Whether a tiny conv quantized for ``backend`` converts and runs on this CPU."""
    try:
        with quiet_torch_ao(), use_engine(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the probe's accuracy is irrelevant, so is oneDNN's VNNI caveat
            model = nn.Sequential(QuantStub(), nn.Conv2d(1, 2, 1), DeQuantStub()).eval()
            model.qconfig = get_default_qconfig(backend)
            prepare(model, inplace=True)
            x = torch.randn(1, 1, 4, 4)
            model(x)
            convert(model, inplace=True)
            return bool(torch.isfinite(model(x)).all())
    except Exception:  # noqa: BLE001 - any failure (kernels missing or unsupported by this CPU) means "not here"
        return False


@functools.cache
def _available() -> tuple[str, ...]:
    # Listed in supported_engines only means "compiled in"; running a real quantized conv proves the kernels
    # work on this CPU. Cached because the probe costs a prepare/convert per engine.
    supported = set(torch.backends.quantized.supported_engines)
    return tuple(b for b in BACKENDS if b in supported and _engine_runs(b))


def available_backends() -> list[str]:
    """Backends of :data:`BACKENDS` whose quantized conv runs on this CPU, in :data:`BACKENDS` order.

    The check runs once per process (a tiny conv is prepared, calibrated, converted and run per engine).
    """
    return list(_available())


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is available here.

    Raises:
        ExportError: unknown or unavailable backend; the message lists the available ones.
    """
    available = available_backends()
    if backend not in available:
        what = ("unknown quantized backend" if backend not in BACKENDS
                else "quantized backend not available on this CPU:")
        raise ExportError(f"{what} '{backend}'; available here: {', '.join(available) or 'none'}")
    return backend
