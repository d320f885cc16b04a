"""A fused CPU kernel for per-tensor fake quantization, compiled on first use.

Eager PyTorch needs four passes over an activation to fake-quantize it (multiply, round, clamp,
multiply), and activations are most of what QAT adds to a training step. The kernel does it in one pass
with the same float32 arithmetic, so its output is bit-identical to :func:`lit_quant.quant.functional.
fake_quantize` (tested)::

    x_hat = clamp(round_half_even(fl32(x * inv)), lo, hi) * s      (NaN propagates, as torch.clamp)

It is built with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja; the build is cached
under ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default). Without a compiler (after one
warning) or with ``LIT_QUANT_NO_KERNELS=1``, :func:`fused_fake_quantize` returns ``None`` and callers keep
the eager path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

// One pass of x_hat = clamp(nearbyint(x * inv), lo, hi) * s over a contiguous float32 tensor. nearbyint in
// the default rounding mode is round half to even (torch.round); the ternary clamp keeps NaN like torch.clamp.
torch::Tensor fake_quantize_per_tensor(const torch::Tensor& x, double inv, double lo, double hi, double s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32 CPU tensor expected");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float finv = static_cast<float>(inv), flo = static_cast<float>(lo), fhi = static_cast<float>(hi),
              fs = static_cast<float>(s);
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float r = std::nearbyint(px[i] * finv);
      r = r < flo ? flo : (r > fhi ? fhi : r);
      po[i] = r * fs;
    }
  });
  return out;
}

"""

_lock = threading.Lock()
_module: Any = None
_failed = False


def _build_tag() -> str:
    """A short hash of the kernel source and this CPU's model and feature flags (``/proc/cpuinfo``; the
    platform elsewhere): another CPU or another version of the source gets its own build folder, so no
    process ever has its loaded library rebuilt under it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    except OSError:
        info = platform.processor() + platform.machine()
    return hashlib.sha1((info + _SOURCE).encode()).hexdigest()[:10]


def _load() -> Any:
    """The compiled extension, or ``None`` when it cannot be built (warned once)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is None and not _failed:
            if os.environ.get("LIT_QUANT_NO_KERNELS", "") not in ("", "0"):
                _failed = True
                return None
            try:
                # importing cpp_extension logs a CUDA_HOME notice on CPU-only machines: not ours to show
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                from torch.utils.cpp_extension import load_inline

                # -march=native: vector rounding instructions (x86-64's SSE2 baseline has none, and a libm call
                # per element would be slower than eager torch); the build is named after this CPU and source,
                # so a shared cache never hands it to another CPU or version. -ffp-contract=off: no fused
                # multiply-add, so each product rounds as torch's does.
                _module = load_inline(f"lit_quant_fake_quant_{_build_tag()}", cpp_sources=_SOURCE,
                                      functions=["fake_quantize_per_tensor"],
                                      extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno"],
                                      verbose=False)
            except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no compiler / ninja:
                # the eager path is exact, only slower
                _failed = True
                warnings.warn(f"lit-quant: the fused fake-quant kernel could not be built ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager path",
                              RuntimeWarning, stacklevel=3)
    return _module


def fused_fake_quantize(x: torch.Tensor, inv: float, lo: float, hi: float, scale: float) -> torch.Tensor | None:
    """``clamp(round(x * inv), lo, hi) * scale`` in one pass (float32 CPU ``x``), or ``None`` when the
    kernel is unavailable (the caller then computes the same thing eagerly)."""
    module = _load()
    if module is None or x.dtype != torch.float32 or not x.is_cpu:
        return None
    return module.fake_quantize_per_tensor(x, inv, lo, hi, scale)
