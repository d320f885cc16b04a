"""The recipes: the settings a run gets for what its flags leave unset, chosen by model family (training) or
by width (PTQ and QAT). Each is defined here once; ``train.py``, ``quantize.py``, their ``--help`` and the
run summaries read them. Torch-free, so that building the parsers stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lit_quant.quant.spec import DEFAULT_ACT_SPEC, DEFAULT_WEIGHT_SPEC

#: lit-quant's own models (:mod:`lit_quant.app.models`); every other name is a torchvision classifier.
OWN_MODELS = ("lenet5", "resnet20", "resnet32", "resnet56")
#: torchvision's transformer classifiers, by name prefix.
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")


@dataclass(frozen=True)
class TrainRecipe:
    """The optimisation settings a model family gets when their flags are not given (:func:`train_recipe`)."""

    name: str
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: float
    batch_size: int
    bn_momentum: float | None  # BatchNorm running-statistics momentum (None: the model's own)

    def warmup_for(self, epochs: int) -> float:
        """The warm-up of a run of ``epochs``: the recipe's, at most a tenth of the run."""
        return min(self.warmup_epochs, epochs / 10)

    def describe(self) -> str:
        """One line for --help and the run's summary."""
        warm = f", {self.warmup_epochs:g} warm-up epoch (at most a tenth of the run)" if self.warmup_epochs else ""
        bn = f", BatchNorm momentum {self.bn_momentum:g}" if self.bn_momentum is not None else ""
        decay = f"weight decay {self.weight_decay:g}"
        opt = "SGD with Nesterov momentum 0.9" if self.optimizer == "sgd" else "AdamW"
        return f"{self.name}: {opt}, lr {self.lr:g}, {decay}, batch {self.batch_size}{warm}, cosine{bn}"


def train_recipe(model: str) -> TrainRecipe:
    """The training recipe of ``model``'s family (fp32 results: docs/RESULTS.md, the zoo):

    * lit-quant's own networks (CIFAR-style ResNets, LeNet-5): SGD with Nesterov momentum, lr 0.1, weight
      decay 5e-4, batch 64 (He et al. 2016's CIFAR recipe, cosine instead of steps);
    * torchvision's convolutional classifiers: AdamW, lr 0.003, weight decay 0.05, batch 32, one warm-up
      epoch, BatchNorm momentum 0.1. Why: their ImageNet settings (SGD at lr 0.1, BatchNorm momentum down to
      0.0003) assume far more steps than a small data set gives, and do not train there;
    * torchvision's transformers: AdamW at lr 0.0005, the same otherwise.
    """
    if model in OWN_MODELS:
        return TrainRecipe("lit-quant CNN recipe", "sgd", 0.1, 5e-4, 0.0, 64, None)
    if model.startswith(TRANSFORMER_PREFIXES):
        return TrainRecipe("torchvision transformer recipe", "adamw", 5e-4, 0.05, 1.0, 32, None)
    return TrainRecipe("torchvision CNN recipe", "adamw", 3e-3, 0.05, 1.0, 32, 0.1)


#: TrainConfig fields filled from :func:`train_recipe` when not given.
TRAIN_RECIPE_FIELDS = ("optimizer", "lr", "weight_decay", "warmup_epochs", "batch_size", "bn_momentum")


@dataclass(frozen=True)
class QATRecipe:
    """The QAT settings a width gets when their flags are not given (:func:`qat_recipe`)."""

    qat_method: str
    act_observer: str
    weight_observer: str
    weight_rounding: str  # of the calibrated start, as --weight-rounding
    bias_correction: bool  # of the calibrated start, as --bias-correction
    lr_factor: float  # --lr = lr_factor x the fp32 run's peak learning rate
    warmup_epochs: float
    epochs: int
    distill: bool  # knowledge distillation from the fp32 model, as --distill
    first_last_bits: int | None  # the input, first and last layers (None: at the low width too)
    bn_trains: bool  # BatchNorm on batch statistics until the last epoch (False: folded from the start)

    def freeze_bn_epoch(self, epochs: int) -> int:
        """``--freeze-bn-epoch`` of a run of ``epochs``: the last epoch with ``bn_trains``, else 0."""
        return max(epochs - 1, 0) if self.bn_trains else 0

    def describe(self, bits: int) -> str:
        """One line for the report notes and --help."""
        keep = f", input and first/last layers at {self.first_last_bits} bits" if self.first_last_bits else ""
        warm = f", {self.warmup_epochs:g} warm-up epoch" if self.warmup_epochs else ""
        steps = [s for s, on in (("GPTQ", self.weight_rounding == "gptq"), ("bias correction", self.bias_correction))
                 if on]
        start = f" from PTQ with {' and '.join(steps)}" if steps else ""
        teacher = ", distilled from fp32" if self.distill else ""
        bn = ", BatchNorm trained until the last epoch" if self.bn_trains else ", BatchNorm folded"
        return (f"{bits}-bit QAT recipe: {self.qat_method}, {self.act_observer} activation and {self.weight_observer} "
                f"weight ranges{start}, lr {self.lr_factor:g} x fp32's{warm}, {self.epochs} epochs{teacher}{bn}{keep}")


