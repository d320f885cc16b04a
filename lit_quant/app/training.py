"""fp32 training: builds data, model, LitClassifier and Trainer from a :class:`TrainConfig` and runs them.

``train.py`` is a thin wrapper around :func:`run_training`; tests call it directly. Outputs of a run go to
``<checkpoint_dir>/<run_name>/``: ``best.ckpt`` (highest ``val/top1``, ties to the lower ``val/loss``),
``last.ckpt``, ``config.yaml``, ``metrics.json`` and ``logs/`` (CSV, plus TensorBoard when installed).
Checkpoints, ``config.yaml`` and ``metrics.json`` are written to a temporary file in the run folder and
renamed into place (:mod:`lit_quant.io`), so a kill during a save never leaves a truncated file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import time
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.exceptions import MisconfigurationException
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

from lit_quant.app.classifier import LitClassifier, check_rng_state
from lit_quant.app.config import HardwareConfig, TrainConfig, save_config
from lit_quant.app.data import ClassificationDataModule, dataset_info
from lit_quant.errors import UserError
from lit_quant.io import atomic_write, atomic_write_text, check_writable, describe_os_error, remove_stale_temp_files
from lit_quant.app.models import build_model, model_info
from lit_quant.app.precision import resolve_precision
from lit_quant.safe_load import load_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

@dataclass(frozen=True)
class Arch:
    """How to rebuild a checkpoint's model; every checkpoint stores it as ``hparams.arch`` (:meth:`to_dict`),
    a plain mapping so that loading a checkpoint runs no code.

    Attributes:
        model: the model name (:func:`lit_quant.app.models.build_model`).
        data: the data set it was trained on.
        in_channels: image channels.
        num_classes: classes.
        image_size: the image side it was trained at.
        small_input: the small-image stem of torchvision's ResNets / MobileNets.
        bn_momentum: BatchNorm running-statistics momentum; None keeps the model's own.
    """

    model: str
    data: str
    in_channels: int
    num_classes: int
    image_size: int
    small_input: bool
    bn_momentum: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, arch: dict[str, Any], where: str) -> Arch:
        """The record of a checkpoint's ``arch`` mapping, checked by :func:`check_arch` (``where`` names the
        file in its one-line error)."""
        check_arch(arch, where)
        return cls(**arch)


#: Fields of :class:`Arch` that must agree between a checkpoint and the run resuming from it.
ARCH_KEYS = ("model", "data", "in_channels", "num_classes", "image_size", "small_input")


@dataclass
class TrainResult:
    """What a training run produced: paths and the metrics of the best checkpoint."""

    run_dir: Path
    best_ckpt: Path
    last_ckpt: Path
    config_path: Path
    metrics_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    is_global_zero: bool = True  # False in the other DDP processes, which print and write nothing
    recipe: str = ""  # the family recipe's settings this run took, '' when every one was given
    resumed_from: Path | None = None  # the checkpoint this run continued, None for a fresh run


# ---------------------------------------------------------------------------------------------- building


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose saves go through :func:`atomic_write` and whose loads go through
    :func:`lit_quant.safe_load.load_checkpoint`.

    Lightning's default writes through an fsspec transaction whose temporary file may sit on another file
    system (``/tmp``), where the final move is a copy that a kill can cut short; its default load unpickles
    whatever the file names when asked for ``weights_only=False``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (``storage_options`` is not supported, as in the parent)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))

    def load_checkpoint(self, path: str | Path, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load ``path`` with :func:`lit_quant.safe_load.load_checkpoint`, so that ``fit(ckpt_path=...)`` and
        ``test(ckpt_path=...)`` never unpickle arbitrary objects either.

        Always onto the CPU (Lightning moves model and optimizer state to the device afterwards) and always
        weights-only: ``map_location`` and ``weights_only`` are accepted for the parent's signature and unused.
        """
        return load_checkpoint(path)


