"""Lightning callbacks that drive the quantization core (:mod:`lit_quant.quant`) from a Trainer.

Each works on its own in the ``Trainer(callbacks=[...])`` of any LightningModule:

* :class:`QATCallback` (quantization-aware training): prepares the network in ``setup``, calibrates it on
  the first training batches, then fine-tunes it with fake quantization;
* :class:`PTQCalibration` (post-training quantization): with a plan, prepares and calibrates the network
  before ``validate`` / ``test`` / ``predict``, so ``trainer.test`` reports the quantized model; without
  one, ``trainer.predict`` over calibration batches is the calibration pass of a network prepared before.

The network is every direct child module of the LightningModule that holds a trainable parameter
(``self.model``, ``self.net``, ``self.backbone`` and ``self.head``, or layers defined on the module itself;
torchmetrics metrics, losses, activations and frozen modules are left alone), or the modules named by
``modules=`` (:func:`network_modules`). Calibration runs the LightningModule's ``forward`` on each batch's
input. The hooks only swap those submodules for their prepared copies, flip the quantizers' switches and
call the core; they never patch ``forward`` or add attributes to the user's model (why Lightning removed its
own QAT callback, Lightning-AI#16750).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.model_helpers import is_overridden
from pytorch_lightning.utilities.seed import isolate_rng
from torch import nn
from typing_extensions import override

from lit_quant.quant import (
    QuantizedModel,
    QuantPlan,
    calibrate,
    enable_fake_quant,
    enable_observer,
    finish_calibration,
    iter_quantizers,
    prepare,
    set_batch_index,
    start_calibration,
    sync_observers,
    update_qparams,
)
from lit_quant.quant.errors import CalibrationError, NonFiniteError, QuantConfigError
from lit_quant.quant.fake_quant import set_step_qparams
from lit_quant.quant.layers import freeze_bn_stats, refresh_weight_qparams
from lit_quant.quant.plan import FIRST, INPUT, LAST, OUTPUT, ROLES

#: Batches a callback calibrates on unless told otherwise: quantize.py's ``--calib-batches`` default, a
#: small sample of the training data (a few thousand images at usual batch sizes) observed in seconds.
CALIBRATION_BATCHES = 32

#: Layer types ``prepare`` quantizes the weights of: what ``@first`` / ``@last`` refer to.
_WEIGHTED = (nn.Conv2d, nn.Linear)


# --- the network: which modules, prepared how ---------------------------------------------------------------
def network_modules(pl_module: nn.Module, modules: str | Sequence[str] | None = None) -> list[str]:
    """Names of the modules of ``pl_module`` that form the network to quantize.

    ``modules`` given: those names (dotted for deeper modules), each checked to be a module. Otherwise every
    direct child holding a trainable parameter, in definition order, except torchmetrics metrics: the
    network wherever it is stored (``self.model``, ``self.net``, ``self.backbone`` + ``self.head``, or layers
    defined on the LightningModule itself), without losses, activations, metrics or frozen teachers.

    Raises:
        QuantConfigError: a name that is not a module of ``pl_module``, or no candidate at all.
    """
    if modules is not None:
        names = [modules] if isinstance(modules, str) else list(modules)
        for name in names:
            try:
                pl_module.get_submodule(name)
            except AttributeError:
                raise QuantConfigError(f"modules={name!r}: {type(pl_module).__name__} has no such submodule; "
                                       f"its modules: {', '.join(n for n, _ in pl_module.named_children())}") \
                    from None
        if not names:
            raise QuantConfigError("modules=[] names no module to quantize")
        return names
    names = [name for name, child in pl_module.named_children()
             if not isinstance(child, torchmetrics.Metric) and any(p.requires_grad for p in child.parameters())]
    if not names:
        raise QuantConfigError(f"{type(pl_module).__name__} has no child module with trainable parameters to "
                               "quantize; name the network with modules=[...]")
    return names


class _Scope(nn.Module):
    """Holds one module of a network made of several under its name in the LightningModule, so that the
    layer names a plan's overrides match are the LightningModule's own (``head.fc``, ``conv1``)."""

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__()
        self.key = name
        self.add_module(name, module)

    def forward(self, x: Any) -> Any:
        return getattr(self, self.key)(x)


def _scoped(name: str, module: nn.Module) -> nn.Module:
    """``module`` inside one :class:`_Scope` per component of its dotted ``name``."""
    for part in reversed(name.split(".")):
        module = _Scope(part, module)
    return module


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _scoped_network(names: list[str], children: dict[str, nn.Module]) -> bool:
    """Whether the network's modules are prepared inside scopes of their names: several modules, or one
    single layer (which :func:`prepare` needs inside a container); not one module holding the network."""
    if len(names) > 1:
        return True
    child = children[names[0]]
    return isinstance(child.model, _Scope) if isinstance(child, QuantizedModel) else _is_leaf(child)


@contextmanager
def stop_when_non_finite(trainer: pl.Trainer | None) -> Iterator[None]:
    """Training with a quantized model: a quantizer that meets NaN or infinity (the step before overflowed
    the weights or their BatchNorm fold) stops the run with one :class:`NonFiniteError` saying where, instead
    of an observer's complaint."""
    try:
        yield
    except NonFiniteError as exc:
        where = f" at epoch {trainer.current_epoch}, step {trainer.global_step}" if trainer is not None else ""
        raise NonFiniteError(f"the model's values turned non-finite{where} ({exc}); training stopped, checkpoints "
                             "keep the last finite model; try a lower --lr") from None


