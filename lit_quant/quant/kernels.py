"""Fused CPU kernels for per-tensor fake quantization, compiled on first use.

Eager PyTorch needs four passes over an activation to fake-quantize it (multiply, round, clamp,
multiply), one more for its observer's min / max, and several for LSQ's backward; activations are most of
what QAT adds to a training step. The kernels do each in one pass with the same float32 arithmetic
(AVX-512 or AVX2 intrinsics where the CPU has them, a scalar loop elsewhere), so their output is
bit-identical to :func:`lit_quant.quant.functional.fake_quantize` (tested)::

    x_hat = clamp(round_half_even(fl32(x * inv)), lo, hi) * s      (NaN propagates, as torch.clamp)

plus, on request, ``(min x, max x)`` from the same pass (:func:`fused_fake_quantize`), and LSQ's input and
step-size gradients from one pass over ``x`` and the output gradient (:func:`fused_lsq_backward`).

They are built with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and ninja; the build is
cached under ``TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default). Without a compiler (after
one warning) or with ``LIT_QUANT_NO_KERNELS=1``, the functions return ``None`` and callers keep the eager
path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// Min / max of the elements seen and whether one was NaN. Vector min/max instructions drop a NaN operand,
// so NaN is tracked on its own and the range is then reported as NaN (torch.aminmax propagates NaN).
struct Range {
  float lo = std::numeric_limits<float>::infinity();
  float hi = -std::numeric_limits<float>::infinity();
  bool nan = false;
  void merge(const Range& o) {
    lo = std::min(lo, o.lo);
    hi = std::max(hi, o.hi);
    nan = nan || o.nan;
  }
};

// clamp(nearbyint(v * inv), lo, hi) * s; nearbyint in the default rounding mode is round half to even
// (torch.round); the ternary clamp keeps NaN like torch.clamp.
inline float fq1(float v, float inv, float lo, float hi, float s) {
  float r = std::nearbyint(v * inv);
  r = r < lo ? lo : (r > hi ? hi : r);
  return r * s;
}

// One chunk of the fake-quant pass, with the range of its input when kRange.
template <bool kRange>
void fq_chunk(const float* px, float* po, int64_t n, float inv, float lo, float hi, float s, Range& range) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vinv = _mm512_set1_ps(inv), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi),
               vs = _mm512_set1_ps(s);
  __m512 vmin = _mm512_set1_ps(range.lo), vmax = _mm512_set1_ps(range.hi);
  __mmask16 nan = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(px + i);
    if (kRange) {
      vmin = _mm512_min_ps(vmin, v);
      vmax = _mm512_max_ps(vmax, v);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(vhi, _mm512_max_ps(vlo, r));  // max / min return the second operand for NaN: r stays NaN
    _mm512_storeu_ps(po + i, _mm512_mul_ps(r, vs));
  }
  if (kRange) {
    range.lo = _mm512_reduce_min_ps(vmin);
    range.hi = _mm512_reduce_max_ps(vmax);
    range.nan = range.nan || nan != 0;
  }
#elif defined(__AVX2__)
  const __m256 vinv = _mm256_set1_ps(inv), vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi),
               vs = _mm256_set1_ps(s);
  __m256 vmin = _mm256_set1_ps(range.lo), vmax = _mm256_set1_ps(range.hi), nan = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(px + i);
    if (kRange) {
      vmin = _mm256_min_ps(vmin, v);
      vmax = _mm256_max_ps(vmax, v);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m256 r = _mm256_round_ps(_mm256_mul_ps(v, vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(vhi, _mm256_max_ps(vlo, r));
    _mm256_storeu_ps(po + i, _mm256_mul_ps(r, vs));
  }
  if (kRange) {
    alignas(32) float mins[8], maxs[8];
    _mm256_store_ps(mins, vmin);
    _mm256_store_ps(maxs, vmax);
    for (int k = 0; k < 8; ++k) {
      range.lo = std::min(range.lo, mins[k]);
      range.hi = std::max(range.hi, maxs[k]);
    }
    range.nan = range.nan || _mm256_movemask_ps(nan) != 0;
  }
#endif
  for (; i < n; ++i) {
    const float v = px[i];
    if (kRange) {
      if (v != v) {
        range.nan = true;
      } else {
        range.lo = std::min(range.lo, v);
        range.hi = std::max(range.hi, v);
      }
    }
    po[i] = fq1(v, inv, lo, hi, s);
  }
}

template <bool kRange>
torch::Tensor fq_impl(const torch::Tensor& x, double inv, double lo, double hi, double s, torch::Tensor* range_out) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "float32 CPU tensor expected");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor out = torch::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float finv = static_cast<float>(inv), flo = static_cast<float>(lo), fhi = static_cast<float>(hi),
              fs = static_cast<float>(s);
  Range total;
  std::mutex mutex;
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    Range local;
    fq_chunk<kRange>(px + begin, po + begin, end - begin, finv, flo, fhi, fs, local);
    if (kRange) {
      std::lock_guard<std::mutex> guard(mutex);
      total.merge(local);
    }
  });
  if (kRange) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    float* pr = range_out->data_ptr<float>();
    pr[0] = total.nan ? nan : total.lo;
    pr[1] = total.nan ? nan : total.hi;
  }
  return out;
}

}  // namespace

// x_hat = clamp(round(x * inv), lo, hi) * s over a float32 CPU tensor, in one pass.
torch::Tensor fake_quantize_per_tensor(const torch::Tensor& x, double inv, double lo, double hi, double s) {
  return fq_impl<false>(x, inv, lo, hi, s, nullptr);
}

// The same pass, also writing (min x, max x) into the float32 2-element tensor range (NaN if x has a NaN).
torch::Tensor fake_quantize_per_tensor_range(const torch::Tensor& x, double inv, double lo, double hi, double s,
                                             torch::Tensor range) {
  TORCH_CHECK(range.scalar_type() == at::kFloat && range.is_contiguous() && range.numel() == 2,
              "range: a contiguous float32 tensor of 2 elements expected");
  return fq_impl<true>(x, inv, lo, hi, s, &range);
}

// LSQ backward (Esser et al. 2020) in one pass over the saved input x and the output gradient g, per tensor:
//   v = x (relu: 0 where x <= 0), u = fl(v * inv), r = round(u)
//   dx = g where lo <= r <= hi (and x > 0 with relu), else 0
//   sum of g * ds with ds = r - u inside, lo below, hi above (accumulated in double)
// Returns (dx, the sum as a 1-element float64 tensor).
std::vector<torch::Tensor> lsq_backward_per_tensor(const torch::Tensor& grad, const torch::Tensor& x, double inv,
                                                   double lo, double hi, bool relu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat && x.device().is_cpu() &&
              grad.device().is_cpu() && x.numel() == grad.numel(), "float32 CPU tensors of one size expected");
  const torch::Tensor xc = x.contiguous(), gc = grad.contiguous().view(xc.sizes());
  torch::Tensor dx = torch::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  const float* pg = gc.data_ptr<float>();
  float* pd = dx.data_ptr<float>();
  const float finv = static_cast<float>(inv), flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
  // Partial sums are added in chunk order, not in the order threads finish, so the result is deterministic.
  std::vector<std::pair<int64_t, double>> partial;
  std::mutex mutex;
  at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    double sum = 0.0;
#if defined(__AVX512F__)
    const __m512 vinv = _mm512_set1_ps(finv), vlo = _mm512_set1_ps(flo), vhi = _mm512_set1_ps(fhi),
                 zero = _mm512_setzero_ps();
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    for (; i + 16 <= end; i += 16) {
      const __m512 xv = _mm512_loadu_ps(px + i), g = _mm512_loadu_ps(pg + i);
      const __mmask16 off = relu ? _mm512_cmp_ps_mask(xv, zero, _CMP_LE_OQ) : __mmask16(0);
      const __m512 v = _mm512_mask_mov_ps(xv, off, zero);
      const __m512 u = _mm512_mul_ps(v, vinv);
      const __m512 r = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __mmask16 below = _mm512_cmp_ps_mask(r, vlo, _CMP_LT_OQ), above = _mm512_cmp_ps_mask(r, vhi, _CMP_GT_OQ);
      __m512 ds = _mm512_sub_ps(r, u);
      ds = _mm512_mask_mov_ps(ds, below, vlo);
      ds = _mm512_mask_mov_ps(ds, above, vhi);
      _mm512_storeu_ps(pd + i, _mm512_maskz_mov_ps(static_cast<__mmask16>(~(below | above | off)), g));
      const __m512 p = _mm512_mul_ps(g, ds);
      acc0 = _mm512_add_pd(acc0, _mm512_cvtps_pd(_mm512_castps512_ps256(p)));
      acc1 = _mm512_add_pd(acc1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p), 1))));
    }
    sum = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
#endif
    for (; i < end; ++i) {
      const bool off = relu && px[i] <= 0.0f;
      const float v = off ? 0.0f : px[i], u = v * finv, r = std::nearbyint(u);
      const bool below = r < flo, above = r > fhi;
      const float ds = below ? flo : (above ? fhi : r - u);
      pd[i] = (below || above || off) ? 0.0f : pg[i];
      sum += static_cast<double>(pg[i] * ds);
    }
    std::lock_guard<std::mutex> guard(mutex);
    partial.emplace_back(begin, sum);
  });
  std::sort(partial.begin(), partial.end());
  double total = 0.0;
  for (const auto& p : partial) total += p.second;
  return {dx, torch::full({1}, total, xc.options().dtype(at::kDouble))};
}
"""

