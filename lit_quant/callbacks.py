"""Lightning callbacks that drive the quantization core (:mod:`lit_quant.quant`) from a Trainer.

The hooks only flip the quantizers' switches and call the core; they never patch ``forward`` or add
attributes to the user's model (why Lightning removed its own QAT callback, Lightning-AI#16750).
"""

from __future__ import annotations

import pytorch_lightning as pl

from lit_quant.quant import finish_calibration, iter_quantizers, start_calibration
from lit_quant.quant.spec import CalibrationError


class PTQCalibration(pl.Callback):
    """Post-training calibration during ``trainer.predict`` over the calibration batches.

    ``on_predict_start``: observers on, fake quant off, so the passes record statistics of the float
    model's tensors. ``on_predict_end``: observer statistics are merged across DDP ranks (every rank then
    computes the same qparams as one process on all the data), qparams computed, observers off and fake
    quant on: the module is ready for ``trainer.validate`` / ``trainer.test``.

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
        start_calibration(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        finish_calibration(pl_module)
        self._calibrated = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning skips the whole predict loop, hooks included, when the dataloader is empty: without this
        # check an empty calibration set would leave the model silently uncalibrated.
        if stage == "predict" and not self._calibrated:
            raise CalibrationError("PTQ calibration saw no batches: the calibration set is empty")