class BestCheckpoint(ModelCheckpoint):
    """``best.ckpt``: the model of highest ``monitor``; among equal values, the one of lowest ``tie_break``.

    Lightning's ModelCheckpoint keeps the *first* maximum (its test is a strict ``>``). Top-1 on a small
    validation set moves in coarse steps (digits: 144 images, 0.69 points an image) and plateaus mid-run, so
    the first model of a plateau, still at a high learning rate, would be kept over a later one that ties it
    on top-1 at a fraction of the validation loss. Order: ``(monitor, -tie_break)`` lexicographically, mode
    ``max`` then ``min``.
    """

    def __init__(self, *, monitor: str, tie_break: str, **kwargs: Any) -> None:
        super().__init__(monitor=monitor, mode="max", save_top_k=1, **kwargs)
        self.tie_break = tie_break
        self.best_tie_break: float | None = None  # tie_break of the kept model

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        """Save when ``current`` beats the kept value, or equals it with a lower ``tie_break``."""
        tie = trainer.callback_metrics.get(self.tie_break)
        if current is not None and self.best_k_models and tie is not None and self.best_tie_break is not None \
                and bool(torch.eq(current, self.best_k_models[self.kth_best_model_path])):
            return trainer.strategy.reduce_boolean_decision(float(tie) < self.best_tie_break)
        return super().check_monitor_top_k(trainer, current)

    def _update_best_and_save(self, current: torch.Tensor, trainer: pl.Trainer,
                              monitor_candidates: dict[str, torch.Tensor]) -> None:
        # set before the parent saves: the checkpoint it writes holds this callback's state
        tie = monitor_candidates.get(self.tie_break)
        self.best_tie_break = None if tie is None else float(tie)
        super()._update_best_and_save(current, trainer, monitor_candidates)

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's own key, so a run checkpointed before this class existed resumes its best-model
        tracking (without a tie-break value: the next tie is decided by ``monitor`` alone, as before)."""
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_tie_break": self.best_tie_break}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_tie_break = state_dict.get("best_tie_break")


class StopOnNonFinite(pl.Callback):
    """Stop training with one line at the first step whose loss is NaN or infinite, or at the first validation
    whose loss (or the model's weights and buffers) is.

    Raised before the epoch's checkpoints are written (Lightning runs checkpoint callbacks after the others),
    so ``best.ckpt`` and ``last.ckpt`` keep the last finite model and the run exits with status 2. Under DDP
    the ranks decide together (any rank's bad value stops all), so no rank waits in a collective for one that
    has stopped.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all())
        if self._together(trainer, bad):
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float("nan")
            self._stop(trainer, f"the training loss is {value} (non-finite)")
        # a finite loss whose step overflowed the weights: the next forward would fail inside the model
        broken = next((name for name, p in pl_module.named_parameters() if not bool(torch.isfinite(p).all())), None)
        if self._together(trainer, broken is not None):
            self._stop(trainer, f"the step turned parameter {broken or 'of another process'} non-finite")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        bad_loss = loss is not None and not bool(torch.isfinite(loss).all())
        bad_tensor = next((name for name, t in pl_module.state_dict().items()
                           if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if self._together(trainer, bad_loss or bad_tensor is not None):
            what = f"tensor {bad_tensor} holds non-finite values" if bad_tensor else \
                f"the validation loss is {float(loss)} (non-finite)"
            self._stop(trainer, what)

    @staticmethod
    def _together(trainer: pl.Trainer, bad: bool) -> bool:
        return trainer.strategy.reduce_boolean_decision(bad, all=False) if trainer.world_size > 1 else bad

    @staticmethod
    def _stop(trainer: pl.Trainer, what: str) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        raise UserError(f"{what} at epoch {trainer.current_epoch}, step {trainer.global_step}: training "
                        f"stopped, checkpoints keep the last finite model; the learning rate there was {lr:.3g}, "
                        "try a lower --lr or a longer --warmup-epochs")


def resolve_image_size(cfg: TrainConfig) -> int:
    """The image side the model sees: ``--image-size``, else the data set's, raised to the model's need."""
    info, minfo = dataset_info(cfg.data), model_info(cfg.model)
    if minfo.fixed_size is not None:
        if cfg.image_size is not None and cfg.image_size != minfo.fixed_size:
            raise UserError(f"model {cfg.model} needs {minfo.fixed_size}x{minfo.fixed_size} images, "
                            f"got --image-size {cfg.image_size}")
        return minfo.fixed_size
    size = cfg.image_size or info.native_size
    if size < minfo.min_size:
        if cfg.image_size is not None:
            raise UserError(f"model {cfg.model} needs images of at least {minfo.min_size} pixels, "
                            f"got --image-size {cfg.image_size}")
        size = minfo.min_size
    return size


def build_datamodule(cfg: TrainConfig) -> ClassificationDataModule:
    """The data module for ``cfg``."""
    return ClassificationDataModule(cfg.data, data_dir=cfg.data_dir, image_size=resolve_image_size(cfg),
                                    batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                    val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                    download=cfg.download, augment=cfg.augment, fake_size=cfg.fake_size)


def build_arch(cfg: TrainConfig, num_classes: int | None = None) -> Arch:
    """How to rebuild the model ``cfg`` trains (``num_classes``: the data's own when None)."""
    info = dataset_info(cfg.data)
    return Arch(cfg.model, cfg.data, info.in_channels, num_classes or info.num_classes, resolve_image_size(cfg),
                cfg.small_input, cfg.bn_momentum)


def set_bn_momentum(model: torch.nn.Module, momentum: float | None) -> None:
    """Give every BatchNorm of ``model`` running-statistics momentum ``momentum`` (None: keep the model's)."""
    if momentum is None:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


def model_from_arch(arch: Arch) -> torch.nn.Module:
    """Build the (untrained) model ``arch`` describes."""
    model = build_model(arch.model, arch.in_channels, arch.num_classes, small_input=arch.small_input,
                        image_size=arch.image_size)
    set_bn_momentum(model, arch.bn_momentum)
    return model


def build_classifier(cfg: TrainConfig, arch: Arch) -> LitClassifier:
    """A fresh LitClassifier around the model ``arch`` describes, with ``cfg``'s optimisation settings."""
    return LitClassifier(model_from_arch(arch), arch.num_classes, arch=arch.to_dict(), optimizer=cfg.optimizer,
                         lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                         scheduler=cfg.scheduler, label_smoothing=cfg.label_smoothing,
                         warmup_epochs=cfg.warmup_epochs)


def _parse_devices(devices: str) -> int | str | list[int]:
    text = str(devices).strip()
    if text == "auto" or text == "-1":
        return text if text == "auto" else -1
    try:
        if "," in text:
            return [int(d) for d in text.split(",") if d.strip()]
        return int(text)
    except ValueError:
        raise UserError(f"invalid --devices '{devices}'; give a count, a list like 0,1, or auto") from None


def hardware_settings(cfg: HardwareConfig) -> dict[str, Any]:
    """``accelerator``, ``devices``, ``strategy``, ``num_nodes`` for the Trainer; ``--gpus`` handled here.

    ``--gpus N`` means ``--accelerator gpu --devices N`` (DDP when ``N > 1``); without CUDA it is an error
    that points at the CPU equivalent.
    """
    accelerator, devices, strategy = cfg.accelerator, _parse_devices(cfg.devices), cfg.strategy
    if cfg.gpus is not None:
        if not torch.cuda.is_available():
            raise UserError(f"--gpus {cfg.gpus}: CUDA is not available on this machine; "
                            f"use --accelerator cpu --devices {cfg.gpus} to train with {cfg.gpus} CPU processes")
        accelerator, devices = "gpu", cfg.gpus
        if cfg.gpus > 1 and strategy == "auto":
            strategy = "ddp"
    elif accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"--accelerator {accelerator}: CUDA is not available on this machine; use --accelerator cpu")
    if devices == 0 or (isinstance(devices, list) and not devices):
        raise UserError("--devices must name at least one device (a count >= 1, a list like 0,1, or auto)")
    if cfg.num_nodes > 1:
        strategy = multi_node_strategy(cfg.num_nodes, strategy)
    return {"accelerator": accelerator, "devices": devices, "strategy": strategy, "num_nodes": cfg.num_nodes}


#: Environment variable: seconds a multi-node run waits for its other nodes (default 600).
NODE_TIMEOUT_ENV = "LIT_QUANT_NODE_TIMEOUT"


def check_nodes(num_nodes: int) -> None:
    """Refuse, in one line, a ``--num-nodes`` above 1 when neither ``MASTER_ADDR`` / ``MASTER_PORT`` /
    ``NODE_RANK`` nor a cluster scheduler (SLURM, torchelastic, LSF) say where the nodes meet: the run would
    wait for them forever."""
    if num_nodes <= 1:
        return
    from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    # a scheduler that tells each node where to meet (Kubeflow sets MASTER_ADDR itself)
    managed = any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if not os.environ.get(v)]
    if missing and not managed:
        raise UserError(f"--num-nodes {num_nodes} waits for the other nodes at MASTER_ADDR:MASTER_PORT; set "
                        f"{', '.join(missing)} on every node (MASTER_ADDR: the address of node 0, NODE_RANK: "
                        "0.. on each), or run on one machine with --devices")


def multi_node_strategy(num_nodes: int, strategy: Any) -> Any:
    """The DDP strategy of a ``--num-nodes`` run, which meets its other nodes at ``MASTER_ADDR:MASTER_PORT``
    (:func:`check_nodes` first): DDP with a rendezvous timeout of :data:`NODE_TIMEOUT_ENV` seconds, so that
    nodes that never come end the run instead of holding it forever."""
    check_nodes(num_nodes)
    if strategy not in ("auto", "ddp"):
        return strategy
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy

    return DDPStrategy(timeout=timedelta(seconds=float(os.environ.get(NODE_TIMEOUT_ENV, "600"))))


def _uses_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def build_loggers(run_dir: Path) -> list[Logger]:
    """CSV always; TensorBoard as well when the ``tensorboard`` package is installed."""
    loggers: list[Logger] = [CSVLogger(str(run_dir / "logs"), name="csv")]
    try:
        import tensorboard  # noqa: F401
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir / "logs"), name="tensorboard"))
    except ImportError:
        pass
    return loggers


