"""QAT through a real Trainer, as a script (DDP's launcher re-runs the script in each process).

    python tests/qat_script.py OUT_DIR DEVICES METHOD

Each rank saves the qparams it used at every training step to ``OUT_DIR/rank<r>.pt``. Not a test module
itself (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_quant.callbacks import PTQCalibration, QATCallback
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.data import ClassificationDataModule
from lit_quant.app.models import build_model
from lit_quant.quant import QuantPlan, iter_quantizers, prepare


class RecordQParams(pl.Callback):
    """The scale and zero point of every quantizer at the start of every training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.steps.append({f"{n}.{k}": getattr(fq, k).detach().clone() for n, fq in iter_quantizers(pl_module)
                           if fq.kind == "act" for k in ("scale", "zero_point")})


def run(out: Path, devices: int, method: str) -> list[dict[str, torch.Tensor]]:
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=128)
    dm.calib_batches = 2
    plan = QuantPlan.from_bits(4, 4, act_observer="ema", quantizer=method)
    lit = LitClassifier(prepare(build_model("resnet20", 3, 10), plan, qat=True), 10, lr=0.01)
    record = RecordQParams()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         enable_checkpointing=False, max_epochs=2, inference_mode=False,
                         callbacks=[PTQCalibration(), QATCallback(plan), record])
    trainer.predict(lit, datamodule=dm, return_predictions=False)
    trainer.fit(lit, datamodule=dm)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record.steps, out / f"rank{trainer.global_rank}.pt")
    return record.steps


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