def qat_recipe(weight_bits: int, act_bits: int) -> QATRecipe:
    """The QAT recipe for a width (the narrower of the weight and activation widths); the measurements that
    chose it are in docs/RESULTS.md, "Quantization-aware training".

    * 8 bits and more: fixed ranges (STE) tracked by a moving average (``ema``, as torch.ao's QAT), 1/100 of
      the fp32 learning rate, 5 epochs. Why: QAT only has to undo small rounding errors.
    * below 8 bits: learned step sizes (LSQ, Esser et al. 2020) started from the best PTQ model: ``mse``
      ranges, GPTQ rounding and bias correction (clipping shrinks each channel's output, a shift the bias
      correction removes); the input image and the first and last layers at 8 bits (the image at 4 bits
      costs more than any other tensor; LSQ learns weight steps below 8 bits only, see
      :func:`lit_quant.quant.fake_quant.build_fake_quantize`); one warm-up epoch (the first steps after
      calibration have gradients several times an fp32 model's); 1/10 of the fp32 learning rate for 5
      epochs (8 at 3 bits, 30 at 2 bits).
    * distillation from the fp32 model at 2-3 bits only. Why: there the labels alone can end below PTQ, while
      at 4-7 bits a student distilled from fp32 does not pass its teacher and the labels do better.
    * below 8 bits BatchNorm normalises with batch statistics until the last epoch, which then folds the
      running statistics as deployment does. Why: folding from the first step trains on statistics the
      network no longer has.
    """
    bits = min(weight_bits, act_bits)
    if bits >= 8:
        return QATRecipe("ste", "ema", "minmax", "nearest", False, 0.01, 0.0, 5, False, None, False)
    epochs = 30 if bits <= 2 else 8 if bits == 3 else 5
    return QATRecipe("lsq", "mse", "mse", "gptq", True, 0.1, 1.0, epochs, bits <= 3, 8, True)


@dataclass(frozen=True)
class PTQRecipe:
    """What a PTQ row does after calibrating its ranges (``--ptq-recipe``; each flag given overrides it)."""

    name: str
    weight_rounding: str  # as --weight-rounding
    bias_correction: bool  # as --bias-correction

    def describe(self) -> str:
        return f"PTQ recipe {self.name}: {self.weight_rounding} rounding" + \
            (", bias correction" if self.bias_correction else "")


#: The named PTQ recipes; ``auto`` picks one by width (:func:`ptq_recipe`).
PTQ_RECIPES: dict[str, PTQRecipe] = {r.name: r for r in (
    PTQRecipe("nearest", "nearest", False),
    PTQRecipe("gptq", "gptq", True),
    PTQRecipe("adaround", "adaround", True))}


def ptq_recipe(name: str, weight_bits: int, act_bits: int) -> PTQRecipe:
    """``--ptq-recipe name``; ``auto``: ``nearest`` (calibrated ranges, round-to-nearest) at 8 bits and more,
    where it is within a few hundredths of fp32, and ``gptq`` below 8 (GPTQ rounding and bias correction),
    the most accurate combination measured at 4 bits (docs/RESULTS.md). Cross-layer equalization (``--cle``)
    is in no recipe: with per-channel weight grids, the default, it moved 4-bit accuracy by -0.4 to +0.1
    points."""
    if name == "auto":
        name = "nearest" if min(weight_bits, act_bits) >= 8 else "gptq"
    return PTQ_RECIPES[name]


#: Fields a QAT run takes from :func:`qat_recipe` when not given, and their values outside QAT.
RECIPE_FIELDS: dict[str, Any] = {"qat_method": "ste", "act_observer": DEFAULT_ACT_SPEC.observer,
                                 "weight_observer": DEFAULT_WEIGHT_SPEC.observer,
                                 "weight_rounding": "nearest", "bias_correction": False, "warmup_epochs": 0.0,
                                 "epochs": 5, "distill": False}