def build_trainer(cfg: TrainConfig, run_dir: Path, max_epochs: int | None = None,
                  callbacks: list[pl.Callback] | None = None, **trainer_kwargs: Any) -> pl.Trainer:
    """A Trainer for ``cfg`` writing to ``run_dir``; Lightning's own configuration errors become one line.

    ``trainer_kwargs`` go to ``pl.Trainer`` as they are (``sync_batchnorm``, ``enable_checkpointing``).
    """
    hardware = hardware_settings(cfg.hardware)
    precision = resolve_precision(cfg.hardware.precision, cfg.hardware.opt_level, _uses_cuda(hardware["accelerator"]))
    plugins: list[Any] = [AtomicCheckpointIO()]
    if not isinstance(precision, str):
        plugins.append(precision)
        precision = None  # the plugin decides
    callbacks = [*(callbacks or []), StopOnNonFinite()]
    if cfg.progress:
        callbacks.append(RichProgressBar())
    limits = {k: v for k, v in (("limit_train_batches", cfg.limit_train_batches),
                                ("limit_val_batches", cfg.limit_val_batches),
                                ("limit_test_batches", cfg.limit_val_batches)) if v is not None}
    try:
        return pl.Trainer(**hardware, precision=precision, plugins=plugins,
                          max_epochs=max_epochs or cfg.epochs, deterministic=cfg.hardware.deterministic,
                          callbacks=callbacks, logger=build_loggers(run_dir), default_root_dir=str(run_dir),
                          enable_progress_bar=cfg.progress, enable_model_summary=cfg.progress,
                          log_every_n_steps=cfg.log_every_n_steps, use_distributed_sampler=False, **limits,
                          **trainer_kwargs)
    except (MisconfigurationException, ValueError) as exc:
        raise UserError(f"invalid trainer settings: {exc}") from exc


