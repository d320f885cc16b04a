"""prepare / to_float / plans / stats files on the real model zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lit_quant.app.models import build_model
from lit_quant.quant import (
    CalibrationError,
    FakeQuantize,
    LSQFakeQuantize,
    QuantConfigError,
    QuantConv2d,
    QuantLinear,
    QuantOutput,
    QuantPlan,
    QuantSpec,
    calibrate,
    dump_stats,
    enable_fake_quant,
    enable_observer,
    iter_quantizers,
    load_stats,
    model_qparams,
    prepare,
)
from lit_quant.quant.functional import SCALE_EPS
from lit_quant.quant.ops import Add
from tests.quant.test_fuse import _randomise_bn


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(build_model("resnet20", 1, 10))


def _x(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(seed))


def test_every_integer_tensor_gets_a_quantizer(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan(fold_bn=True))
    mods = dict(q.model.named_modules())
    float_mods = dict(resnet.named_modules())
    convs = [n for n, m in float_mods.items() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(mods[n], QuantConv2d) and mods[n].weight_quant is not None for n in convs)
    assert isinstance(mods["fc"], QuantLinear) and mods["fc"].act_quant is not None
    # conv -> bn -> relu: the output is quantized after the ReLU; conv -> bn -> add: at the conv
    assert mods["layers.0.conv1"].act_quant is None and isinstance(mods["layers.0.relu1"], QuantOutput)
    assert mods["layers.0.conv2"].act_quant is not None
    assert mods["layers.3.shortcut.0"].act_quant is not None
    # add -> relu is one integer op: quantized after the ReLU; pooling quantized
    assert isinstance(mods["layers.0.add"], Add) and isinstance(mods["layers.0.relu2"], QuantOutput)
    assert isinstance(mods["pool"], QuantOutput) and q.input_quant is not None
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert len(list(iter_quantizers(q, "weight"))) == len(convs) + 1
    assert len(list(iter_quantizers(q, "act"))) == 1 + 1 + 9 * 3 + 2 + 1 + 1  # input, stem, blocks, shortcuts, pool, fc


def test_fake_quant_off_equals_float_model_and_original_untouched(resnet: nn.Module) -> None:
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    q = prepare(resnet, QuantPlan(fold_bn=False))
    x = _x()
    with torch.no_grad():
        assert torch.equal(q(x), resnet(x))
        assert torch.equal(prepare(resnet)(x), prepare(resnet)(x))
        torch.testing.assert_close(prepare(resnet)(x), resnet(x), atol=1e-5, rtol=1e-5)  # folded BN
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())
    assert not any(isinstance(m, FakeQuantize) for m in resnet.modules())


def test_to_float_round_trips(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan(fold_bn=False))
    back = q.to_float()
    assert not any(isinstance(m, (FakeQuantize, QuantOutput)) for m in back.modules())
    # the root is the traced graph module; below it, the model's own modules, same names, same types
    assert isinstance(back, torch.fx.GraphModule)
    assert [(n, type(m)) for n, m in back.named_modules()][1:] == [(n, type(m)) for n, m in resnet.named_modules()][1:]
    ref = resnet.state_dict()
    assert back.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())


def test_disabled_fake_quant_layer_equals_float_forward_and_backward() -> None:
    conv = nn.Conv2d(3, 4, 3)
    qconv = QuantConv2d.from_float(conv, QuantSpec(4, "sym", per_channel=True), QuantSpec(4, "asym_u"))
    enable_fake_quant(qconv, False)
    x1, x2 = torch.randn(2, 3, 6, 6, requires_grad=True), None
    x2 = x1.detach().clone().requires_grad_()
    y1 = qconv(x1)
    y2 = conv(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    w_grad = torch.autograd.grad((y1 * g).sum(), [x1, qconv.weight])
    ref_grad = torch.autograd.grad((y2 * g).sum(), [x2, conv.weight])
    assert all(torch.equal(a, b) for a, b in zip(w_grad, ref_grad))
    assert isinstance(qconv.to_float(), nn.Conv2d) and qconv.to_float().weight is conv.weight


def test_calibrate_then_fake_quant_changes_output_and_gradients_flow(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(4, 4, act_observer="mse"))
    seen = calibrate(q, [(_x(8, i), None) for i in range(2)])
    assert seen == 16
    x = _x(4, 5)
    with torch.no_grad():
        assert not torch.equal(q(x), prepare(resnet)(x))
    q.train()
    q(x).sum().backward()
    assert q.model.conv1.weight.grad is not None and q.model.fc.weight.grad.abs().sum() > 0
    qp = model_qparams(q)
    assert qp["model.conv1.weight_quant"].scale.shape == (16,) and qp["model.relu.act_quant"].bits == 4
    assert "model.fc.act_quant" not in qp  # the logits stay float (the plan's default)


def test_lsq_scales_receive_gradients(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(3, 4, quantizer="lsq"))
    calibrate(q, [_x(4)])
    q(_x(4, 1)).pow(2).sum().backward()
    lsq = [fq for _, fq in iter_quantizers(q) if isinstance(fq, LSQFakeQuantize)]
    assert lsq and all(fq.scale.grad is not None for fq in lsq)
    assert sum(float(fq.scale.grad.abs().sum()) > 0 for fq in lsq) >= len(lsq) - 2


def test_lsq_step_size_below_eps_is_projected_back_and_keeps_a_gradient() -> None:
    """torch.ao's _LearnableFakeQuantize projection: a step size that an optimizer step pushed below eps is
    clamped back to eps in the next forward and still gets a gradient, so it can grow again (with the clamp
    inside the graph its gradient was 0 for good and the channel's weights stayed quantized to ~0)."""
    fq = LSQFakeQuantize(QuantSpec(bits=3, scheme="sym", per_channel=True, axis=0, quantizer="lsq"), "weight")
    w = torch.randn(4, 9)
    fq.observer(w)
    fq.update_qparams()
    fq.observer_enabled.fill_(False)
    fq.fake_quant_enabled.fill_(True)
    with torch.no_grad():
        fq.scale[1] = -0.05  # what an overshooting optimizer step left behind
    fq(w).pow(2).sum().backward()
    assert float(fq.scale[1]) == pytest.approx(SCALE_EPS) and (fq.scale > 0).all()
    assert float(fq.scale.grad[1]) != 0.0


def test_plan_yaml_overrides_take_effect(resnet: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text("""
weight: {bits: 4}
act: {bits: 4, observer: percentile}
overrides:
  - {pattern: "@first", weight: {bits: 8}, act: {bits: 8}}
  - {pattern: "@last", weight: {bits: 8}}
  - {pattern: "layers.4.conv2", skip: true}
  - {pattern: "layers.8.*", act: {observer: mse}, accum_bits: 16}
""")
    plan = QuantPlan.from_yaml(path)
    assert QuantPlan.from_dict(plan.to_dict()) == plan
    assert [o.describe() for o in plan.overrides] == ["@first w8 a8", "@last w8", "layers.4.conv2 float",
                                                      "layers.8.* act observer=mse accum 16"]
    q = prepare(resnet, plan).model
    assert q.conv1.weight_quant.spec.bits == 8 and q.relu.act_quant.spec.bits == 8  # conv1's fused output
    assert q.fc.weight_quant.spec.bits == 8 and q.fc.act_quant.spec.bits == 4
    assert q.layers[0].conv1.weight_quant.spec.bits == 4
    assert type(q.layers[4].conv2) is nn.Conv2d  # skipped: still the float module (BN folded)
    assert q.layers[8].relu1.act_quant.spec.observer == "mse" and q.layers[8].conv1.accum_bits == 16


def test_unknown_layer_name_lists_close_names(resnet: nn.Module) -> None:
    plan = QuantPlan.from_dict({"overrides": [{"pattern": "layers.0.conv3", "skip": True}]})
    with pytest.raises(QuantConfigError, match=r"did you mean layers\.0\.conv[12]"):
        prepare(resnet, plan)
    with pytest.raises(QuantConfigError, match="unknown key.*allowed"):
        QuantPlan.from_dict({"weights": {"bits": 4}})
    with pytest.raises(QuantConfigError, match="2..16"):
        QuantPlan.from_dict({"overrides": [{"pattern": "fc", "weight": {"bits": 1}}]})


def test_stats_file_reproduces_qparams_without_calibration(resnet: nn.Module, tmp_path: Path) -> None:
    plan = QuantPlan.from_bits(8, 6, act_observer="mse")
    q = prepare(resnet, plan)
    calibrate(q, [_x(8, 1), _x(8, 2)])
    path = tmp_path / "stats.yaml"
    path.write_text(dump_stats(q))
    fresh = prepare(resnet, plan)
    assert load_stats(fresh, path) == len(list(iter_quantizers(q, "act")))
    enable_observer(fresh, False)
    enable_fake_quant(fresh, True)
    for (name, a), (_, b) in zip(model_qparams(q).items(), model_qparams(fresh).items()):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), name
    x = _x(4, 9)
    with torch.no_grad():
        assert torch.equal(q(x), fresh(x))
    with pytest.raises(QuantConfigError, match="calibrated for"):
        load_stats(prepare(resnet, QuantPlan.from_bits(8, 4, act_observer="mse")), path)


def test_empty_calibration_and_unused_layers_fail(resnet: nn.Module) -> None:
    with pytest.raises(CalibrationError, match="empty calibration"):
        calibrate(prepare(resnet), [])


def test_lenet_and_torchvision_resnet_functional_ops() -> None:
    lenet = prepare(build_model("lenet5", 1, 10))
    assert isinstance(lenet.model.features[2], nn.MaxPool2d)  # max pooling stays on its input's grid
    calibrate(lenet, [torch.randn(2, 1, 32, 32)])
    tv = build_model("resnet18", 3, 10, small_input=True).eval()
    q = prepare(tv)
    block = q.model.layer1[0]
    # torchvision's `out += identity` becomes an add module; its one shared ReLU becomes one per use, and
    # the ReLU after the add quantizes the add + relu sum
    assert isinstance(block.add, Add) and isinstance(block.relu_1, QuantOutput)
    assert isinstance(block.relu_1.module, nn.ReLU) and block.relu_1 is not block.relu
    calibrate(q, [torch.randn(2, 3, 32, 32)])
    assert torch.isfinite(q(torch.randn(1, 3, 32, 32))).all()
    with torch.no_grad():
        enable_fake_quant(q, False)
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(q(x), tv(x), atol=1e-4)  # the traced graph computes the float model


@pytest.mark.parametrize("quantizer", ["ste", "lsq"])
def test_calibrated_state_dict_loads_into_a_fresh_prepared_model(resnet: nn.Module, quantizer: str) -> None:
    plan = QuantPlan.from_bits(4, 8, act_observer="percentile", quantizer=quantizer)
    q = prepare(resnet, plan)
    calibrate(q, [_x(8, 3)])
    fresh = prepare(resnet, plan)
    fresh.load_state_dict(q.state_dict())
    x = _x(4, 4)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_first_last_bits_cover_first_layer_input_and_last_layer(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(4, 4, first_last_bits=8))
    assert q.input_quant is not None and q.input_quant.spec.bits == 8  # the first layer's input
    assert q.model.conv1.weight_quant.spec.bits == 8
    assert q.model.fc.weight_quant.spec.bits == 8 and q.model.fc.act_quant is None  # float logits
    assert q.model.layers[3].conv1.weight_quant.spec.bits == 4
    assert q.model.layers[3].relu1.act_quant.spec.bits == 4
    plain = prepare(resnet, QuantPlan.from_bits(4, 4))
    assert plain.input_quant.spec.bits == 4 and plain.model.conv1.weight_quant.spec.bits == 4


def test_io_bits_cover_the_model_input_and_logits_only(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(4, 4, io_bits=8))
    assert q.input_quant.spec.bits == 8 and q.model.fc.act_quant.spec.bits == 8  # the image and the logits
    assert q.model.conv1.weight_quant.spec.bits == q.model.fc.weight_quant.spec.bits == 4
    assert q.model.relu.act_quant.spec.bits == 4  # the first layer's output is a hidden activation
    # the image keeps its whole range at 8 bits, whatever the activation observer
    assert [o.describe() for o in q.plan.overrides] == ["input act observer=minmax", "@depthwise w8", "input a8",
                                                        "@output a8"]
    both = prepare(resnet, QuantPlan.from_bits(4, 4, first_last_bits=8, io_bits=6))
    assert both.input_quant.spec.bits == both.model.fc.act_quant.spec.bits == 6
    assert both.model.conv1.weight_quant.spec.bits == both.model.fc.weight_quant.spec.bits == 8


class _Head(nn.Module):
    """A conv, then the logits layer behind a flatten and a dropout: ``@output`` looks through both."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(torch.flatten(self.pool(self.relu(self.conv(x))), 1)))


def test_default_plan_keeps_the_logits_float_and_the_image_range_whole() -> None:
    """from_bits: the layer whose output the model returns has no output quantizer (its accumulator is the
    float logits) unless io_bits asks for one; the input at 8 bits or more is observed by minmax whatever the
    activation observer, below 8 bits by it."""
    net = _Head().eval()
    q = prepare(net, QuantPlan.from_bits(8, 8, act_observer="mse"))
    assert q.model.classifier.act_quant is None and q.model.classifier.weight_quant is not None
    assert q.model.pool.act_quant.spec.observer == "mse"
    assert q.input_quant.spec.observer == "minmax" and q.input_quant.spec.bits == 8
    assert [o.describe() for o in q.plan.overrides] == ["input act observer=minmax", "@output act float"]
    low = prepare(net, QuantPlan.from_bits(4, 4, act_observer="mse"))
    assert low.input_quant.spec.observer == "mse" and low.model.classifier.act_quant is None
    asked = prepare(net, QuantPlan.from_bits(8, 8, act_observer="mse", io_bits=8))
    assert asked.model.classifier.act_quant.spec.bits == 8 and asked.model.classifier.act_quant.spec.observer == "mse"
    x = torch.rand(16, 1, 6, 6)
    calibrate(q, [x])
    with torch.no_grad():  # the float output is the accumulator on its integer grid, dequantized
        feats = q.model.drop(torch.flatten(q.model.pool(q.model.relu(q.model.conv(q.input_quant(x)))), 1))
        acc = feats @ q.model.classifier.quantized_weight().t() + q.model.classifier.deployed_bias()
        assert torch.allclose(q(x), acc, atol=1e-6)
    # a plan YAML names the same role
    yaml_plan = QuantPlan.from_dict({"overrides": [{"pattern": "@output", "act": {"bits": 16}}]})
    assert prepare(net, yaml_plan).model.classifier.act_quant.spec.bits == 16


def test_calibration_observes_each_weight_once_as_it_is_now(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(8, 8))
    fc = q.model.fc
    with torch.no_grad():
        fc.weight.mul_(3.0)  # a weight changed after prepare: calibration must see the current one
    calls = []
    hook = fc.weight_quant.observer.register_forward_hook(lambda *a: calls.append(1))
    calibrate(q, [_x(), _x(seed=1), _x(seed=2)])
    hook.remove()
    assert len(calls) == 1  # once in start_calibration, not once per batch
    scale = float(fc.weight_quant.scale.max())
    assert scale == pytest.approx(float(fc.weight.detach().abs().max()) / 127.5, rel=1e-6)


def test_bias_is_on_the_int32_accumulator_grid_once_quantized(resnet: nn.Module) -> None:
    q = prepare(resnet, QuantPlan.from_bits(8, 8))
    fc = q.model.fc
    assert fc.input_quantizer() is q.model.pool.act_quant  # through the flatten
    assert q.model.conv1.input_quantizer() is q.input_quant
    assert torch.equal(fc.deployed_bias(), fc.bias)  # calibration: fake quant off, the float bias
    calibrate(q, [_x(), _x(seed=1)])
    for layer in (fc, q.model.layers[3].conv1, q.model.conv1):
        acc_scale = layer.input_quantizer().scale * layer.weight_quant.scale  # s_x s_w, per output channel
        b, b_hat = layer.float_bias().detach(), layer.deployed_bias()
        units = b_hat / acc_scale
        assert torch.allclose(units, units.round(), atol=1e-3)  # integers on the accumulator grid
        assert bool(((b_hat - b).abs() <= 0.5 * acc_scale * (1 + 1e-4)).all())  # round to nearest
        assert not torch.equal(b_hat, b)  # and it is a real change, not the float bias
    loss = fc(torch.randn(3, 64)).sum()
    loss.backward()
    assert torch.equal(fc.bias.grad, torch.full_like(fc.bias, 3.0))  # straight-through gradient


def test_accumulator_width_follows_the_operands_and_bounds_the_bias(resnet: nn.Module) -> None:
    """32-bit accumulators (and int32 biases) for operands of at most 8 bits, 64-bit ones above, layer by
    layer: at 16-bit scales the int32 bias grid s_x s_w spans only about +-2^31 s_x s_w, so a 32-bit
    register saturates ordinary biases; a plan's explicit width still wins."""
    calib = [_x(), _x(seed=1)]
    narrow = prepare(resnet, QuantPlan.from_bits(8, 8))
    assert {m.accum_bits for m in narrow.model.modules() if hasattr(m, "accum_bits_setting")} == {32}
    mixed = prepare(resnet, QuantPlan.from_bits(8, 8, first_last_bits=16))
    assert mixed.model.conv1.accum_bits == 64 and mixed.model.fc.accum_bits == 64  # 16-bit weights
    assert mixed.model.layers[0].conv1.accum_bits == 64  # 8-bit weights, but conv1's 16-bit output as input
    assert mixed.model.layers[1].conv1.accum_bits == 32
    wide, pinned = (prepare(resnet, QuantPlan.from_bits(16, 16, accum_bits=a)) for a in (None, 32))
    assert wide.model.layers[3].conv1.accum_bits == 64 and pinned.model.layers[3].conv1.accum_bits == 32
    for q in (wide, pinned):
        calibrate(q, calib)
    layer_w, layer_p = wide.model.layers[3].conv1, pinned.model.layers[3].conv1
    acc_scale = layer_w.input_quantizer().scale * layer_w.weight_quant.scale
    with torch.no_grad():  # a bias far beyond the int32 grid (what 16-bit scales make of a bias of ~0.5)
        layer_w.bias.add_(2.0 ** 33 * float(acc_scale.max()))
        layer_p.bias.copy_(layer_w.bias)
    b = layer_w.float_bias().detach()
    assert torch.allclose(layer_w.deployed_bias(), b, rtol=1e-6, atol=0.0)  # on the int64 grid: kept
    saturated = layer_p.deployed_bias()
    assert torch.allclose(saturated, (2 ** 31 - 1) * acc_scale.reshape(-1), rtol=1e-6)  # int32 register full


def _depthwise_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),  # depthwise
                         nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.ReLU(),  # grouped, not depthwise
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_depthwise_convolutions_keep_8_bit_weights_below_8_bits() -> None:
    q = prepare(_depthwise_net(), QuantPlan.from_bits(4, 8))
    bits = {name: m.weight_quant.spec.bits for name, m in q.model.named_modules() if hasattr(m, "weight_quant")}
    assert bits == {"0": 4, "3": 8, "6": 4, "10": 4}, bits
    assert "@depthwise w8" in [o.describe() for o in q.applied_overrides]
    plain = prepare(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), QuantPlan.from_bits(4, 8))
    assert "@depthwise" in [o.pattern for o in plain.plan.overrides]  # in the plan, but no layer is depthwise:
    assert [o.pattern for o in plain.applied_overrides] == ["input"]  # not reported as applied
    same = prepare(_depthwise_net(), QuantPlan.from_bits(4, 8, depthwise_bits=0))
    assert {m.weight_quant.spec.bits for m in same.model.modules() if hasattr(m, "weight_quant")} == {4}
    for bits in (5, 7, 8):  # the others' width above 4 bits (7: what x86 int8 without VNNI runs exactly)
        assert not [o for o in QuantPlan.from_bits(bits, 8).overrides if o.pattern == "@depthwise"]
