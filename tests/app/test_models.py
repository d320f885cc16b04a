"""Model zoo: names, channels and classes follow the data set, modules only (quantizable by swapping)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_quant.errors import UserError
from lit_quant.app.models import available_models, build_model, model_info
from lit_quant.quant.ops import Add


@pytest.mark.parametrize("name,in_ch,classes,size", [
    ("lenet5", 1, 10, 32), ("resnet20", 1, 10, 8), ("resnet32", 3, 100, 32), ("resnet56", 3, 10, 16),
])
def test_own_models_shapes(name: str, in_ch: int, classes: int, size: int) -> None:
    model = build_model(name, in_ch, classes).eval()
    assert model(torch.randn(2, in_ch, size, size)).shape == (2, classes)


def test_cifar_resnet_depths_and_modules() -> None:
    for depth in (20, 32, 56):
        model = build_model(f"resnet{depth}", 3, 10)
        convs_fc = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        projections = 2  # the 1x1 shortcut convs of stages 2 and 3 are not counted in the depth
        assert len(convs_fc) - projections == depth
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert len(relus) == len({id(r) for r in relus}) == 1 + 2 * (depth - 2) // 2  # one module per use
        assert sum(isinstance(m, Add) for m in model.modules()) == (depth - 2) // 2


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
def test_torchvision_models_follow_channels_and_classes(name: str) -> None:
    model = build_model(name, 1, 7, small_input=True).eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    # the plain torchvision class, as a user has it (not the quantizable variant with QuantStub)
    assert type(model).__module__.startswith("torchvision.models.") and "quantization" not in type(model).__module__


def test_small_input_stem_keeps_resolution() -> None:
    stem = build_model("resnet18", 3, 10, small_input=True).conv1
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(build_model("resnet18", 3, 10, small_input=True).maxpool, nn.Identity)
    assert build_model("resnet18", 3, 10).conv1.stride == (2, 2)


def test_any_torchvision_classifier_by_name() -> None:
    assert "vgg11" in available_models() and "lenet5" in available_models()
    assert build_model("vgg11", 1, 5).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UserError, match="unknown model 'resnet21'.*resnet20"):
        build_model("resnet21")


def test_model_info_sizes() -> None:
    assert model_info("lenet5").fixed_size == 32
    assert model_info("resnet20").fixed_size is None and model_info("resnet20").min_size == 8
    assert model_info("resnet18").min_size == 32


@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_checkpoint_weights_are_checked_against_the_architecture(name: str) -> None:
    """A torchvision checkpoint's weights pass the shape and finiteness check of its architecture, whether the
    architecture lays out on the meta device (resnet18) or its constructor computes with tensors and is laid
    out on the CPU (RegNet's block widths); a tensor of the wrong shape is named."""
    from lit_quant.app.training import Arch, check_weights, model_from_arch

    arch = Arch(name, "digits", in_channels=1, num_classes=10, image_size=32, small_input=False, bn_momentum=0.1)
    weights = {f"model.{k}": v for k, v in model_from_arch(arch).state_dict().items()}
    check_weights(weights, arch, "x.ckpt")
    first = next(k for k, v in weights.items() if v.dim() == 4)
    weights[first] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(UserError, match=f"has the wrong shape for {first} "):
        check_weights(weights, arch, "x.ckpt")