# ---------------------------------------------------------------------------------------------- checkpoints


#: ``hparams.arch``: each field of :class:`Arch` with its type(s); those with a default may be absent.
ARCH_FIELDS: dict[str, type | tuple[type, ...]] = {
    name: typing.get_args(hint) or hint for name, hint in typing.get_type_hints(Arch).items()}
_ARCH_OPTIONAL = tuple(f.name for f in dataclasses.fields(Arch) if f.default is not dataclasses.MISSING)


def _fits(value: Any, kind: type | tuple[type, ...]) -> bool:
    """``isinstance`` where a bool is not an int and an int is a float."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return isinstance(value, kinds) or (float in kinds and isinstance(value, int))


def check_arch(arch: Any, where: str) -> None:
    """The architecture record of a checkpoint (``where`` names the file), checked field by field before any
    model is built: the fields of :data:`ARCH_FIELDS` with their types, positive sizes, a known model and data
    set. :class:`UserError` naming the first field that is wrong."""
    from lit_quant.app.config import DATASETS

    if not isinstance(arch, dict):
        raise UserError(f"{where}: its architecture record is not a mapping")
    missing = [k for k in ARCH_FIELDS if k not in arch and k not in _ARCH_OPTIONAL]
    unknown = sorted(set(arch) - set(ARCH_FIELDS))
    if missing or unknown:
        raise UserError(f"{where}: its architecture record " + (f"lacks {', '.join(missing)}" if missing else
                                                                f"has unknown field(s) {', '.join(unknown)}"))
    for key, kind in ARCH_FIELDS.items():
        if key in arch and not _fits(arch[key], kind):
            raise UserError(f"{where}: architecture field {key} has the wrong type ({arch[key]!r})")
    for key in ("in_channels", "num_classes", "image_size"):
        if arch[key] <= 0:
            raise UserError(f"{where}: architecture field {key} must be positive, got {arch[key]}")
    if arch["data"] not in DATASETS:
        raise UserError(f"{where}: architecture field data names an unknown data set {arch['data']!r}")
    model_info(arch["model"])  # an unknown model name: one line with the close names


def check_hparams(hp: Any, where: str) -> None:
    """A training checkpoint's hyper-parameters: exactly :class:`LitClassifier`'s (the network and the teacher
    aside), each of its type, the architecture checked by :func:`check_arch`."""
    params = {n: p for n, p in inspect.signature(LitClassifier.__init__).parameters.items()
              if n not in ("self", "model", "teacher")}
    if not isinstance(hp, dict):
        raise UserError(f"{where}: its hyper-parameters are not a mapping")
    missing, unknown = sorted(set(params) - set(hp)), sorted(set(hp) - set(params))
    if missing or unknown:
        raise UserError(f"{where}: its hyper-parameters " + (f"lack {', '.join(missing)}" if missing else
                                                             f"include unknown {', '.join(unknown)}"))
    check_arch(hp["arch"], where)
    for name, param in params.items():
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(param.annotation).split(" |")[0])
        if kind is not None and not _fits(hp[name], kind):
            raise UserError(f"{where}: hyper-parameter {name} has the wrong type ({hp[name]!r})")
        if kind is float and not math.isfinite(hp[name]):
            raise UserError(f"{where}: hyper-parameter {name} is not finite ({hp[name]!r})")
    if hp["num_classes"] != hp["arch"]["num_classes"]:
        raise UserError(f"{where}: num_classes {hp['num_classes']} differs from its architecture's "
                        f"{hp['arch']['num_classes']}")


def check_weights(state_dict: Any, arch: Arch, where: str, prefix: str = "model.") -> None:
    """The weights of a checkpoint against its architecture, before the model is built: the model is laid
    out on the meta device (no memory), and every tensor must be there with its shape and finite. A small file
    naming a huge architecture, or weights of another model, is refused without allocating it (except for
    the architectures whose constructors compute with tensors, RegNet's, which are laid out on the CPU)."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{where}: its state_dict is not a mapping of tensors")
    try:
        with torch.device("meta"):
            model = model_from_arch(arch)
    except NotImplementedError:
        # a constructor that computes with tensors (RegNet's block widths) cannot run on the meta device: such
        # an architecture is laid out on the CPU
        model = model_from_arch(arch)
    shapes = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
    mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k in shapes if k not in mine]
    unexpected = [k for k in mine if k not in shapes]
    wrong = [f"{k} {tuple(mine[k].shape)} (the architecture's {shapes[k]})" for k in shapes
             if k in mine and tuple(mine[k].shape) != shapes[k]]
    for found, what in ((missing, "lacks"), (unexpected, "has unexpected"), (wrong, "has the wrong shape for")):
        if found:
            raise UserError(f"{where} does not match its architecture ({arch.model}): it {what} "
                            f"{', '.join(found[:3])}{' and more' if len(found) > 3 else ''}")
    for name, tensor in mine.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{where}: tensor {name} holds NaN or infinite values; the model it saved is broken")


