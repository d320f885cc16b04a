"""A user's own LightningModule (``BackboneHeadModule`` of tests/test_user_project.py) quantized by one
callback each through a real Trainer, as a script (DDP's launcher re-runs the script in each process).

    python tests/user_project_script.py OUT_DIR DEVICES

Each rank saves to ``OUT_DIR/rank<r>.pt`` the qparams QAT trained its first step with (right after
calibrating on the first training batches) and the qparams of PTQ calibrated on an explicit data loader.
Not a test module itself (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from test_user_project import BackboneHeadModule, _loader

from lit_quant import PTQCalibration, QATCallback, QuantPlan, model_qparams


class FirstStep(pl.Callback):
    """The qparams of the first training step."""

    def __init__(self) -> None:
        self.qparams: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.qparams:
            self.qparams = {f"{k}.{n}": getattr(v, n).clone() for k, v in model_qparams(pl_module).items()
                            for n in ("scale", "zero_point")}


def run(out: Path, devices: int) -> dict[str, dict[str, torch.Tensor]]:
    """QAT (calibrate, two steps per process; a conv bias before BatchNorm, which DDP requires to be used)
    and PTQ (four calibration batches in all), on ``devices``."""
    settings = {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False}
    pl.seed_everything(0, verbose=False)
    first = FirstStep()
    pl.Trainer(max_epochs=1, limit_train_batches=2, callbacks=[QATCallback(QuantPlan.from_bits(4, 4)), first],
               **settings).fit(BackboneHeadModule(conv_bias=True), _loader(128, 0))
    pl.seed_everything(1, verbose=False)
    net = BackboneHeadModule()
    trainer = pl.Trainer(callbacks=[PTQCalibration(QuantPlan.from_bits(8, 8, act_observer="mse"),
                                                   dataloader=_loader(128, 0), calibration_batches=4)], **settings)
    trainer.test(net, _loader(32, 2), verbose=False)
    ptq = {f"{k}.{n}": getattr(v, n).clone() for k, v in model_qparams(net).items() for n in ("scale", "zero_point")}
    result = {"qat": first.qparams, "ptq": ptq}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    return result


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
