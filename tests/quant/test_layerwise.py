"""Layer-wise PTQ: GPTQ and AdaRound weight rounding and empirical bias correction, on the calibrated model's
grid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_quant.quant import CalibrationError, QuantPlan, calibrate, enable_fake_quant, iter_quantizers, prepare
from lit_quant.quant.layers import QuantWeightLayer
from lit_quant.quant.layerwise import adaround_weight, gptq_weight, layerwise_ptq, weight_rounding


def _net() -> nn.Module:
    """Conv-BN-ReLU, a depthwise conv, a 1x1 conv without BatchNorm or bias, pooling and a linear head."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 1, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(32, 3, 12, 12, generator=g) for _ in range(4)]


def _on_grid(layer: QuantWeightLayer) -> bool:
    qp = layer.weight_quant.qparams()
    w = layer.float_weight().detach()
    s = qp.scale.reshape(-1, *[1] * (w.dim() - 1))
    k = w / s
    return bool(torch.allclose(k, k.round(), atol=1e-4) and k.min() >= qp.quant_min - 1e-4
                and k.max() <= qp.quant_max + 1e-4)


def test_gptq_weight_beats_nearest_on_its_objective() -> None:
    """||(W - Q) X|| of GPTQ below round-to-nearest's on the same grid, for a correlated X; with act-order
    too; Q stays on the grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2000, generator=g, dtype=torch.float64)
    x = torch.linalg.cholesky(torch.eye(64, dtype=torch.float64) * 0.3 + 0.7) @ x  # correlated inputs
    w = torch.randn(1, 32, 64, generator=g, dtype=torch.float64)
    s = w.abs().amax(-1) / 7

    def round_(col: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(col / s), -8, 7) * s

    h = (x @ x.t()).unsqueeze(0)
    nearest = torch.stack([round_(w[:, :, i]) for i in range(64)], dim=2)

    def error(q: torch.Tensor) -> float:
        return float(((w - q)[0] @ x).norm())

    for act_order in (False, True):
        q = gptq_weight(w, h, round_, act_order=act_order, block=16)
        k = q / s[:, :, None]
        assert torch.allclose(k, k.round()) and -8 <= k.round().min() and k.round().max() <= 7
        assert error(q) < 0.7 * error(nearest)


def test_adaround_weight_beats_nearest_on_its_objective() -> None:
    """AdaRound's hard rounding: on the grid, each weight its floor or ceiling (clamped), and a lower
    ||(W - Q) X|| than round-to-nearest for correlated inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2000, generator=g, dtype=torch.float64)
    x = torch.linalg.cholesky(torch.eye(64, dtype=torch.float64) * 0.3 + 0.7) @ x
    w = torch.randn(1, 32, 64, generator=g, dtype=torch.float64)
    s = (w.abs().amax(-1, keepdim=True) / 7)
    zero = torch.zeros_like(s)
    nearest = torch.clamp(torch.round(w / s), -8, 7) * s
    q = adaround_weight(w, (x @ x.t()).unsqueeze(0), s, zero, -8, 7, samples=2000, iters=500)
    k = q / s
    assert torch.allclose(k, k.round()) and k.round().min() >= -8 and k.round().max() <= 7
    assert bool(((k.round() == torch.floor(w / s)) | (k.round() == torch.ceil(w / s))).all())

    def error(q: torch.Tensor) -> float:
        return float(((w - q)[0] @ x).norm())

    assert error(q) < 0.8 * error(nearest)


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_layerwise_rounding_and_bias_correction_on_a_network(rounding: str) -> None:
    net, data = _net(), _data()
    plan = QuantPlan.from_bits(4, 8)
    base = prepare(net, plan)
    calibrate(base, data)
    q = prepare(net, plan)
    calibrate(q, data)
    result = layerwise_ptq(q, data, rounding=weight_rounding(rounding, iters=300), bias_correction=True)
    layers = [m for m in q.modules() if isinstance(m, QuantWeightLayer)]
    assert result.layers == len(layers) == 4 and result.samples == 128
    assert all(_on_grid(m) for m in layers)
    # every layer's output error on its inputs is no worse than round-to-nearest's, and better on average
    assert all(used <= nearest * 1.0001 for nearest, used in result.errors.values())
    assert sum(u for _, u in result.errors.values()) < 0.9 * sum(n for n, _ in result.errors.values())
    # the 1x1 conv has no bias to correct; the others were shifted
    assert len(result.bias_shift) == 3 and all(v > 0 for v in result.bias_shift.values())
    # qparams untouched, and the quantized model is closer to the float one than round-to-nearest's
    for (_, a), (_, b) in zip(iter_quantizers(base), iter_quantizers(q)):
        assert torch.equal(a.scale, b.scale)
    x = torch.cat(data)
    with torch.no_grad():
        ref = net(x)
        assert (q(x) - ref).square().mean() < (base(x) - ref).square().mean()
    # a saved state dict rebuilds the same model (the checkpoint format: prepare, then load)
    again = prepare(net, plan)
    again.load_state_dict(q.state_dict())
    enable_fake_quant(again, True)
    for _, fq in iter_quantizers(again):
        fq.observer_enabled.fill_(False)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), q(x))