def is_qat_checkpoint(ckpt: dict[str, Any]) -> bool:
    """Whether a Lightning checkpoint was written by a QAT run (it holds the QAT callback's state)."""
    return any("QATCallback" in str(key) for key in ckpt.get("callbacks") or {})


def read_checkpoint(path: str | Path, qat: bool = False) -> dict[str, Any]:
    """Load a training checkpoint on the CPU and check it (:func:`check_hparams`, and for an fp32 one
    :func:`check_weights`); ``qat``: a QAT run's Lightning checkpoint is wanted, else one of train.py.
    :class:`UserError` with one line when it is missing, unreadable, of the other kind, or malformed."""
    path = Path(path)
    ckpt = load_checkpoint(path)  # weights-only: a checkpoint from elsewhere cannot run code here
    if isinstance(ckpt, dict) and ckpt.get("lit_quant") in ("ptq", "qat"):
        raise UserError(f"{path} is a quantized checkpoint written by quantize.py; re-evaluate it with "
                        "quantize.py --eval, or pass the fp32 best.ckpt it came from")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path} is not a lit-quant training checkpoint (no state_dict / hyper_parameters)")
    if is_qat_checkpoint(ckpt) != qat:
        raise UserError(f"{path} is a QAT run's checkpoint; continue it with quantize.py --mode qat --resume"
                        if not qat else f"{path}: not a QAT checkpoint (no QAT state; it was written by train.py "
                        "or another mode); resume QAT from quantize.py --mode qat's qat-w<W>a<A>/last.ckpt")
    check_hparams(ckpt["hyper_parameters"], str(path))
    if not qat:
        check_weights(ckpt["state_dict"], Arch.from_dict(ckpt["hyper_parameters"]["arch"], str(path)), str(path))
    return ckpt


