"""Qparams math and fake quantization, checked bit for bit against torch's own kernels and torch.ao."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_quant.quant import QuantSpec, calculate_qparams, dequantize, fake_quantize, lsq_fake_quantize, quantize

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import observer as ao_obs


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, 5, 5, generator=g) * 3


@pytest.mark.parametrize("scale,zp,qmin,qmax", [(0.0371, 3, 0, 255), (0.011, 0, -128, 127), (0.2, -2, -8, 7),
                                                (1e-3, 100, 0, 65535), (0.5, 0, -2, 1)])
def test_fake_quantize_equals_torch_per_tensor(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> None:
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    ours = fake_quantize(x, s, z, qmin, qmax)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_fake_quantize_equals_torch_per_channel(x: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(1)
    for axis in (0, 1):
        c = x.shape[axis]
        s = torch.rand(c, generator=g) * 0.1 + 0.01
        z = torch.randint(0, 30, (c,), generator=g, dtype=torch.int32)
        ours = fake_quantize(x, s, z, 0, 255, axis=axis)
        ref = torch.fake_quantize_per_channel_affine(x, s, z, axis, 0, 255)
        torch.testing.assert_close(ours, ref, atol=0, rtol=0)


def test_gradient_is_clipped_ste_like_torch(x: torch.Tensor) -> None:
    s, z = torch.tensor([0.05]), torch.tensor([10], dtype=torch.int32)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    (fake_quantize(a, s, z, 0, 255) * g).sum().backward()
    (torch.fake_quantize_per_tensor_affine(b, s, z, 0, 255) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    assert 0 < int((a.grad == 0).sum()) < x.numel()  # some values clipped, some passed straight through


def test_on_grid_values_come_back_unchanged() -> None:
    s, z = torch.tensor([0.125]), torch.tensor([3], dtype=torch.int32)
    grid = (torch.arange(0, 16, dtype=torch.float32) - 3) * 0.125
    torch.testing.assert_close(fake_quantize(grid, s, z, 0, 15), grid, atol=0, rtol=0)


def test_quantize_dequantize_is_fake_quantize(x: torch.Tensor) -> None:
    s, z = torch.tensor([0.03]), torch.tensor([-5], dtype=torch.int32)
    qt = quantize(x, s, z, -128, 127)
    assert qt.int_repr.dtype == torch.int32 and int(qt.int_repr.min()) >= -128 and int(qt.int_repr.max()) <= 127
    torch.testing.assert_close(dequantize(qt), fake_quantize(x, s, z, -128, 127), atol=0, rtol=0)


def test_bf16_input_is_computed_in_float32(x: torch.Tensor) -> None:
    s, z = torch.tensor([0.05]), torch.tensor([0], dtype=torch.int32)
    xb = x.bfloat16().requires_grad_()
    out = fake_quantize(xb, s, z, -128, 127)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, fake_quantize(xb.detach().float(), s, z, -128, 127).bfloat16(), atol=0, rtol=0)
    out.sum().backward()
    assert xb.grad is not None and xb.grad.dtype == torch.bfloat16


def test_lsq_matches_torch_learnable_fake_quantize(x: torch.Tensor) -> None:
    s0, zp = 0.07, 5
    s = torch.tensor([s0], requires_grad=True)
    a = x.clone().requires_grad_()
    g = torch.randn_like(x)
    (lsq_fake_quantize(a, s, torch.tensor([zp], dtype=torch.int32), 0, 15, grad_factor=0.3) * g).sum().backward()
    s_ref = torch.tensor([s0], requires_grad=True)
    b = x.clone().requires_grad_()
    ref = torch._fake_quantize_learnable_per_tensor_affine(b, s_ref, torch.tensor([float(zp)]), 0, 15, 0.3)
    (ref * g).sum().backward()
    torch.testing.assert_close(lsq_fake_quantize(x, s, torch.tensor([zp]), 0, 15), ref.detach(), atol=0, rtol=0)
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=1e-5, atol=1e-6)


def test_lsq_per_channel_scale_gets_one_gradient_per_channel(x: torch.Tensor) -> None:
    s = torch.full((4,), 0.1, requires_grad=True)
    lsq_fake_quantize(x, s, torch.zeros(4, dtype=torch.int32), -8, 7, axis=1).pow(2).sum().backward()
    assert s.grad is not None and s.grad.shape == (4,) and bool((s.grad != 0).all())


@pytest.mark.parametrize("lo,hi", [(-1.3, 2.7), (0.5, 4.0), (-3.0, -0.2), (0.0, 0.0), (2.0, 2.0), (-1e-9, 1e-9)])
def test_calculate_qparams_matches_torch_ao(lo: float, hi: float) -> None:
    mn, mx = torch.tensor([lo]), torch.tensor([hi])
    cases = [(QuantSpec(8, "asym_u"), torch.quint8, torch.per_tensor_affine),
             (QuantSpec(8, "asym_s"), torch.qint8, torch.per_tensor_affine),
             (QuantSpec(8, "sym"), torch.qint8, torch.per_tensor_symmetric)]
    for spec, dtype, qscheme in cases:
        ref = ao_obs.MinMaxObserver(dtype=dtype, qscheme=qscheme)
        scale, zp = calculate_qparams(mn, mx, spec)
        ref_scale, ref_zp = ref._calculate_qparams(mn, mx)
        torch.testing.assert_close(scale, ref_scale, atol=0, rtol=0)
        assert zp.tolist() == ref_zp.tolist(), (spec, lo, hi)


def test_qparams_edge_cases_documented() -> None:
    spec = QuantSpec(4, "asym_u")
    scale, zp = calculate_qparams(torch.tensor([0.0]), torch.tensor([0.0]), spec)
    assert float(scale) == torch.finfo(torch.float32).eps and int(zp) == 0
    scale, zp = calculate_qparams(torch.tensor([1.0]), torch.tensor([3.0]), spec)  # all positive: min -> 0
    assert float(scale) == pytest.approx(3.0 / 15) and int(zp) == 0
    scale, zp = calculate_qparams(torch.tensor([-2.0]), torch.tensor([1.0]), QuantSpec(4, "sym", narrow_range=True))
    assert int(zp) == 0 and float(scale) == pytest.approx(2.0 / 7)


@pytest.mark.parametrize("zp,qmin,qmax", [(0, 0, 255), (7, 0, 15), (0, -128, 127)])
def test_gradient_at_the_clamp_bounds_equals_torch(zp: int, qmin: int, qmax: int) -> None:
    """Values on, half a step inside and half a step outside each bound (the ties of round half to even)."""
    s, z = torch.tensor([0.25]), torch.tensor([zp], dtype=torch.int32)
    grid = torch.arange(qmin - zp - 3, qmax - zp + 4, dtype=torch.float32)
    x = torch.cat([grid, grid + 0.5, grid - 0.5, grid + 0.49]) * 0.25
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.rand_like(x) + 0.5
    (fake_quantize(a, s, z, qmin, qmax) * g).sum().backward()
    (torch.fake_quantize_per_tensor_affine(b, s, z, qmin, qmax) * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    torch.testing.assert_close(fake_quantize(x, s, z, qmin, qmax),
                               torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax), atol=0, rtol=0)


@pytest.mark.parametrize("scale,zp,qmin,qmax", [(0.1, 0, 0, 255), (0.0173, 9, 0, 15), (3.3e-3, 0, -128, 127),
                                                (1.7, -3, -8, 7)])
def test_gradient_mask_flips_on_the_same_float_as_torch(scale: float, zp: int, qmin: int, qmax: int) -> None:
    """Every float32 within 64 ulps of each rounding edge ``(bound +- 1/2) * s`` and of each bound: the
    straight-through mask (found on ``x`` itself, :func:`_ste_interval`) flips on the same float as torch's,
    for scales whose reciprocal is inexact."""
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    centres = torch.tensor([(qmin - zp - 0.5) * scale, (qmax - zp + 0.5) * scale, (qmin - zp) * scale,
                            (qmax - zp) * scale])
    bits = centres.view(torch.int32).reshape(-1, 1) + torch.arange(-64, 65, dtype=torch.int32)
    x = bits.view(torch.float32).reshape(-1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.rand_like(x) + 0.5
    (fake_quantize(a, s, z, qmin, qmax) * g).sum().backward()
    (torch.fake_quantize_per_tensor_affine(b, s, z, qmin, qmax) * g).sum().backward()
    assert 0 < int((a.grad == 0).sum()) < x.numel()  # both sides of the edges are in the sample
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)


def test_fused_kernel_is_bit_identical_to_the_eager_path() -> None:
    """The one-pass CPU kernel against the four eager ops it replaces and torch's own fake quantize: random
    values, exact ties of round half to even, values beyond both bounds, +-inf and NaN, and a non-contiguous
    input. Skipped only where no C++ compiler can build it (CI installs one, so it runs there)."""
    from lit_quant.quant.kernels import fused_fake_quantize

    torch.manual_seed(0)
    scale, zp, qmin, qmax = 0.0173, 9, 0, 15
    inv, lo, hi = float(torch.reciprocal(torch.tensor(scale))), float(qmin - zp), float(qmax - zp)
    x = torch.cat([torch.randn(100_000) * 0.2, (torch.arange(-40, 40) + 0.5) * scale,
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])])
    fused = fused_fake_quantize(x, inv, lo, hi, scale)
    if fused is None:
        pytest.skip("no C++ compiler to build the fused kernel")
    eager = torch.mul(x, inv).round_().clamp_(lo, hi).mul_(scale)
    torch.testing.assert_close(fused, eager, atol=0, rtol=0, equal_nan=True)
    finite = torch.isfinite(x)  # torch's kernel casts to an integer first, so only finite values compare
    ref = torch.fake_quantize_per_tensor_affine(x[finite], scale, zp, qmin, qmax)
    torch.testing.assert_close(fused[finite], ref, atol=0, rtol=0)
    strided = x[: 2 * 40_000].reshape(2, -1).t()
    torch.testing.assert_close(fused_fake_quantize(strided, inv, lo, hi, scale),
                               torch.mul(strided, inv).round_().clamp_(lo, hi).mul_(scale), atol=0, rtol=0)


def test_without_a_compiler_the_eager_path_runs_after_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build failure (no g++ / ninja) warns once, then every call takes the eager path: same values."""
    import torch.utils.cpp_extension as cpp

    from lit_quant.quant import kernels

    calls = []

    def no_compiler(*args: object, **kwargs: object) -> None:
        calls.append(1)
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setattr(cpp, "load_inline", no_compiler)
    x = torch.randn(1000)
    s, z = torch.tensor([0.03]), torch.tensor([3], dtype=torch.int32)
    with pytest.warns(RuntimeWarning, match="could not be built .*Ninja is required"):
        first = fake_quantize(x, s, z, 0, 15)
    second = fake_quantize(x, s, z, 0, 15)
    assert len(calls) == 1 and kernels.fused_fake_quantize(x, 1.0, 0.0, 1.0, 1.0) is None
    torch.testing.assert_close(first, torch.fake_quantize_per_tensor_affine(x, s, z, 0, 15), atol=0, rtol=0)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def _no_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the kernels unavailable (the eager path), as without a compiler or with LIT_QUANT_NO_KERNELS=1."""
    from lit_quant.quant import kernels

    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", True)


def _edge_values(scale: float) -> torch.Tensor:
    """Random values, exact rounding ties, both signs of zero and values just either side of it."""
    g = torch.Generator().manual_seed(1)
    ties = (torch.arange(-40, 300, dtype=torch.float32) + 0.5) * scale
    return torch.cat([torch.randn(70_001, generator=g) * 0.3, ties,
                      torch.tensor([0.0, -0.0, 1e-30, -1e-30, scale / 2, -scale / 2])])


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "eager"])
@pytest.mark.parametrize("zp,qmin,qmax", [(9, 0, 15), (0, 0, 255), (0, -128, 127), (3, -8, 7)])
def test_fused_relu_and_range_equal_relu_then_torch_fake_quantize(monkeypatch: pytest.MonkeyPatch, kernels: bool,
                                                                   zp: int, qmin: int, qmax: int) -> None:
    """``fake_quantize(x, relu=True, observed=r)``: values and gradient as torch's fake quantize of
    ``torch.relu(x)``, and ``r`` the min / max of ``relu(x)``; with the kernels and on the eager path."""
    if not kernels:
        _no_kernels(monkeypatch)
    scale = 0.0173
    s, z = torch.tensor([scale]), torch.tensor([zp], dtype=torch.int32)
    x = _edge_values(scale)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    observed = torch.empty(2)
    ours = fake_quantize(a, s, z, qmin, qmax, relu=True, observed=observed)
    ref = torch.fake_quantize_per_tensor_affine(torch.relu(b), s, z, qmin, qmax)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    g = torch.rand_like(x) + 0.5
    (ours * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    assert observed.tolist() == [float(v) for v in torch.aminmax(torch.relu(x))]
    plain = torch.empty(2)  # without relu: the range of x itself
    fake_quantize(x, s, z, qmin, qmax, observed=plain)
    assert plain.tolist() == [float(x.min()), float(x.max())]
    nan = torch.empty(2)
    fake_quantize(torch.tensor([1.0, float("nan"), -2.0] * 40), s, z, qmin, qmax, observed=nan)
    assert torch.isnan(nan).all()


def test_fused_relu_and_range_off_the_fast_path_per_channel() -> None:
    """Per-channel qparams take the eager branch, where the wrapper applies relu and reads the range."""
    x = _edge_values(0.02)[:70_000].reshape(7, -1)
    s, z = torch.tensor([0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3]), torch.zeros(7, dtype=torch.int32)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    observed = torch.empty(2)
    ours = fake_quantize(a, s, z, -128, 127, axis=0, relu=True, observed=observed)
    ref = torch.fake_quantize_per_channel_affine(torch.relu(b), s, z, 0, -128, 127)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    ours.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    assert observed.tolist() == [0.0, float(x.max())]


def _lsq_pass(x: torch.Tensor, g: torch.Tensor, scale: float, z: torch.Tensor, qmin: int, qmax: int, relu: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, input gradient, scale gradient and observed range of our LSQ on ``x`` against gradient ``g``."""
    a, s = x.clone().requires_grad_(), torch.tensor([scale], requires_grad=True)
    observed = torch.empty(2)
    out = lsq_fake_quantize(a, s, z, qmin, qmax, relu=relu, observed=observed)
    (out * g).sum().backward()
    return out.detach(), a.grad, s.grad, observed


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("zp,qmin,qmax", [(9, 0, 15), (0, -4, 3), (0, 0, 255)])
def test_lsq_fused_pass_equals_the_eager_path_and_torch(monkeypatch: pytest.MonkeyPatch, relu: bool, zp: int,
                                                        qmin: int, qmax: int) -> None:
    """LSQ per tensor with the kernels (one pass each way) against the eager ops, bit for bit (output,
    input gradient, range), and against torch's learnable fake quantize of ``relu(x)`` / ``x``. The scale
    gradient equals the float64 sum of the per-element terms; torch sums them in float32 (agrees to ~1e-5).
    On exact rounding ties next to a bound torch's backward rounds ``x / s + z`` where its forward (and
    ours, both ways) rounds ``x / s``, so there torch passes a gradient to a value its forward clamped:
    ties are compared with the eager path only."""
    scale = 0.0173
    x = _edge_values(scale)
    z = torch.tensor([zp], dtype=torch.int32)
    g = torch.rand_like(x) + 0.5
    fused = _lsq_pass(x, g, scale, z, qmin, qmax, relu)
    with monkeypatch.context() as m:
        _no_kernels(m)
        eager = _lsq_pass(x, g, scale, z, qmin, qmax, relu)
    for f, e in zip(fused[:2] + fused[3:], eager[:2] + eager[3:]):
        torch.testing.assert_close(f, e, atol=0, rtol=0)
    v = torch.relu(x) if relu else x
    assert fused[3].tolist() == [float(t) for t in torch.aminmax(v)]
    # the scale gradient: float64 sum of torch's float32 per-element terms
    u = v * torch.reciprocal(torch.tensor(scale))
    r = torch.round(u)
    ds = torch.where(r < qmin - zp, float(qmin - zp), torch.where(r > qmax - zp, float(qmax - zp), r - u))
    factor = 1.0 / (x.numel() * qmax) ** 0.5
    exact = float((g * ds).double().sum()) * factor
    assert abs(float(fused[2]) - exact) <= 1e-6 * abs(exact)
    torch.testing.assert_close(eager[2], fused[2], atol=0, rtol=2e-5)
    torch.testing.assert_close(fused[0], torch._fake_quantize_learnable_per_tensor_affine(
        v, torch.tensor([scale]), z.float(), qmin, qmax, factor), atol=0, rtol=0)
    # torch's gradients, away from exact ties
    keep = (u - u.floor()) != 0.5
    assert int((~keep).sum()) > 100
    ours = _lsq_pass(x[keep], g[keep], scale, z, qmin, qmax, relu)
    b, sb = x[keep].clone().requires_grad_(), torch.tensor([scale], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(torch.relu(b) if relu else b, sb, z.float(), qmin, qmax,
                                                           1.0 / (b.numel() * qmax) ** 0.5)
    (ref * g[keep]).sum().backward()
    torch.testing.assert_close(ours[1], b.grad, atol=0, rtol=0)
    torch.testing.assert_close(ours[2], sb.grad, atol=0, rtol=2e-5)


def test_build_notice_is_called_once_just_before_an_uncached_build(monkeypatch) -> None:
    """The front end's notice runs right before a build the extension cache does not hold, never otherwise."""
    import torch.utils.cpp_extension as cpp_extension

    from lit_quant.quant import kernels

    calls: list[str] = []
    monkeypatch.setattr(kernels, "_module", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.delenv("LIT_QUANT_NO_KERNELS", raising=False)
    monkeypatch.setattr(cpp_extension, "load_inline", lambda *a, **k: calls.append("build") or object())
    kernels.set_build_notice(lambda: calls.append("notice"))
    try:
        monkeypatch.setattr(kernels, "_cached", lambda: False)
        assert kernels.available() and calls == ["notice", "build"]
        monkeypatch.setattr(kernels, "_module", None)
        monkeypatch.setattr(kernels, "_cached", lambda: True)
        assert kernels.available() and calls == ["notice", "build", "build"]  # cached: no notice
    finally:
        kernels.set_build_notice(None)