def test_layerwise_on_a_qat_model_with_learned_step_sizes() -> None:
    """QAT's calibrated start (BatchNorm kept for training, LSQ quantizers) gets the same GPTQ weights and
    bias shifts as the PTQ model, on the LSQ step sizes' grid: the same outputs in eval mode."""
    net, data = _net(), _data()
    ptq = prepare(net, QuantPlan.from_bits(3, 8, weight_observer="mse"))
    qat = prepare(net, QuantPlan.from_bits(3, 8, weight_observer="mse", quantizer="lsq"), qat=True)
    results = []
    for q in (ptq, qat):
        calibrate(q, data)
        results.append(layerwise_ptq(q, data, rounding="gptq", bias_correction=True))
    assert results[1].layers == results[0].layers == 4
    assert results[1].bias_shift == pytest.approx(results[0].bias_shift, rel=1e-4)
    assert all(_on_grid(m) for m in qat.modules() if isinstance(m, QuantWeightLayer))
    x = torch.cat(data)
    with torch.no_grad():
        assert torch.allclose(qat.eval()(x), ptq.eval()(x), atol=1e-4)


def test_bias_correction_matches_the_float_mean_output() -> None:
    """After bias correction the head's mean output per class on the calibration images (the float logits,
    the plan's default) is the float model's: each layer is corrected with every earlier one already
    corrected."""
    net, data = _net(), _data()
    q = prepare(net, QuantPlan.from_bits(3, 8))
    calibrate(q, data)
    head = [m for m in q.modules() if isinstance(m, QuantWeightLayer)][-1]
    assert head.act_quant is None
    seen: list[torch.Tensor] = []
    head.register_forward_hook(lambda _m, _args, out: seen.append(out))
    x = torch.cat(data)
    with torch.no_grad():
        ref = net(x).mean(0)
        q(x)
        before = (seen[-1].mean(0) - ref).abs().max()
        layerwise_ptq(q, data, rounding="nearest", bias_correction=True)
        q(x)
        after = (seen[-1].mean(0) - ref).abs().max()
    assert before > 1e-3 and after < 1e-4 * float(ref.abs().max())


def test_layerwise_needs_data_and_a_calibrated_model() -> None:
    net = _net()
    q = prepare(net, QuantPlan.from_bits(4, 8))
    with pytest.raises(CalibrationError, match="needs calibration batches"):
        layerwise_ptq(q, [])
    from lit_quant.quant import QuantConfigError

    with pytest.raises(QuantConfigError, match="rounding must be one of nearest, gptq, adaround"):
        layerwise_ptq(q, _data(), rounding="stochastic")


def test_a_user_rounding_plugs_in_behind_the_same_interface() -> None:
    """A rounding is any callable with a name: layerwise_ptq hands it each layer's weight and Hessian, in
    forward order, and installs what it returns."""

    class Floor:
        name = "floor"
        changes_weights = True

        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def __call__(self, layer: QuantWeightLayer, w: torch.Tensor, h: torch.Tensor, samples: int) -> torch.Tensor:
            self.seen.append((w.shape[-1], samples))
            qp = layer.weight_quant.qparams()  # symmetric, per output channel
            s = qp.scale.double().reshape(w.shape[0], w.shape[1], 1)
            return s * torch.clamp(torch.floor(w / s), qp.quant_min, qp.quant_max)

    net, data = _net(), _data()
    q = prepare(net, QuantPlan.from_bits(4, 8))
    calibrate(q, data)
    floor = Floor()
    result = layerwise_ptq(q, data, rounding=floor)
    assert len(floor.seen) == result.layers == 4 and all(n > 0 for _, n in floor.seen)
    assert all(used > nearest for nearest, used in result.errors.values())  # flooring is worse than nearest
    assert all(_on_grid(m) for m in q.modules() if isinstance(m, QuantWeightLayer))