def load_classifier(path: str | Path) -> LitClassifier:
    """Rebuild the LitClassifier stored in checkpoint ``path`` (architecture and fp32 weights)."""
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    module = LitClassifier(model_from_arch(Arch.from_dict(hp["arch"], str(path))), **hp)
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not match its architecture ({hp['arch'].get('model')}): "
                        f"{state_dict_mismatch(exc)}") from None
    return module


def state_dict_mismatch(exc: RuntimeError, limit: int = 3) -> str:
    """The details of a failed ``load_state_dict`` on one line: each kind of mismatch (missing, unexpected
    keys, size mismatches) with its first ``limit`` names, instead of torch's bare first line."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    parts = []
    for line in lines:
        if line.startswith(("Missing key(s)", "Unexpected key(s)")):
            head, _, names = line.partition(":")
            keys = [k.strip().strip('"') for k in names.rstrip(". ").split(",") if k.strip()]
            more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
            parts.append(f"{head.strip().lower()} {', '.join(keys[:limit])}{more}")
        elif line.startswith("size mismatch"):
            parts.append(line.rstrip("."))
    sizes = [p for p in parts if p.startswith("size mismatch")]
    if len(sizes) > limit:
        parts = [p for p in parts if not p.startswith("size mismatch")] + sizes[:limit] + [
            f"{len(sizes) - limit} more size mismatches"]
    return "; ".join(parts) or str(exc).splitlines()[0]


def find_resume_checkpoint(resume: str, checkpoint_dir: str | Path, run_name: str | None) -> Path:
    """``--resume last``: the run's ``last.ckpt`` (``--run-name``) or the newest one; else the path given."""
    if resume != "last":
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume: checkpoint {path} not found")
        return path
    root = Path(checkpoint_dir)
    if run_name is not None:
        path = root / run_name / "last.ckpt"
        if not path.is_file():
            raise UserError(f"--resume last: {path} not found")
        return path
    candidates = sorted(root.glob("*/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume last: no */last.ckpt under {root}/")
    return candidates[-1]


def check_resume_compatible(ckpt: dict[str, Any], arch: Arch, path: Path) -> None:
    """Refuse to resume a checkpoint of another model or data set."""
    saved, mine = ckpt["hyper_parameters"]["arch"], arch.to_dict()
    diffs = [f"{k} {saved.get(k)!r} vs {mine[k]!r}" for k in ARCH_KEYS if saved.get(k) != mine[k]]
    if diffs:
        raise UserError(f"checkpoint {path} does not match this run (checkpoint vs run: {'; '.join(diffs)})")
    if "rng_state" in ckpt:
        try:
            check_rng_state(ckpt["rng_state"])
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as exc:
            raise UserError(f"checkpoint {path}: its saved random-number state (rng_state) is damaged "
                            f"({type(exc).__name__}: {exc}); the run cannot continue exactly from it") from None


# ---------------------------------------------------------------------------------------------- running


def prepare_output_dir(folder: Path, flag: str) -> None:
    """Check that ``folder`` takes files before any work (:func:`check_writable`), and on rank 0 remove
    temporary files that a killed save left there. Other DDP ranks start while rank 0 waits for them, after
    its own check, so they only check."""
    try:
        check_writable(folder)
    except OSError as exc:
        raise UserError(f"{flag}: cannot write to {describe_os_error(exc, folder)}") from None
    if rank_zero_only.rank == 0:
        remove_stale_temp_files(folder)


def lock_folder(folder: Path, flag: str) -> int | None:
    """Take the exclusive lock of ``folder`` (its ``.lock`` file) and return the descriptor holding it (None
    where ``fcntl`` does not exist); :class:`UserError` naming ``flag`` when another run holds it."""
    if fcntl is None:
        return None
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"{flag}: {folder} is in use by another run writing there; wait for it to end, or "
                        "give this run its own folder") from None
    return fd


