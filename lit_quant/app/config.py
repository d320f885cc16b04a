"""Run configuration: one dataclass, YAML presets as defaults, command-line flags on top.

Resolution order (later wins): dataclass defaults < ``--config`` YAML < flags given on the command line.
The resolved configuration is saved as ``config.yaml`` beside the checkpoints, and ``--resume`` reads it
back so that a resumed run continues with the settings it started with.

Every field carries its help text and allowed values in ``metadata``; :func:`add_config_arguments` turns
them into argparse flags, so a field and its flag cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from lit_quant.app.recipes import TRAIN_RECIPE_FIELDS, TrainRecipe, train_recipe
from lit_quant.errors import UserError
from lit_quant.io import atomic_write_text
from lit_quant.quant.errors import QuantConfigError
from lit_quant.quant.yamlio import read_yaml

#: Lightning's accelerators and accepted precision values (``Trainer(precision=...)``), defined here rather
#: than read from Lightning so that building the parsers imports neither torch nor Lightning.
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PRECISIONS = ("64-true", "64", "32-true", "32", "16-true", "16-mixed", "16", "bf16-true", "bf16-mixed", "bf16",
              "transformer-engine", "transformer-engine-float16")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a data set: channels, classes, native image size, normalisation."""

    in_channels: int
    num_classes: int
    native_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips are label-preserving augmentation


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(1, 10, 8, (0.305,), (0.375,), hflip=False),
    "mnist": DatasetInfo(1, 10, 28, (0.1307,), (0.3081,), hflip=False),
    "fashion-mnist": DatasetInfo(1, 10, 28, (0.2860,), (0.3530,), hflip=True),
    "cifar10": DatasetInfo(3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True),
    "cifar100": DatasetInfo(3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True),
    "imagenet": DatasetInfo(3, 1000, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), hflip=True),
    "fake": DatasetInfo(3, 10, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), hflip=False),
}


def option(default: Any, help: str, choices: tuple[str, ...] | None = None, flag: str | None = None) -> Any:
    """A config field with its flag's help text and allowed values (read by :func:`add_config_arguments`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def block(cls: type) -> Any:
    """A nested block of settings (:class:`HardwareConfig`): one typed object in the config, while its fields
    stay flags and YAML keys of their own names (``--devices``, ``devices: 2``; a nested ``hardware:`` mapping is
    read too), so that grouping them changes nothing a user types."""
    return field(default_factory=cls, metadata={"block": cls})


def leaf_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """Every setting of ``cls`` with its type hint, the fields of its blocks in their place."""
    hints = get_type_hints(cls)
    out: list[tuple[dataclasses.Field, Any]] = []
    for f in fields(cls):
        out += leaf_fields(f.metadata["block"]) if f.metadata.get("block") else [(f, hints[f.name])]
    return out


def check_choices(config: Any) -> None:
    """Raise :class:`UserError` for a field value outside its ``choices``, listing the allowed ones."""
    for f in fields(config):
        if f.metadata.get("block"):
            check_choices(getattr(config, f.name))
            continue
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:  # a list flag: each of its values
            if choices and item is not None and item not in choices:
                raise UserError(f"invalid --{f.name.replace('_', '-')} '{item}'; choose from {', '.join(choices)}")


@dataclass
class HardwareConfig:
    """Where and how a run computes: one block, the same flags in ``train.py`` and ``quantize.py`` (there, for
    calibration, evaluation and QAT)."""

    accelerator: str = option("auto", "Lightning accelerator", choices=ACCELERATORS)
    devices: str = option("auto", "Lightning devices: a count, a list like 0,1, or auto (DDP over several: "
                          "calibration statistics are merged across processes, evaluation is split)")
    gpus: int | None = option(None, "run on N GPUs (accelerator gpu, devices N, DDP when N > 1)")
    num_nodes: int = option(1, "number of nodes for multi-node DDP")
    strategy: str = option("auto", "Lightning strategy: auto, ddp, ddp_spawn, ddp_find_unused_parameters_true, ...")
    precision: str | None = option(None, "Lightning precision of training and QAT (default: 32-true)",
                                   choices=PRECISIONS)
    opt_level: str | None = option(None, "apex-style mixed precision level of training and QAT (see README)",
                                   choices=("O0", "O1", "O2", "O3"))
    deterministic: bool = option(False, "deterministic algorithms (bit-identical reruns and resumes)")

    def validate(self) -> None:
        """The block's ranges, as one-line errors: ``--gpus`` and ``--num-nodes`` positive."""
        if self.num_nodes <= 0:
            raise UserError(f"--num-nodes must be positive, got {self.num_nodes}")
        if self.gpus is not None and self.gpus <= 0:
            raise UserError(f"--gpus must be positive, got {self.gpus}")


