"""Lightning callbacks that drive the quantization core (:mod:`lit_quant.quant`) from a Trainer.

The hooks only flip the quantizers' switches and call the core; they never patch ``forward`` or add
attributes to the user's model (why Lightning removed its own QAT callback, Lightning-AI#16750).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn

from lit_quant.quant import (
    QuantizedModel,
    QuantPlan,
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
from lit_quant.quant.errors import CalibrationError, QuantConfigError
from lit_quant.quant.fake_quant import set_step_qparams
from lit_quant.quant.layers import freeze_bn_stats, refresh_weight_qparams
from lit_quant.torchao_ref import builtin_qat_switches


class PTQCalibration(pl.Callback):
    """Post-training calibration during ``trainer.predict`` over the calibration batches.

    ``on_predict_start``: observers on, fake quant off, so the passes record statistics of the float
    model's tensors. Each batch is observed as global batch ``batch_idx * world_size + global_rank``
    (:func:`lit_quant.quant.set_batch_index`). ``on_predict_end``: observer statistics are merged across DDP
    ranks, qparams computed, observers off and fake quant on: the module is ready for ``trainer.validate`` /
    ``trainer.test``.

    When rank ``r`` gets batches ``r, r + W, r + 2W, ...`` of one process's batching, as the data module's
    ``predict_dataloader`` serves them, every rank computes bit for bit the qparams one process computes on
    all the calibration batches, with every observer (see :mod:`lit_quant.quant.observers`).

    Use ``trainer.predict(module, datamodule=dm, return_predictions=False)``; the data module's
    ``predict_dataloader`` serves the deterministic calibration images.
    """

    def __init__(self) -> None:
        self._calibrated = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            self._calibrated = False

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(True for _ in iter_quantizers(pl_module)):
            raise CalibrationError("PTQ calibration: the model has no quantizers (prepare() it first)")
        set_batch_index(pl_module, None)  # the weights observed here belong to no batch
        start_calibration(pl_module)

    def on_predict_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                               batch_idx: int, dataloader_idx: int = 0) -> None:
        set_batch_index(pl_module, batch_idx * trainer.world_size + trainer.global_rank)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        set_batch_index(pl_module, None)
        finish_calibration(pl_module)
        self._calibrated = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "predict":
            set_batch_index(pl_module, None)  # also after a failed pass: later observations belong to no batch
        # Lightning skips the whole predict loop, hooks included, when the dataloader is empty: without this
        # check an empty calibration set would leave the model silently uncalibrated.
        if stage == "predict" and not self._calibrated:
            raise CalibrationError("PTQ calibration saw no batches: the calibration set is empty")


def _frozen(epoch: int, freeze_epoch: int | None) -> bool:
    """Whether a schedule that freezes at ``freeze_epoch`` (None: never) has frozen by ``epoch``."""
    return freeze_epoch is not None and epoch >= freeze_epoch


class QATCallback(pl.Callback):
    """Quantization-aware training of ``pl_module.model`` with the plan ``plan``.

    * ``setup``: a float ``pl_module.model`` is replaced by ``prepare(model, plan, qat=True)`` (Conv-BN pairs
      fold as they train, see :class:`lit_quant.quant.layers.QuantConvBn2d`). This runs before Lightning
      restores a checkpoint, so ``fit(ckpt_path=...)``, ``test(ckpt_path=...)`` and ``load_from_checkpoint``
      find the quantized structure (qparams, LSQ scales, BN-freeze flags) their state dict was saved from.
      A model prepared with another plan is refused. For ``fit`` the module is put in train mode.
    * training: fake quant on; each epoch, observers run until ``freeze_observers_epoch`` and BatchNorm
      statistics until ``freeze_bn_epoch`` (torchvision's QAT recipe). While observers run, activation
      statistics are merged across DDP ranks after every step and the qparams recomputed from them, so all
      ranks use the same qparams at every step (torch.ao only broadcasts rank 0's buffers). Weights are
      the same on every rank; their qparams follow the current weight.
    * validation / test / end of training: weight qparams refreshed from the current weights, observers off,
      so evaluation data never moves a range; after ``fit`` the model is left in that evaluation state.

    The model must be calibrated first (``trainer.predict`` with :class:`PTQCalibration`), or be restored
    from a QAT checkpoint: training starts from valid qparams on every rank.
    """

    def __init__(self, plan: QuantPlan, freeze_observers_epoch: int | None = None,
                 freeze_bn_epoch: int | None = None) -> None:
        self.plan = plan
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = pl_module.model
        if isinstance(model, QuantizedModel):
            if model.plan != self.plan:
                raise QuantConfigError("the model is already quantized with a different plan; start QAT from the "
                                       "fp32 checkpoint or use the plan it was quantized with")
        else:
            pl_module.model = prepare(model, self.plan, qat=True)
        set_step_qparams(pl_module.model, True)
        if stage == "fit":
            # Lightning (2.2+) keeps each module's train / eval mode at the start of fit, and the fp32 model
            # arrives in eval mode (a loaded checkpoint): without this, BatchNorm would fold running statistics
            # for the whole run and the --freeze-bn-epoch schedule would do nothing.
            pl_module.train()

    def _observing(self, epoch: int) -> bool:
        return not _frozen(epoch, self.freeze_observers_epoch)

    def _apply_schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        enable_observer(pl_module, self._observing(epoch))
        freeze_bn_stats(pl_module, _frozen(epoch, self.freeze_bn_epoch))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        missing = [n for n, fq in iter_quantizers(pl_module) if not bool(fq.qparams_valid) and fq.kind == "act"]
        if missing:
            raise CalibrationError(f"QAT needs calibrated quantizers ({len(missing)} have no qparams, e.g. "
                                   f"{missing[0]}): run trainer.predict with PTQCalibration first")
        enable_fake_quant(pl_module, True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_schedule(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._observing(trainer.current_epoch):
            sync_observers(pl_module, kind="act")
            update_qparams(pl_module, kind="act")

    def _to_eval_state(self, pl_module: pl.LightningModule) -> None:
        # The last optimizer step moved the weights after their qparams were computed: refresh them, so
        # evaluation and the checkpoint saved after it use the qparams of the weights they hold.
        refresh_weight_qparams(pl_module)
        enable_observer(pl_module, False)
        enable_fake_quant(pl_module, True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refresh_weight_qparams(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval_state(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval_state(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._apply_schedule(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._to_eval_state(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "freeze_observers_epoch": self.freeze_observers_epoch,
                "freeze_bn_epoch": self.freeze_bn_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if QuantPlan.from_dict(state_dict["plan"]) != self.plan:
            raise QuantConfigError("the checkpoint was trained with another quantization plan than this run's")
        self.freeze_observers_epoch = state_dict["freeze_observers_epoch"]
        self.freeze_bn_epoch = state_dict["freeze_bn_epoch"]


class BuiltinQATSchedule(pl.Callback):
    """The :class:`QATCallback` schedule for torch.ao's QAT model (``builtin_qat_prepare``), so the two QAT
    rows of a report follow the same recipe: observers run until ``freeze_observers_epoch`` and BatchNorm
    statistics update until ``freeze_bn_epoch`` (None: never), as torchvision's QAT reference script does
    to its torch.ao model. Observers are off during validation, as in ours: torch.ao's fake-quantize modules
    observe whenever their observer is enabled, eval mode included, so validation batches would otherwise
    move the ranges the model is trained and converted with."""

    def __init__(self, freeze_observers_epoch: int | None = None, freeze_bn_epoch: int | None = None) -> None:
        self.freeze_observers_epoch = freeze_observers_epoch
        self.freeze_bn_epoch = freeze_bn_epoch

    def _observing(self, trainer: pl.Trainer) -> bool:
        return not _frozen(trainer.current_epoch, self.freeze_observers_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        builtin_qat_switches(pl_module.model, self._observing(trainer),
                             bn_training=not _frozen(trainer.current_epoch, self.freeze_bn_epoch))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        builtin_qat_switches(pl_module.model, observing=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            builtin_qat_switches(pl_module.model, self._observing(trainer))