@contextlib.contextmanager
def output_dir_lock(folder: Path, flag: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (its ``.lock`` file) for the ``with`` block, taken on rank 0.

    Two runs writing the same folder at once (train.py twice into one run, or two quantize.py QAT runs of
    one checkpoint at one width) would overwrite each other's ``best.ckpt`` / ``last.ckpt``, and one would
    report the other's model. The second run stops with one line instead. ``flock`` locks are released by
    the kernel when the process ends, killed or not, so a crashed run never leaves the folder locked;
    where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    fd = lock_folder(folder, flag)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the lock


def run_dir_for(cfg: TrainConfig) -> Path:
    """``<checkpoint_dir>/<run_name or data-model>``."""
    return Path(cfg.checkpoint_dir) / (cfg.run_name or f"{cfg.data}-{cfg.model}")


def _scalars(results: list[dict[str, Any]]) -> dict[str, float]:
    return {k: float(v) for r in results for k, v in r.items()}


def run_training(cfg: TrainConfig, resume_path: Path | None = None) -> TrainResult:
    """Train ``cfg``'s model, then evaluate the best checkpoint on validation and test data.

    Args:
        cfg: the resolved configuration.
        resume_path: checkpoint to continue from (epoch, optimizer, scheduler, loss scaler, RNG states).

    Returns:
        Paths of the run's files and its metrics (``val/top1``, ``test/top1``, ... in percent).
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    if not cfg.download:  # data that cannot train fails here, before anything is written (downloads come later)
        dm.setup()
    arch = build_arch(cfg)
    if resume_path is not None:  # fail with one line before Lightning starts; Lightning then loads it itself
        check_resume_compatible(read_checkpoint(resume_path), arch, resume_path)
    run_dir = run_dir_for(cfg)
    # Two callbacks: this Lightning saves ``save_last`` only when the monitored metric improved, but resume
    # needs last.ckpt from every epoch.
    checkpoint_cb = BestCheckpoint(dirpath=str(run_dir), filename="best", monitor="val/top1", tie_break="val/loss",
                                   auto_insert_metric_name=False, enable_version_counter=False)
    last_cb = ModelCheckpoint(dirpath=str(run_dir), filename="last", save_top_k=1, enable_version_counter=False)
    trainer = build_trainer(cfg, run_dir, callbacks=[checkpoint_cb, last_cb])
    prepare_output_dir(run_dir, "--checkpoint-dir")
    with output_dir_lock(run_dir, "--checkpoint-dir"):
        config_path = run_dir / "config.yaml"
        if trainer.is_global_zero:
            save_config(cfg, config_path)
        if dm.name == "imagenet":  # class count comes from the folders
            dm.setup("fit")
            arch = build_arch(cfg, dm.num_classes)
        lit = build_classifier(cfg, arch)
        start = time.perf_counter()
        with warnings.catch_warnings():
            # Our own config.yaml and logs/ are already in the run folder; the warning would fire on every run.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(lit, datamodule=dm, ckpt_path=str(resume_path) if resume_path else None)
        fit_s = time.perf_counter() - start
        best = Path(checkpoint_cb.best_model_path) if checkpoint_cb.best_model_path else run_dir / "best.ckpt"
        eval_cfg = {"ckpt_path": str(best) if best.is_file() else None, "datamodule": dm, "verbose": False}
        metrics = _scalars(trainer.validate(lit, **eval_cfg)) | _scalars(trainer.test(lit, **eval_cfg))
        metrics = {k: (100.0 * v if ("top" in k) else v) for k, v in metrics.items()}
        result = TrainResult(run_dir, best, run_dir / "last.ckpt", config_path, run_dir / "metrics.json",
                             {**metrics, "epochs": trainer.current_epoch, "fit_time_s": fit_s,
                              "skipped_images": dm.skipped_images(),
                              "precision": str(trainer.precision), "world_size": trainer.world_size},
                             trainer.is_global_zero,
                             f"{cfg.recipe.describe()} (flags given override it)" if cfg.from_recipe else "",
                             Path(resume_path) if resume_path else None)
        if trainer.is_global_zero:
            payload = {"run": run_dir.name, "data": cfg.data, "model": cfg.model, **result.metrics,
                       "best_ckpt": str(best), "last_ckpt": str(result.last_ckpt), "config": str(config_path)}
            atomic_write_text(result.metrics_path, json.dumps(payload, indent=2) + "\n")
        return result