def _layer_names(name: str, child: nn.Module) -> set[str]:
    """The names a scoped network module's layers have in the LightningModule (also once prepared)."""
    tree = child.model if isinstance(child, QuantizedModel) else _scoped(name, child)
    return {n for n, _ in tree.named_modules() if n}


def _own_plan(plan: QuantPlan, name: str, names: list[str], children: dict[str, nn.Module]) -> QuantPlan:
    """The plan network module ``name`` is prepared with, when the network is the modules ``names``.

    One module that holds the network gets ``plan``: layer names are those inside it, as :func:`prepare`
    names them. Several modules (in definition order, taken as the order data flows through them) or a
    single layer are each prepared inside a scope of their name, so layer names are the LightningModule's;
    each keeps the overrides that match one of its names, and the model-wide ones follow the whole network:
    ``input`` applies to the first module's input, ``@first`` / ``@last`` to the first / last Conv2d or
    Linear of the network, ``@output`` to the last module's output layer. Every later module's input quantizer quantizes an inner activation, with the
    plan's activation spec.
    """
    if not _scoped_network(names, children):
        return plan
    weighted = [n for n in names if any(isinstance(m, _WEIGHTED) for m in children[n].modules())]
    own = _layer_names(name, children[name])
    kept = []
    for o in plan.overrides:
        if o.pattern == INPUT:
            keep = name == names[0]
        elif o.pattern == OUTPUT:
            keep = name == names[-1]
        elif o.pattern in (FIRST, LAST):
            keep = bool(weighted) and name == weighted[0 if o.pattern == FIRST else -1]
        else:
            keep = any(o.matches(n) for n in own)
        if keep:
            kept.append(o)
    return dataclasses.replace(plan, overrides=tuple(kept))


def _check_overrides(plan: QuantPlan, names: list[str], children: dict[str, nn.Module]) -> None:
    """Raise if an override of a scoped network matches no module of it (a typo: ``prepare`` itself only
    sees the overrides each module keeps)."""
    if not _scoped_network(names, children):
        return  # prepare checks the names itself
    known = sorted(set().union(*(_layer_names(name, children[name]) for name in names)))
    for o in plan.overrides:
        if o.pattern not in ROLES and not any(o.matches(n) for n in known):
            raise QuantConfigError(f"plan override {o.pattern!r} matches no module of the network "
                                   f"({', '.join(names)}); its layers: {', '.join(known[:20])}")