_FUNCTIONS = ("fake_quantize_per_tensor", "fake_quantize_per_tensor_range", "lsq_backward_per_tensor")

_lock = threading.Lock()
_module: Any = None
_failed = False
#: Called once, just before a build that is not in the extension cache starts (see :func:`set_build_notice`).
_build_notice: Callable[[], None] | None = None


def set_build_notice(notice: Callable[[], None] | None) -> None:
    """Have ``notice()`` called right before the one-time compilation (about a minute) starts, so a front end
    can tell its user why the first calibration pauses; the core itself prints nothing. ``None`` removes it."""
    global _build_notice
    _build_notice = notice


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

                if _build_notice is not None and not _cached():
                    _build_notice()
                # -march=native: vector rounding instructions (x86-64's SSE2 baseline has none, and a libm call
                # per element would be slower than eager torch); the build is named after this CPU and source,
                # so a shared cache never hands it to another CPU or version. -ffp-contract=off: no fused
                # multiply-add, so each product rounds as torch's does.
                _module = load_inline(_name(), cpp_sources=_SOURCE,
                                      functions=list(_FUNCTIONS),
                                      extra_cflags=["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno"],
                                      verbose=False)
            except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:  # no compiler / ninja:
                # the eager path is exact, only slower
                _failed = True
                warnings.warn(f"lit-quant: the fused fake-quant kernel could not be built ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); using the eager path",
                              RuntimeWarning, stacklevel=3)
    return _module


