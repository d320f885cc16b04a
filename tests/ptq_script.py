"""PTQ calibration through a real Trainer, as a script (DDP's launcher re-runs the script in each process).

    python tests/ptq_script.py OUT_DIR DEVICES OBSERVER

Each rank saves its qparams to ``OUT_DIR/rank<r>.pt``; rank 0 also saves the test metrics to
``OUT_DIR/metrics.pt``. Not a test module itself (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from lit_quant.callbacks import PTQCalibration
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.data import ClassificationDataModule
from lit_quant.app.models import build_model
from lit_quant.quant import QuantPlan, model_qparams, prepare


def run(out: Path, devices: int, observer: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Calibrate a seeded ResNet-20 on 5 batches of fake data with ``devices`` CPU processes, then test."""
    pl.seed_everything(0, verbose=False)
    dm = ClassificationDataModule("fake", image_size=8, batch_size=16, fake_size=128)
    dm.calib_batches = 5
    lit = LitClassifier(prepare(build_model("resnet20", 3, 10).eval(), QuantPlan.from_bits(8, 8, act_observer=observer)), 10)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[PTQCalibration()])
    trainer.predict(lit, datamodule=dm, return_predictions=False)
    qparams = {k: (v.scale.clone(), v.zero_point.clone()) for k, v in model_qparams(lit).items()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(qparams, out / f"rank{trainer.global_rank}.pt")
    metrics = trainer.test(lit, datamodule=dm, verbose=False)[0]
    if trainer.is_global_zero:
        torch.save(metrics, out / "metrics.pt")
    return qparams


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
