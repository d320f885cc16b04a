"""Observers: same qparams as torch.ao where torch.ao has the statistic, error no worse than its histogram."""

from __future__ import annotations

import warnings

import pytest
import torch

from lit_quant.quant import CalibrationError, QuantConfigError, QuantSpec, build_observer, fake_quantize

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import observer as ao_obs


def _batches(n: int = 4, shape: tuple[int, ...] = (6, 5, 7, 7), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) * (1 + i) + 0.3 * i for i in range(n)]


def _qparams(obs, batches):
    for b in batches:
        assert obs(b) is b
    return obs.calculate_qparams()


def _assert_same(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(ours[0], ref[0], atol=0, rtol=0)
    assert ours[1].tolist() == ref[1].tolist()


@pytest.mark.parametrize("scheme,dtype,qscheme", [("asym_u", torch.quint8, torch.per_tensor_affine),
                                                  ("sym", torch.qint8, torch.per_tensor_symmetric),
                                                  ("asym_s", torch.qint8, torch.per_tensor_affine)])
def test_minmax_and_ema_match_torch_ao(scheme: str, dtype: torch.dtype, qscheme: torch.qscheme) -> None:
    batches = _batches()
    _assert_same(_qparams(build_observer(QuantSpec(8, scheme, observer="minmax")), batches),
                 _qparams(ao_obs.MinMaxObserver(dtype=dtype, qscheme=qscheme), batches))
    _assert_same(_qparams(build_observer(QuantSpec(8, scheme, observer="ema",
                                                   observer_args={"averaging_constant": 0.1})), batches),
                 _qparams(ao_obs.MovingAverageMinMaxObserver(0.1, dtype=dtype, qscheme=qscheme), batches))


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_minmax_and_ema_match_torch_ao(axis: int) -> None:
    batches = _batches()
    ours = build_observer(QuantSpec(8, "sym", per_channel=True, axis=axis))
    ref = ao_obs.PerChannelMinMaxObserver(ch_axis=axis, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    _assert_same(_qparams(ours, batches), _qparams(ref, batches))
    ours = build_observer(QuantSpec(8, "asym_u", per_channel=True, axis=axis, observer="ema"))
    ref = ao_obs.MovingAveragePerChannelMinMaxObserver(ch_axis=axis, dtype=torch.quint8,
                                                       qscheme=torch.per_channel_affine)
    _assert_same(_qparams(ours, batches), _qparams(ref, batches))


def _activations(kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "relu":
        return [torch.randn(16, 8, 12, 12, generator=g).relu() * 2 for _ in range(4)]
    if kind == "laplace":
        return [torch.distributions.Laplace(0.0, 1.0).sample((20000,)) for _ in range(4)]
    return [torch.randn(20000, generator=g) * 0.5 + 1.0 for _ in range(4)]  # signed, off-centre


def _error(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> float:
    return float(((fake_quantize(x, scale, zp, 0, 255) - x) ** 2).mean())


@pytest.mark.parametrize("kind", ["relu", "laplace", "shifted"])
def test_mse_error_no_worse_than_torch_ao_histogram(kind: str) -> None:
    batches = _activations(kind)
    data = torch.cat([b.flatten() for b in batches])
    ours = _qparams(build_observer(QuantSpec(8, "asym_u", observer="mse")), batches)
    ref = _qparams(ao_obs.HistogramObserver(dtype=torch.quint8), batches)
    assert _error(data, *ours) <= _error(data, *ref) * 1.0001


@pytest.mark.parametrize("name", ["percentile", "entropy", "nstd", "avg"])
def test_clipping_observers_give_a_sane_range(name: str) -> None:
    batches = _activations("laplace")
    data = torch.cat(batches)
    obs = build_observer(QuantSpec(8, "asym_u", observer=name))
    lo, hi = (t.item() for t in _qparams_range(obs, batches))
    assert data.min().item() <= lo < 0 < hi <= data.max().item()
    if name in ("nstd", "avg"):
        return  # deliberate clipping (Distiller's rules), not error minimisation: only the range is checked
    minmax_err = _error(data, *_qparams(build_observer(QuantSpec(8, "asym_u")), batches))
    assert _error(data, *obs.calculate_qparams()) < 3 * minmax_err


def _qparams_range(obs, batches):
    for b in batches:
        obs(b)
    return obs.calculate_range()


def test_percentile_is_close_to_the_exact_quantile() -> None:
    # seeded: an unseeded draw once put the 0.1 % quantile 1.2 bin widths off (noted in the issue, left open)
    torch.manual_seed(0)
    data = torch.distributions.Laplace(0.0, 1.0).sample((200000,))
    obs = build_observer(QuantSpec(8, "asym_u", observer="percentile",
                                   observer_args={"percentile": 99.9, "max_samples": 0}))
    lo, hi = _qparams_range(obs, [data])
    width = 2 * 2 ** 4 / 2048  # the signed histogram's bin width for |x| < 16
    assert abs(hi.item() - torch.quantile(data, 0.999).item()) <= width
    assert abs(lo.item() - torch.quantile(data, 0.001).item()) <= width


def test_nstd_and_avg_statistics() -> None:
    batches = _batches()
    data = torch.cat([b.flatten() for b in batches])
    lo, hi = _qparams_range(build_observer(QuantSpec(8, observer="nstd", observer_args={"n_std": 2.0})), batches)
    mean, std = data.double().mean(), data.double().std(unbiased=False)
    assert lo.item() == pytest.approx(max((mean - 2 * std).item(), data.min().item()), rel=1e-5)
    assert hi.item() == pytest.approx(min((mean + 2 * std).item(), data.max().item()), rel=1e-5)
    lo, hi = _qparams_range(build_observer(QuantSpec(8, observer="avg")), batches)
    assert lo.item() == pytest.approx(sum(b.min().item() for b in batches) / len(batches), rel=1e-6)
    assert hi.item() == pytest.approx(sum(b.max().item() for b in batches) / len(batches), rel=1e-6)


def test_histogram_regrowth_keeps_every_count() -> None:
    obs = build_observer(QuantSpec(8, "asym_u", observer="mse", observer_args={"max_samples": 0}))
    small, big = torch.rand(1000) * 0.3, torch.randn(1000) * 5
    obs(small)
    obs(big)
    assert float(obs.hist.sum()) == 2000.0 and bool(obs.signed)
    direct = build_observer(QuantSpec(8, "asym_u", observer="mse", observer_args={"max_samples": 0}))
    direct(torch.cat([big, small]))
    assert int(direct.exp) == int(obs.exp)
    assert float((direct.hist - obs.hist).abs().sum()) <= 2.0  # same bins up to rounding at an edge


@pytest.mark.parametrize("name", ["minmax", "ema", "percentile", "mse", "entropy", "nstd", "avg"])
def test_bad_input_and_state_errors(name: str) -> None:
    obs = build_observer(QuantSpec(8, "asym_u", observer=name))
    with pytest.raises(CalibrationError, match="observed no data"):
        obs.calculate_qparams()
    obs(torch.empty(0))  # an empty tensor is ignored, not data
    assert not obs.has_data
    for bad in (float("nan"), float("inf")):
        with pytest.raises(CalibrationError, match="NaN or Inf"):
            obs(torch.tensor([0.0, bad, 1.0]))
    obs(torch.linspace(-1, 3, 500))
    before = obs.calculate_qparams()
    clone = build_observer(QuantSpec(8, "asym_u", observer=name))
    clone.load_state_dict(obs.state_dict())
    _assert_same(clone.calculate_qparams(), before)
    obs.reset()
    assert not obs.has_data
    with pytest.raises(CalibrationError):
        obs.calculate_range()


def test_per_channel_on_a_scalar_and_unknown_options_fail() -> None:
    obs = build_observer(QuantSpec(8, per_channel=True, axis=1))
    with pytest.raises(QuantConfigError, match="axis 1"):
        obs(torch.tensor(3.0))
    with pytest.raises(QuantConfigError, match="allowed: bins, max_samples, percentile"):
        build_observer(QuantSpec(8, observer="percentile", observer_args={"pct": 99}))
    with pytest.raises(QuantConfigError, match="percentile must be"):
        build_observer(QuantSpec(8, observer="percentile", observer_args={"percentile": 101}))


def test_per_channel_state_dict_resizes_buffers() -> None:
    obs = build_observer(QuantSpec(8, "sym", per_channel=True))
    obs(torch.randn(5, 3))
    fresh = build_observer(QuantSpec(8, "sym", per_channel=True))
    fresh.load_state_dict(obs.state_dict())
    _assert_same(fresh.calculate_qparams(), obs.calculate_qparams())


@pytest.mark.parametrize("scheme", ["sym", "asym_s"])
def test_per_channel_mse_weight_range_is_the_exact_search(scheme: str) -> None:
    """Per channel, the chosen fraction of the extremes has the smallest squared error of any fraction on the
    grid (brute force, one channel and one fraction at a time), and at 4 bits it beats min/max on Gaussian
    weights, whose rare large values set the min/max step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 16, 3, 3, generator=g)
    spec = QuantSpec(4, scheme, per_channel=True, axis=0, observer="mse", observer_args={"grid": 32})
    obs = build_observer(spec)
    scale, zp = _qparams(obs, [w])
    lo, hi = w.reshape(6, -1).aminmax(dim=1)

    def error(channel: int, s: torch.Tensor, z: torch.Tensor) -> float:
        x = w[channel].reshape(-1)
        return float((fake_quantize(x, s.reshape(1), z.reshape(1), spec.quant_min, spec.quant_max) - x).square().sum())

    from lit_quant.quant.functional import calculate_qparams

    for c in range(6):
        brute = min(error(c, *calculate_qparams(lo[c:c + 1] * f / 32, hi[c:c + 1] * f / 32, spec))
                    for f in range(1, 33))
        assert error(c, scale[c], zp[c]) == pytest.approx(brute, rel=1e-6)
    minmax = build_observer(QuantSpec(4, scheme, per_channel=True, axis=0))
    mm_scale, mm_zp = _qparams(minmax, [w])
    ratios = [error(c, scale[c], zp[c]) / error(c, mm_scale[c], mm_zp[c]) for c in range(6)]
    assert max(ratios) <= 1.0 and sum(ratios) / 6 < 0.95
    fresh = build_observer(spec)
    fresh.load_state_dict(obs.state_dict())
    _assert_same(fresh.calculate_qparams(), (scale, zp))


def test_per_channel_mse_is_for_weights_only() -> None:
    from lit_quant.quant import QuantPlan

    with pytest.raises(QuantConfigError, match="per-channel mse .* is for weights"):
        QuantPlan(act=QuantSpec(8, per_channel=True, axis=1, observer="mse"))
    QuantPlan.from_bits(4, 8, weight_observer="mse")


def _reference_kl(hist: list[float], t: int, levels: int) -> float:
    """TensorRT's KL(P || Q) for threshold ``t``, written as the plain loop of Migacz 2017 / NVIDIA's
    pytorch-quantization (bin ``j`` goes to level ``floor(j L / t)``), with the two documented choices of
    :class:`EntropyObserver`: a bin that is empty but receives the tail counts as non-empty, and ``q`` is
    floored at 1e-12 where ``P`` has mass."""
    import math

    p = hist[:t]
    tail = sum(hist[t:])
    p = p[:-1] + [p[-1] + tail]
    level_of = [j * levels // t for j in range(t)]
    mass = [0.0] * levels
    nonempty = [0] * levels
    for j in range(t):
        mass[level_of[j]] += hist[j]
        nonempty[level_of[j]] += p[j] > 0
    q = [mass[level_of[j]] / nonempty[level_of[j]] if p[j] > 0 else 0.0 for j in range(t)]
    total_p, total_q = sum(p), sum(q)
    return sum(pj / total_p * math.log(pj / total_p / max(qj / total_q, 1e-12)) for pj, qj in zip(p, q) if pj > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_kl_equals_the_plain_tensorrt_loop(seed: int) -> None:
    from lit_quant.quant.observers import _kl_divergences

    g = torch.Generator().manual_seed(seed)
    hist = (torch.randn(300, generator=g).abs() * 400 * torch.linspace(1, 0, 300) ** 3).round()
    hist[torch.rand(300, generator=g) < 0.2] = 0.0  # empty bins, as in sparse tails and discrete inputs
    hist[-1] = 3.0
    levels = 16
    thresholds = torch.arange(levels, 301, 7)
    ours = _kl_divergences(hist.double(), thresholds, levels)
    ref = torch.tensor([_reference_kl(hist.tolist(), int(t), levels) for t in thresholds], dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    assert int(torch.argmin(ours)) == int(torch.argmin(ref))


def test_histogram_subsample_spans_the_tensor_in_blocks() -> None:
    obs = build_observer(QuantSpec(8, "asym_u", observer="mse", observer_args={"max_samples": 4096}))
    x = torch.arange(1_000_000, dtype=torch.float32)  # each value is its own position
    seen = []
    for batch in range(3):
        obs.num_batches.fill_(batch)
        values, owned = obs._sample(x)
        assert owned and values.numel() <= 4096 and values.numel() >= 4096 - 16
        blocks = values.reshape(-1, 16)
        assert bool((blocks[:, 1:] - blocks[:, :-1] == 1).all())  # runs of consecutive elements
        assert values.min() < 0.01 * x.numel() and values.max() > 0.99 * x.numel()  # from start to end
        seen.append(set(values.tolist()))
    assert not seen[0] & seen[1] and not seen[1] & seen[2]  # the offset moves every batch
    small = torch.rand(100)
    values, owned = obs._sample(small)
    assert not owned and values.data_ptr() == small.data_ptr()  # small tensors are binned whole, not copied
    before = small.clone()
    obs(small)
    assert torch.equal(small, before) and float(obs.hist.sum()) == 100.0  # binning never writes into x


@pytest.mark.parametrize("name", ["minmax", "ema", "avg"])
def test_observe_range_is_forward_on_the_batch(name: str) -> None:
    """A range-only observer fed each batch's min / max (as the fake-quant kernel reads them) holds the
    state ``forward`` on the batches gives, buffer for buffer."""
    spec = QuantSpec(8, "asym_u", observer=name)
    by_tensor, by_range = build_observer(spec), build_observer(spec)
    assert by_range.RANGE_ONLY
    for b in _batches():
        by_tensor(b)
        by_range.observe_range(b.min().reshape(1), b.max().reshape(1))
    for (key, ref), (_, got) in zip(by_tensor.state_dict().items(), by_range.state_dict().items()):
        assert torch.equal(got, ref), key
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        by_range.observe_range(torch.tensor([float("nan")]), torch.tensor([float("nan")]))


@pytest.mark.parametrize("name,per_channel", [("mse", False), ("nstd", False), ("minmax", True)])
def test_observe_range_refuses_observers_that_need_the_tensor(name: str, per_channel: bool) -> None:
    obs = build_observer(QuantSpec(8, "sym", observer=name, per_channel=per_channel))
    assert not obs.RANGE_ONLY or per_channel
    with pytest.raises(QuantConfigError, match="needs the tensor"):
        obs.observe_range(torch.tensor([-1.0]), torch.tensor([1.0]))
