"""Model zoo: classifiers by name, with input channels and classes following the data set.

lit_quant's own models are built from modules only (convolutions, BatchNorm, a separate ``nn.ReLU`` per use,
residual joins as :class:`lit_quant.quant.ops.Add`), so their quantized modules carry the names their
``forward`` uses.

Names:

* ``lenet5`` — LeCun et al. 1998 on 32x32 inputs (the data module resizes to 32);
* ``resnet20`` / ``resnet32`` / ``resnet56`` — CIFAR-style ResNets (He et al. 2016, section 4.2) with
  ``6n + 2`` layers, 16/32/64 channels; downsampling shortcuts are 1x1 conv + BN projections (option B),
  which quantize like any other conv;
* ``resnet18``, ``resnet50``, ``mobilenet_v2`` and every other torchvision classification model by its
  torchvision name: the plain torchvision class, as a user has it (its functional ops are quantized from
  the traced graph, see :mod:`lit_quant.quant.graph`). ``small_input=True`` swaps the ImageNet stem for a
  CIFAR-style one (3x3 stride-1 conv, no max-pool) so 32x32 images keep their detail.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from lit_quant.app.recipes import OWN_MODELS
from lit_quant.errors import UserError
from lit_quant.quant.ops import Add

#: Models that need a fixed input size; the data module resizes to it.
FIXED_INPUT_SIZE: dict[str, int] = {"lenet5": 32}
#: Smallest input each own model handles; torchvision ImageNet models need 32 even with a small stem.
MIN_INPUT_SIZE: dict[str, int] = {"resnet20": 8, "resnet32": 8, "resnet56": 8}
_TORCHVISION_MIN_INPUT = 32


class LeNet5(nn.Module):
    """LeNet-5: conv(6, 5x5) - pool - conv(16, 5x5) - pool - fc120 - fc84 - fc(classes), on 32x32 inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (He et al. 2016): stem conv, three stages of ``n`` blocks, pool, fc."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.flatten(self.pool(self.layers(x))))


@dataclass(frozen=True)
class ModelInfo:
    """What the data pipeline needs to know about a model: a fixed input size, or the smallest it takes."""

    fixed_size: int | None
    min_size: int


_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "lenet5": lambda c, k: LeNet5(c, k),
    "resnet20": lambda c, k: CifarResNet(20, c, k),
    "resnet32": lambda c, k: CifarResNet(32, c, k),
    "resnet56": lambda c, k: CifarResNet(56, c, k),
}
#: The own models by the names the training recipes know them by (:data:`lit_quant.app.config.OWN_MODELS`).
_OWN = {name: _BUILDERS[name] for name in OWN_MODELS}


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """All names :func:`build_model` accepts."""
    return sorted(_OWN) + torchvision_classifiers()


def model_info(name: str) -> ModelInfo:
    """Input-size constraints of model ``name`` (raises :class:`UserError` for unknown names)."""
    _check_name(name)
    if name in FIXED_INPUT_SIZE:
        return ModelInfo(FIXED_INPUT_SIZE[name], FIXED_INPUT_SIZE[name])
    return ModelInfo(None, MIN_INPUT_SIZE.get(name, _TORCHVISION_MIN_INPUT))


def _check_name(name: str) -> None:
    names = available_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; choose from {', '.join(sorted(_OWN))} or a torchvision model name"
        raise UserError(f"unknown model '{name}'{hint}")


def _replace_first_conv(model: nn.Module, in_channels: int, small_input: bool) -> None:
    """Adapt the first convolution to ``in_channels``; with ``small_input`` make it 3x3 stride 1.

    The replacement keeps the conv's output channels and bias setting, so the rest of the network is
    untouched. Why a replacement rather than a wrapper: the stem stays an ``nn.Conv2d`` that quantizes and
    fuses with its BatchNorm like any other.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                kernel, stride, padding = child.kernel_size, child.stride, child.padding
                if small_input:
                    kernel, stride, padding = (3, 3), (1, 1), (1, 1)
                if child.in_channels != in_channels or small_input:
                    setattr(parent, child_name, nn.Conv2d(in_channels, child.out_channels, kernel, stride,
                                                          padding, bias=child.bias is not None))
                return


def _torchvision_model(name: str, in_channels: int, num_classes: int, small_input: bool,
                       image_size: int | None) -> nn.Module:
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    if image_size is not None and name.startswith("vit_"):  # a position embedding per patch of this size
        kwargs.update(image_size=image_size)
    if image_size is not None and name.startswith("maxvit_"):
        kwargs.update(input_size=(image_size, image_size))
    try:
        model = torchvision.models.get_model(name, **kwargs)
    except (AssertionError, ValueError, TypeError) as exc:  # e.g. an image side the patches do not divide
        raise UserError(f"cannot build torchvision's {name} for {image_size}x{image_size} images: "
                        f"{str(exc).strip() or type(exc).__name__}") from None
    _replace_first_conv(model, in_channels, small_input)
    if small_input and hasattr(model, "maxpool"):
        model.maxpool = nn.Identity()
    return model


def build_model(name: str, in_channels: int = 3, num_classes: int = 10, small_input: bool = False,
                image_size: int | None = None) -> nn.Module:
    """Build classifier ``name`` for ``in_channels``-channel images and ``num_classes`` classes.

    Args:
        name: one of :func:`available_models`.
        in_channels: image channels (1 for digits and MNIST-style data, 3 for CIFAR / ImageNet).
        num_classes: number of output logits.
        small_input: torchvision models only — CIFAR-style stem for images of about 32x32.
        image_size: the image side, for the torchvision models built for one (``vit_*``, ``maxvit_*``;
            None: their ImageNet size).

    Raises:
        UserError: unknown name.
    """
    _check_name(name)
    if name in _OWN:
        return _OWN[name](in_channels, num_classes)
    return _torchvision_model(name, in_channels, num_classes, small_input, image_size)