@dataclass
class TrainConfig:
    """Everything ``train.py`` needs; see the README for each flag."""

    # data
    data: str = option("digits", "data set", choices=DATASETS)
    data_dir: str | None = option(None, "folder with the data set's files (default: Debian's Fashion-MNIST, else ./data)")
    download: bool = option(False, "download the data set with torchvision when missing (needs internet)")
    image_size: int | None = option(None, "image side the model sees (default: the data set's, raised to the model's need)")
    batch_size: int | None = option(None, "batch size per process (default: the model family's recipe)")
    num_workers: int = option(0, "data-loader worker processes")
    val_fraction: float = option(0.1, "share of the training data held out for validation")
    split_seed: int = option(0, "seed of the train/val/test split (kept apart from --seed)")
    fake_size: int = option(512, "training images of the synthetic 'fake' data set")
    augment: bool = option(True, "random crop / flip augmentation of the training data")
    # model
    model: str = option("resnet20", "model: lenet5, resnet20/32/56, or any torchvision classifier name")
    small_input: bool = option(False, "torchvision models: CIFAR-style stem (3x3 conv, no max-pool) for small images")
    # optimisation
    epochs: int = option(15, "training epochs")
    optimizer: str | None = option(None, "optimizer (default: the model family's recipe)", choices=("sgd", "adamw"))
    lr: float | None = option(None, "peak learning rate (default: the model family's recipe)")
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    weight_decay: float | None = option(None, "weight decay (default: the model family's recipe)")
    bn_momentum: float | None = option(None, "BatchNorm running-statistics momentum, in (0, 1] (default: the model "
                                       "family's recipe; unset there: the model's own)")
    scheduler: str = option("cosine", "learning-rate schedule, stepped every batch", choices=("cosine", "onecycle", "none"))
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    warmup_epochs: float | None = option(None, "linear learning-rate warm-up from 1/100 of --lr over this many "
                                         "epochs (fractions allowed; 0: none), with --scheduler cosine or none "
                                         "(default: the model family's recipe)")
    seed: int = option(42, "random seed of initialisation, shuffling and augmentation")
    hardware: HardwareConfig = block(HardwareConfig)
    # outputs
    checkpoint_dir: str = option("checkpoints", "root folder of runs; a run writes to <checkpoint-dir>/<run-name>/")
    run_name: str | None = option(None, "run folder name (default: <data>-<model>)")
    resume: str | None = option(None, "resume from 'last' (newest last.ckpt, or the --run-name's) or a checkpoint path")
    limit_train_batches: int | None = option(None, "use at most this many training batches per epoch (smoke tests)")
    limit_val_batches: int | None = option(None, "use at most this many validation/test batches (smoke tests)")
    progress: bool = option(True, "rich progress bar")
    log_every_n_steps: int = option(10, "logging interval in steps")

    def __post_init__(self) -> None:
        # The recipe's values are part of the resolved config: config.yaml, the summary and --resume see them.
        self.from_recipe = [name for name in TRAIN_RECIPE_FIELDS if getattr(self, name) is None]
        if self.from_recipe and isinstance(self.model, str):
            recipe = self.recipe
            for name in self.from_recipe:
                setattr(self, name, getattr(recipe, name))
            if "warmup_epochs" in self.from_recipe and isinstance(self.epochs, int):
                self.warmup_epochs = recipe.warmup_for(self.epochs)

    @property
    def recipe(self) -> TrainRecipe:
        """The training recipe of this model's family (:func:`train_recipe`)."""
        return train_recipe(self.model)

    def validate(self) -> None:
        """Check values that argparse cannot; raises :class:`UserError` with the allowed values."""
        self.hardware.validate()
        for name in ("epochs", "batch_size", "fake_size", "log_every_n_steps"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("image_size", "limit_train_batches", "limit_val_batches"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.batch_size > MAX_BATCH:
            raise UserError(f"--batch-size must be at most {MAX_BATCH}, got {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        check_optimisation(self.momentum, self.weight_decay, self.label_smoothing, self.seed)
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.run_name is not None:
            check_folder_name(self.run_name, "--run-name")
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise UserError(f"--bn-momentum must be in (0, 1], got {self.bn_momentum}")
        check_warmup(self.warmup_epochs, self.epochs, self.scheduler)
        check_choices(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The largest batch a data loader takes (a 32-bit count of samples).
MAX_BATCH = 2**31 - 1


def check_optimisation(momentum: float, weight_decay: float, label_smoothing: float, seed: int) -> None:
    """train.py's optimiser and loss settings: ``--momentum`` in [0, 1), ``--weight-decay`` >= 0,
    ``--label-smoothing`` in [0, 1), and ``--seed`` (:func:`check_seed`)."""
    if not 0 <= momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {momentum}")
    if not weight_decay >= 0:
        raise UserError(f"--weight-decay must be >= 0, got {weight_decay}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
    check_seed(seed)


def check_seed(seed: int) -> None:
    """``--seed`` (train.py and QAT) in [0, 2^32): numpy's seed range, which Lightning seeds too."""
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be in 0..{2**32 - 1}, got {seed}")


def check_folder_name(name: str, flag: str) -> None:
    """A run's or report's folder name: one plain path component, so that outputs stay inside the folder
    they are meant for (no ``/``, ``..``, absolute paths or empty names)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith("~"):
        raise UserError(f"{flag} must be a plain folder name (no '/', '..' or absolute path), got {name!r}")


def check_warmup(warmup_epochs: float, epochs: int, scheduler: str = "cosine") -> None:
    """``--warmup-epochs``: in ``[0, --epochs)``, and not with the ``onecycle`` schedule (its own warm-up)."""
    if not 0 <= warmup_epochs < epochs:
        raise UserError(f"--warmup-epochs must be in [0, --epochs) = [0, {epochs}), got {warmup_epochs:g}")
    if warmup_epochs > 0 and scheduler == "onecycle":
        raise UserError("--warmup-epochs does not combine with --scheduler onecycle, which warms up by itself")


def _type_name(hint: Any) -> str:
    """'an integer', 'a number', ... for a field's annotation (``X | None`` adds 'or null')."""
    members = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    words = [names.get(t, "a list of strings") for t in members if t is not type(None)]
    return " or ".join(words) + (" (or null)" if type(None) in members else "")


def _value_fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (from YAML or a flag) has the type ``hint`` asks for: ``bool`` is not an integer,
    an integer is a number, a list of strings fills ``tuple[str, ...]``."""
    if get_origin(hint) in (Union, UnionType):
        return any(_value_fits(value, member) for member in get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if get_origin(hint) in (list, tuple):
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return True


def check_types(values: dict[str, Any], cls: type) -> None:
    """Raise :class:`UserError` for a value whose type is not its field's (``epochs: three`` in a YAML file,
    ``batch_size: 2.5``, a ``fold_bn: "no"`` string for a boolean) or a number that is NaN or infinite."""
    hints = {f.name: hint for f, hint in leaf_fields(cls)}
    for name, value in values.items():
        hint = hints[name]
        flag = name.replace("_", "-")
        if not _value_fits(value, hint):
            raise UserError(f"invalid value for {flag}: {value!r} (expected {_type_name(hint)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"invalid value for {flag}: {value} (expected a finite number)")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """Add one flag per field of ``cls``; unset flags stay absent from the namespace (``SUPPRESS``).

    Absent flags let YAML presets supply the value; the help text shows the built-in default.
    """
    for f, base in leaf_fields(cls):
        flag = f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"
        help_text = f.metadata["help"]  # a help that explains its default itself (one depending on the mode)
        help_text += "" if "default:" in help_text else f" (default: {f.default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.metadata.get("choices"):  # argparse lists them in the help ({a,b}) and refuses others with one line
            kwargs["choices"] = f.metadata["choices"]
        members = get_args(base) if get_origin(base) in (Union, UnionType) else (base,)  # unwrap "X | None"
        inner = next((t for t in members if t is not type(None)), str)
        if inner is bool:  # --flag / --no-flag (a "bool | None" field stays None, i.e. automatic, when unset)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if get_origin(inner) in (list, tuple):  # tuple[str, ...]: one or more values after the flag
            parser.add_argument(flag, type=get_args(inner)[0], nargs="+", **_metavar(f.name, kwargs), **kwargs)
            continue
        parser.add_argument(flag, type=inner, **_metavar(f.name, kwargs), **kwargs)


def _metavar(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The field's name as the value placeholder; none for a choice flag, whose ``{a,b}`` says more."""
    return {} if "choices" in kwargs else {"metavar": name.upper()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config fields (dashes or underscores); :class:`UserError` when unreadable
    (:func:`lit_quant.quant.yamlio.read_yaml`)."""
    path = Path(path)
    try:
        data = read_yaml(path, "config") or {}
    except QuantConfigError as exc:
        raise UserError(str(exc)) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flat(values: dict[str, Any], cls: type) -> dict[str, Any]:
    """``values`` with each block's nested mapping (a saved ``hardware:`` section) spread into its settings."""
    blocks = {f.name for f in fields(cls) if f.metadata.get("block")}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in blocks and isinstance(value, dict):
            out.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _build(cls: type, values: dict[str, Any]) -> Any:
    """``cls`` from flat settings, each block built from its own."""
    kwargs = {}
    for f in fields(cls):
        if f.metadata.get("block"):
            kwargs[f.name] = _build(f.metadata["block"], values)
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def resolve_config(overrides: dict[str, Any], yaml_defaults: dict[str, Any] | None = None,
                   cls: type = TrainConfig) -> Any:
    """Build ``cls`` from built-in defaults < ``yaml_defaults`` < ``overrides`` (flat settings, or a block's
    nested mapping) and validate it."""
    known = {f.name for f, _ in leaf_fields(cls)}
    merged = {**_flat(yaml_defaults or {}, cls), **_flat(overrides, cls)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}")
    check_types(merged, cls)
    try:
        config = _build(cls, merged)
    except TypeError as exc:
        raise UserError(f"invalid configuration: {exc}") from exc
    config.validate()
    return config


def save_config(config: Any, path: Path) -> None:
    """Save the resolved configuration as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
