"""torchvision's plain classifiers (no QuantStub, functional ops, SiLU, attention) through the whole core:
prepare, calibrate, one QAT step and fake-quant evaluation, on small images and random weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lit_quant.quant import QuantPlan, calibrate, enable_fake_quant, iter_quantizers, prepare
from lit_quant.quant.summary import summarize

ZOO = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
       "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16"]


def _model(name: str) -> nn.Module:
    """``name`` for 10 classes on 32x32 images, with BatchNorm statistics of real activations (torchvision's
    initial ones, mean 0 and variance 1, would leave the random network's logits near 1e-10)."""
    torch.manual_seed(0)
    extra = {"image_size": 32} if name == "vit_b_16" else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
    if name == "vit_b_16":  # torchvision zero-initialises the head: random logits instead of zeros
        nn.init.normal_(model.heads.head.weight, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", ZOO)
def test_torchvision_classifier_prepare_calibrate_qat_step_and_eval(name: str) -> None:
    model = _model(name)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)

    q = prepare(model, QuantPlan.from_bits(8, 8))
    ops = summarize(q)
    # everything an int8 backend computes in integers is quantized: no op of these models stays float
    assert [op.name for op in ops if op.status == "float"] == []
    assert sum(op.weight_bits == 8 for op in ops) >= 20
    with torch.no_grad():
        enable_fake_quant(q, False)
        assert torch.allclose(q(x), reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))
    calibrate(q, [x])
    assert all(bool(fq.qparams_valid) for _, fq in iter_quantizers(q))
    with torch.no_grad():
        fake = q(x)
    assert torch.isfinite(fake).all() and not torch.equal(fake, reference)

    qat = prepare(model, QuantPlan.from_bits(8, 8), qat=True)
    calibrate(qat, [x])
    qat.train()
    optimizer = torch.optim.SGD(qat.parameters(), lr=0.01)
    before = {n: p.detach().clone() for n, p in qat.named_parameters()}
    loss = nn.functional.cross_entropy(qat(x), torch.arange(4))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [n for n, p in qat.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("weight" in n for n in moved)
    with torch.no_grad():
        assert torch.isfinite(qat.eval()(x)).all()
