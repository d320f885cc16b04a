"""Cross-layer equalization and bias absorption on float models (before prepare)."""

from __future__ import annotations

import torch
from torch import nn

from lit_quant.app.models import build_model
from lit_quant.quant import QuantPlan, calibrate, prepare
from lit_quant.quant.equalize import equalize


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.1, 3)
            m.bias.data.uniform_(-1, 2)


def test_equalization_keeps_the_function_and_evens_the_ranges() -> None:
    """Without bias absorption the equalized copy computes the same outputs; each pair's output-channel
    ranges of the first layer equal the input-channel ranges of the second; the model is untouched."""
    torch.manual_seed(0)
    net = build_model("resnet20", 1, 10).eval()
    _randomize_bn(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    eq, result = equalize(net, absorb_bias=False)
    assert len(result.pairs) == 9 and result.absorbed == []  # conv1 -> relu -> conv2 of each block
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(eq(x), ref, atol=1e-4 * float(ref.abs().max()))
    for first, second in result.pairs:
        w1, w2 = eq.get_submodule(first).weight, eq.get_submodule(second).weight
        r1 = w1.reshape(w1.shape[0], -1).abs().amax(1)
        r2 = w2.transpose(0, 1).reshape(w2.shape[1], -1).abs().amax(1)
        assert torch.allclose(r1, r2, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_depthwise_and_linear_pairs() -> None:
    """A conv -> ReLU -> depthwise conv pair and a linear -> ReLU -> linear pair equalize exactly; ReLU6
    (not positive homogeneous) stops a pair."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 25, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1))  # very uneven channel ranges
    eq, result = equalize(net, absorb_bias=False)
    assert sorted(result.pairs) == [("0", "2"), ("6", "8")]
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(eq(x), net(x), atol=1e-5)
    r = eq.get_submodule("0").weight.reshape(8, -1).abs().amax(1)
    assert float(r.max() / r.min()) < float(torch.logspace(-2, 1, 8)[-1] / torch.logspace(-2, 1, 8)[0])


def test_bias_absorption_is_exact_where_the_relu_does_not_clip() -> None:
    """BatchNorm with beta = 5, gamma = 1 and a near-constant input: every pre-activation is above
    c = beta - 3 gamma = 2, so moving c into the next layer's bias changes nothing; the first layer's bias
    (and so its activation range) shrinks by c (scaled as equalization scaled the layer)."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(1e-3)
        net[1].bias.fill_(5.0)
        net[1].weight.fill_(1.0)
    eq, result = equalize(net)
    assert result.absorbed == [("0", "3")]
    x = torch.randn(8, 3, 4, 4)
    with torch.no_grad():
        assert torch.allclose(eq(x), net(x), atol=1e-4)
        plain, _ = equalize(net, absorb_bias=False)
        # beta / S - c / S with c = 2: three fifths of the bias left
        assert torch.allclose(eq.get_submodule("0").bias, 0.6 * plain.get_submodule("0").bias, rtol=1e-4)


def test_equalized_model_prepares_as_the_model_does() -> None:
    """prepare gives the equalized copy the same quantized structure (state dict keys) as the model, so a
    quantized checkpoint of it loads into prepare(model); with 4-bit weights per tensor and channel ranges
    1000x apart, the equalized model is closer to the float one."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1))
    eq, result = equalize(net, absorb_bias=False)
    assert result.pairs == [("0", "3")]
    plan = QuantPlan.from_bits(4, 16, per_channel=False)
    a, b = prepare(net, plan), prepare(eq, plan)
    assert set(a.state_dict()) == set(b.state_dict())
    data = [torch.randn(32, 3, 6, 6) for _ in range(2)]
    calibrate(a, data)
    calibrate(b, data)
    x = torch.cat(data)
    with torch.no_grad():
        ref = net(x)
        assert (b(x) - ref).square().mean() < 0.6 * (a(x) - ref).square().mean()
