"""BatchNorm folding equals conv/linear followed by BN in eval mode."""

from __future__ import annotations

import torch
from torch import nn

from lit_quant.app.models import build_model
from lit_quant.quant import fold_bn, fuse_conv_bn


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def test_fold_conv_bn_and_linear_bn() -> None:
    conv, bn = nn.Conv2d(3, 8, 3, bias=True), _randomise_bn(nn.BatchNorm2d(8))
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fold_bn(conv, bn)(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    lin, bn1 = nn.Linear(6, 4, bias=False), _randomise_bn(nn.BatchNorm1d(4))
    y = torch.randn(5, 6)
    torch.testing.assert_close(fold_bn(lin, bn1)(y), bn1(lin(y)), atol=1e-5, rtol=1e-5)


def test_fuse_resnet20_folds_every_bn_and_keeps_outputs() -> None:
    model = _randomise_bn(build_model("resnet20", 1, 10))
    fused, pairs = fuse_conv_bn(model)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 21
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