def _name() -> str:
    return f"lit_quant_fake_quant_{_build_tag()}"


def ready() -> bool:
    """Whether :func:`available` would return without compiling: the kernels are loaded, were refused or
    disabled, or this CPU's build is already in the extension cache. A front end uses it to tell the user
    about the one-time compilation (about a minute) before it starts; the core itself prints nothing."""
    if _module is not None or _failed or os.environ.get("LIT_QUANT_NO_KERNELS", "") not in ("", "0"):
        return True
    return _cached()


def _cached() -> bool:
    """Whether this CPU's build of the current source is in torch's extension cache."""
    try:
        # importing cpp_extension logs a CUDA_HOME notice on CPU-only machines: not ours to show
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(_name(), verbose=False)).glob("*.so"))
    except Exception:  # noqa: BLE001 - an unknown cache layout: say it may compile
        return False


def available() -> bool:
    """Whether the kernels can be used (built now if they were not yet; ``False`` after a failed build)."""
    return _load() is not None


def fused_fake_quantize(x: torch.Tensor, inv: float, lo: float, hi: float, scale: float,
                        observed: torch.Tensor | None = None) -> torch.Tensor | None:
    """``clamp(round(x * inv), lo, hi) * scale`` in one pass (float32 CPU ``x``), or ``None`` when the
    kernel is unavailable (the caller then computes the same thing eagerly).

    ``observed``: a float32 CPU tensor of 2 elements that receives ``(min x, max x)`` from the same pass
    (NaN for both when ``x`` holds a NaN, as ``torch.aminmax``), so an observer costs no pass of its own.
    """
    module = _load()
    if module is None or x.dtype != torch.float32 or not x.is_cpu:
        return None
    if observed is None:
        return module.fake_quantize_per_tensor(x, inv, lo, hi, scale)
    return module.fake_quantize_per_tensor_range(x, inv, lo, hi, scale, observed)


def fused_lsq_backward(grad: torch.Tensor, x: torch.Tensor, inv: float, lo: float, hi: float,
                       relu: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """LSQ's backward per tensor in one pass over ``x`` and ``grad`` (Esser et al. 2020), or ``None``::

        v = relu(x) if relu else x,   u = fl32(v * inv),   r = round(u)
        dx = grad  where lo <= r <= hi (and x > 0 with relu),  0 elsewhere
        ds = sum(grad * (r - u  inside,  lo  below,  hi  above))       (float64 sum, in chunk order)

    Returns ``(dx, ds)``, ``ds`` a float64 tensor of one element (the caller scales it by the LSQ gradient
    factor). The eager path (:class:`lit_quant.quant.functional._FakeQuantizeLSQ`) computes the same.
    """
    module = _load()
    if module is None or x.dtype != torch.float32 or grad.dtype != torch.float32 or not x.is_cpu:
        return None
    dx, ds = module.lsq_backward_per_tensor(grad, x, inv, lo, hi, relu)
    return dx, ds