def _check_one_input(name: str, module: nn.Module) -> None:
    """A network of several modules calls each through a one-input scope: refuse a module needing more."""
    required = [p for p in inspect.signature(module.forward).parameters.values()
                if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if len(required) > 1:
        raise QuantConfigError(f"network module {name!r} takes {len(required)} inputs; with several network "
                               "modules each must take one: name the network with modules=[...]")


def prepare_network(pl_module: nn.Module, plan: QuantPlan, qat: bool,
                    modules: str | Sequence[str] | None = None) -> list[str]:
    """Replace each network module of ``pl_module`` (:func:`network_modules`) by ``prepare(module, plan)``;
    a module that already is a :class:`QuantizedModel` of the same plan is kept as it is (a calibrated or
    restored model is never prepared twice). Returns the network's module names.

    Prepare before the optimizer is built: the prepared copy has its own parameters.

    Raises:
        QuantConfigError: a module already quantized with another plan, or an override of a several-module
            network that matches none of its layers.
    """
    names = network_modules(pl_module, modules)
    children = {name: pl_module.get_submodule(name) for name in names}
    _check_overrides(plan, names, children)
    scoped = _scoped_network(names, children)
    for name, child in children.items():
        own = _own_plan(plan, name, names, children)
        if isinstance(child, QuantizedModel):
            if child.plan not in (own, plan):
                raise QuantConfigError(f"{name}: the model is already quantized with a different plan; start "
                                       "from the fp32 model or use the plan it was quantized with")
            continue
        if scoped:
            _check_one_input(name, child)
        try:
            prepared = prepare(_scoped(name, child) if scoped else child, own, qat=qat)
        except QuantConfigError as exc:
            if len(names) == 1:
                raise
            raise QuantConfigError(f"{name}: {exc}") from None  # which of the network's modules
        parent, _, attr = name.rpartition(".")
        setattr(pl_module.get_submodule(parent) if parent else pl_module, attr, prepared)
    return names


def uncalibrated(module: nn.Module) -> list[str]:
    """Names of the quantizers in ``module`` that have no qparams yet (empty: calibrated or restored)."""
    return [name for name, fq in iter_quantizers(module) if not bool(fq.qparams_valid)]


# --- calibration from a Trainer ---------------------------------------------------------------------------
@contextmanager
def _outside_inference() -> Iterator[None]:
    """Quantizer state changed from a hook: outside inference mode (Lightning evaluates under
    ``torch.inference_mode`` by default), where buffers created or resized would become inference tensors
    that later training could not update; without autograd, as no state change is differentiated."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _before_transfer(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
    """``on_before_batch_transfer`` of the data module when it defines one, else of the module, as Lightning."""
    dm = trainer.datamodule
    owner = dm if dm is not None and is_overridden("on_before_batch_transfer", dm, pl.LightningDataModule) \
        else pl_module
    return owner.on_before_batch_transfer(batch, 0)


def calibrate_from(trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable[Any],
                   batches: int | None, shard: bool) -> int:
    """Calibrate every quantizer of ``pl_module`` on the first ``batches`` batches of ``loader`` (None: all)
    with :func:`lit_quant.quant.calibrate`; returns the number of samples this process observed.

    Each batch goes through what Lightning does to a training batch (precision conversion, the batch
    transfer hooks, the device), then ``pl_module(x)``, ``x`` its first element (or the batch itself), in
    eval mode without gradients. Under DDP with ``W`` processes, rank ``r`` observes its ``i``-th batch as
    global batch ``i W + r``: ``shard`` takes batches ``r, r + W, ...`` of ``loader`` (the same batches on
    every rank, as an explicit data loader or a ``train_dataloader()`` is), so all ranks together observe
    exactly the first ``batches`` and end with the qparams one process computes on them; without
    ``shard`` (a loader Lightning already split by rank) each rank takes the first of its own, as many.
    The random state is left as it was: training draws the same numbers as without calibration.

    Raises:
        CalibrationError: no ``forward`` to run, no batches, or a quantizer that saw no data.
    """
    if not is_overridden("forward", pl_module, pl.LightningModule):
        raise CalibrationError(f"calibration runs {type(pl_module).__name__}.forward(x) on each batch's input: "
                               "define forward")
    world, rank = trainer.world_size, trainer.global_rank
    if shard:
        own = itertools.islice(loader, rank, batches, world)
    else:
        own = itertools.islice(loader, None if batches is None else len(range(rank, batches, world)))
    plugin = trainer.precision_plugin

    def on_device() -> Iterator[Any]:
        for batch in own:
            batch = _before_transfer(trainer, pl_module, plugin.convert_input(batch))
            yield trainer.strategy.batch_to_device(batch)

    with isolate_rng(), _outside_inference(), plugin.forward_context():
        return calibrate(pl_module, on_device())


def _train_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any] | None:
    """The data module's ``train_dataloader()``, else the module's; None without one."""
    dm = trainer.datamodule
    if dm is not None and is_overridden("train_dataloader", dm, pl.LightningDataModule):
        return dm.train_dataloader()
    if is_overridden("train_dataloader", pl_module, pl.LightningModule):
        return pl_module.train_dataloader()
    return None


def _check_batches(batches: int | None) -> None:
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int) or batches < 0):
        raise QuantConfigError(f"calibration_batches must be a non-negative integer or None, got {batches!r}")


class PTQCalibration(pl.Callback):
    """Post-training quantization in a Trainer, two ways.

    **With a plan** (``PTQCalibration(plan)``): one callback turns ``trainer.validate`` / ``trainer.test`` /
    ``trainer.predict`` of any LightningModule into the evaluation of its quantized network. At the start
    of each of them (after Lightning restored a ``ckpt_path``, so a float checkpoint such as
    ``ckpt_path="best"`` loads first), every network module (:func:`network_modules`) is replaced by
    ``prepare(module, plan)`` and, unless its quantizers already have qparams, the network is calibrated on
    the first ``calibration_batches`` batches of ``dataloader``, else of the data module's or the module's
    ``train_dataloader()``, else of the loader ``fit`` trained on (:func:`calibrate_from`). The quantized
    network stays in the module; ``fit`` leaves it alone.

    **Without a plan** (``PTQCalibration()`` on a network prepared beforehand): ``trainer.predict`` over the
    calibration batches is the calibration pass. ``on_predict_start``: observers on, fake quant off, so the
    passes record statistics of the float model's tensors. Each batch is observed as global batch
    ``batch_idx * world_size + global_rank`` (:func:`lit_quant.quant.set_batch_index`). ``on_predict_end``:
    observer statistics are merged across DDP ranks, qparams computed, observers off and fake quant on:
    the module is ready for ``trainer.validate`` / ``trainer.test``. When rank ``r`` gets batches
    ``r, r + W, r + 2W, ...`` of one process's batching, as the data module's ``predict_dataloader``
    serves them, every rank computes bit for bit the qparams one process computes on all the calibration
    batches, with every observer (see :mod:`lit_quant.quant.observers`). Use
    ``trainer.predict(module, datamodule=dm, return_predictions=False)``. A ``dataloader`` without a plan
    calibrates the prepared network from it before evaluation instead.

    Args:
        plan: the quantization plan; None: the network is prepared already.
        dataloader: calibration batches (``(inputs, targets)`` pairs or input tensors).
        calibration_batches: how many batches of it to calibrate on, over all processes (None: all).
        modules: the network's module names in the LightningModule (default: found, see above).

    Raises:
        CalibrationError: with a plan, no calibration data anywhere (the message says what to pass); an
            empty calibration set.

    Example::

        import pytorch_lightning as pl
        from lit_quant import PTQCalibration, QuantPlan

        ptq = PTQCalibration(QuantPlan.from_bits(8, 8), dataloader=calib_loader, calibration_batches=4)
        trainer = pl.Trainer(callbacks=[ptq], logger=False, enable_progress_bar=False)
        trainer.test(module, test_loader)   # module: any LightningModule; its network is now quantized
    """

    def __init__(self, plan: QuantPlan | None = None, *, dataloader: Iterable[Any] | None = None,
                 calibration_batches: int | None = CALIBRATION_BATCHES,
                 modules: str | Sequence[str] | None = None) -> None:
        _check_batches(calibration_batches)
        self.plan = plan
        self.dataloader = dataloader
        self.calibration_batches = calibration_batches
        self.modules = modules
        self._calibrated = False
        self._fit_loader: Iterable[Any] | None = None

    @property
    def automatic(self) -> bool:
        """Whether the callback prepares and calibrates by itself before evaluating (a plan or a data loader)."""
        return self.plan is not None or self.dataloader is not None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self._calibrated = False

    # --- with a plan: prepare and calibrate before evaluating -------------------------------------------
    def _quantize_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.automatic or trainer.state.fn == TrainerFn.FITTING:
            return  # fit trains the float network; its validation stays float
        with _outside_inference():
            if self.plan is not None:
                device = pl_module.device
                prepare_network(pl_module, self.plan, qat=False, modules=self.modules)
                pl_module.to(device)  # the new quantizers' buffers, created on the CPU
            elif not any(True for _ in iter_quantizers(pl_module)):
                raise CalibrationError("PTQCalibration(dataloader=...) without a plan calibrates a network "
                                       "prepared before; this one has no quantizers: pass the plan too")
            if not uncalibrated(pl_module):
                return  # calibrated before, or restored: never calibrated twice
            loader = self.dataloader if self.dataloader is not None else _train_loader(trainer, pl_module)
            if loader is not None:
                calibrate_from(trainer, pl_module, loader, self.calibration_batches, shard=True)
            elif self._fit_loader is not None:  # already split by rank, as Lightning served it
                calibrate_from(trainer, pl_module, self._fit_loader, self.calibration_batches, shard=False)
            else:
                raise CalibrationError(
                    "PTQCalibration has no calibration data: pass PTQCalibration(plan, dataloader=...), or give "
                    "the Trainer a datamodule or LightningModule with train_dataloader()")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning forgets the loader fit trained on when the next trainer call attaches its data: keep it
        # for calibrating a later validate / test of this Trainer.
        loader = trainer.train_dataloader
        self._fit_loader = None if isinstance(loader, (Mapping, list, tuple)) else loader

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize_for_evaluation(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._quantize_for_evaluation(trainer, pl_module)

    # --- predict: the calibration pass without a plan; the quantized model's predictions with one ------
    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.automatic:
            self._quantize_for_evaluation(trainer, pl_module)
            return
        if not any(True for _ in iter_quantizers(pl_module)):
            raise CalibrationError("PTQ calibration: the model has no quantizers (prepare() it first)")
        set_batch_index(pl_module, None)  # the weights observed here belong to no batch
        start_calibration(pl_module)

    @override
    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.automatic:
            set_batch_index(pl_module, batch_idx * trainer.world_size + trainer.global_rank)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.automatic:
            set_batch_index(pl_module, None)
            finish_calibration(pl_module)
        self._calibrated = True

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict" or self.automatic:
            return
        set_batch_index(pl_module, None)  # also after a failed pass: later observations belong to no batch
        # Lightning skips the whole predict loop, hooks included, when the dataloader is empty: without this
        # check an empty calibration set would leave the model silently uncalibrated.
        if not self._calibrated:
            raise CalibrationError("PTQ calibration saw no batches: the calibration set is empty")


def frozen_at(epoch: int, freeze_epoch: int | None) -> bool:
    """Whether a schedule that freezes at ``freeze_epoch`` (None: never) has frozen by ``epoch``."""
    return freeze_epoch is not None and epoch >= freeze_epoch


class QATCallback(pl.Callback):
    """Quantization-aware training of a LightningModule's network with the plan ``plan``: one callback in
    ``Trainer(callbacks=[...])``, then ``fit``.

    * ``setup``: every float network module (:func:`network_modules`) is replaced by
      ``prepare(module, plan, qat=True)`` (Conv-BN pairs fold as they train, see
      :class:`lit_quant.quant.layers.QuantConvBn2d`) and its weight qparams are computed from its weights,
      so every parameter (LSQ step sizes included) has its final shape before Lightning builds the
      optimizer and wraps the module for DDP. This runs before Lightning restores a checkpoint, so
      ``fit(ckpt_path=...)``, ``test(ckpt_path=...)`` and ``load_from_checkpoint`` find the quantized
      structure (qparams, LSQ scales, BN-freeze flags) their state dict was saved from. A module that
      already is a :class:`QuantizedModel` is kept (one prepared with another plan is refused). For ``fit``
      the module is put in train mode.
    * calibration, at the start of training, unless every quantizer has qparams already (calibrated with
      :class:`PTQCalibration` during ``trainer.predict``, or restored from a checkpoint): the first
      ``calibration_batches`` batches of ``dataloader``, else of the training data as Lightning serves it
      to this process, run through ``forward`` with observers on and fake quant off
      (:func:`calibrate_from`; DDP ranks end with the same qparams). The sanity-check validation that
      Lightning runs before training evaluates the network in float: there are no qparams yet.
    * training: fake quant on; each epoch, observers run until ``freeze_observers_epoch`` and BatchNorm
      statistics until ``freeze_bn_epoch`` (torchvision's QAT recipe). While observers run, activation
      statistics are merged across DDP ranks after every step and the qparams recomputed from them, so all
      ranks use the same qparams at every step (torch.ao only broadcasts rank 0's buffers). Weights are
      the same on every rank; their qparams follow the current weight.
    * validation / test / end of training: weight qparams refreshed from the current weights, observers off,
      so evaluation data never moves a range; after ``fit`` the model is left in that evaluation state.
      Validating or testing a network that was never calibrated (no ``fit``, no checkpoint) is an error.

    Every state change happens outside inference mode, so the Trainer's default ``inference_mode=True``
    works.

    Args:
        plan: the quantization plan (usually ``quantizer="lsq"`` or ``"ste"``).
        freeze_observers_epoch: first epoch with observers (activation ranges) frozen; None: never.
        freeze_bn_epoch: first epoch with BatchNorm statistics frozen; None: never.
        calibration_batches: batches to calibrate on, over all processes (0: the network must come
            calibrated; None: a whole epoch).
        dataloader: calibration batches other than the training data.
        modules: the network's module names in the LightningModule (default: found).

    Its state in a checkpoint (the plan and the freeze epochs) is keyed by the network it quantizes
    (:attr:`state_key`), so two callbacks on two networks of one module keep theirs apart, and a resumed run
    with another plan is refused.

    Example::

        import pytorch_lightning as pl
        from lit_quant import QATCallback, QuantPlan

        qat = QATCallback(QuantPlan.from_bits(4, 8, quantizer="lsq"), freeze_bn_epoch=1, calibration_batches=4)
        trainer = pl.Trainer(max_epochs=2, callbacks=[qat], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False)
        trainer.fit(module, train_loader)   # module: any LightningModule; its network trains quantized
        trainer.test(module, test_loader)
    """

    def __init__(self, plan: QuantPlan, freeze_observers_epoch: int | None = None,
                 freeze_bn_epoch: int | None = None, *, calibration_batches: int | None = CALIBRATION_BATCHES,
                 dataloader: Iterable[Any] | None = None, modules: str | Sequence[str] | None = None) -> None:
        _check_batches(calibration_batches)
        for name, epoch in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
            if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0):
                raise QuantConfigError(f"QATCallback: {name} must be None or an epoch >= 0, got {epoch!r}")
        if not isinstance(plan, QuantPlan):
            raise QuantConfigError(f"QATCallback: plan must be a QuantPlan, got {type(plan).__name__}")
        self.plan = plan
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.calibration_batches = calibration_batches
        self.dataloader = dataloader
        self.modules = modules

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with _outside_inference():
            for name in prepare_network(pl_module, self.plan, qat=True, modules=self.modules):
                module = pl_module.get_submodule(name)
                if any(not bool(fq.qparams_valid) for _, fq in iter_quantizers(module, "weight")):
                    # Weight qparams from the weights as calibration will compute them: a per-channel LSQ
                    # step size takes its shape (a new parameter) now, before the optimizer holds the old one.
                    start_calibration(module)
                    update_qparams(module, kind="weight")
                set_step_qparams(module, True)
        if stage == "fit":
            # Lightning (2.2+) keeps each module's train / eval mode at the start of fit, and the fp32 model
            # arrives in eval mode (a loaded checkpoint): without this, BatchNorm would fold running statistics
            # for the whole run and the --freeze-bn-epoch schedule would do nothing.
            pl_module.train()

    def _observing(self, epoch: int) -> bool:
        return not frozen_at(epoch, self.freeze_observers_epoch)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        enable_observer(pl_module, self._observing(epoch))
        freeze_bn_stats(pl_module, frozen_at(epoch, self.freeze_bn_epoch))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = uncalibrated(pl_module)
        if missing and self.calibration_batches == 0:
            raise CalibrationError(f"QAT needs calibrated quantizers ({len(missing)} have no qparams, e.g. "
                                   f"{missing[0]}): give calibration_batches > 0, or run trainer.predict with "
                                   "PTQCalibration first")
        if missing and self.dataloader is not None:
            calibrate_from(trainer, pl_module, self.dataloader, self.calibration_batches, shard=True)
        elif missing:
            loader = trainer.train_dataloader
            if isinstance(loader, (Mapping, list, tuple)):  # Lightning's several training loaders
                raise QuantConfigError("QATCallback: fit has several training loaders; pass the calibration "
                                       "batches with QATCallback(plan, dataloader=...)")
            calibrate_from(trainer, pl_module, loader, self.calibration_batches, shard=False)
        enable_fake_quant(pl_module, True)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._observing(trainer.current_epoch):
            with stop_when_non_finite(trainer):
                sync_observers(pl_module, kind="act")
                update_qparams(pl_module, kind="act")

    def _to_eval_state(self, pl_module: pl.LightningModule) -> None:
        # The last optimizer step moved the weights after their qparams were computed: refresh them, so
        # evaluation and the checkpoint saved after it use the qparams of the weights they hold.
        with _outside_inference(), stop_when_non_finite(pl_module._trainer):
            refresh_weight_qparams(pl_module)
            enable_observer(pl_module, False)
            enable_fake_quant(pl_module, True)

    def _to_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluation state, or float before the first calibration (the sanity check ahead of training)."""
        if not uncalibrated(pl_module):
            self._to_eval_state(pl_module)
        elif trainer.state.fn == TrainerFn.FITTING:
            with _outside_inference():  # no qparams until training starts: the sanity check runs in float
                enable_observer(pl_module, False)
                enable_fake_quant(pl_module, False)
        else:
            raise CalibrationError("QATCallback: the network has no qparams to evaluate with; fit it with this "
                                   "callback first, or restore a QAT checkpoint (ckpt_path=...)")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with stop_when_non_finite(trainer):
            refresh_weight_qparams(pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval_state(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_evaluation(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            with _outside_inference():
                self._apply_schedule(trainer, pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_evaluation(trainer, pl_module)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "freeze_observers_epoch": self.freeze_observers_epoch,
                "freeze_bn_epoch": self.freeze_bn_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if QuantPlan.from_dict(state_dict["plan"]) != self.plan:
            raise QuantConfigError("the checkpoint was trained with another quantization plan than this run's")
        self.freeze_observers_epoch = state_dict["freeze_observers_epoch"]
        self.freeze_bn_epoch = state_dict["freeze_bn_epoch"]
