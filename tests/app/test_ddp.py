"""DDP on CPU with two gloo processes, through the real script and the real Lightning Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import run_script, tiny_args

from lit_quant.app.config import load_yaml, resolve_config
from lit_quant.app.training import build_datamodule, load_classifier

pytestmark = [pytest.mark.slow, pytest.mark.ddp]


def test_cpu_ddp_two_processes(tmp_path: Path) -> None:
    proc = run_script("train.py", *tiny_args(tmp_path, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                                             "--run-name", "ddp", "--fake-size", "256", "--epochs", "3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "ddp"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 3
    assert metrics["test/top1"] > 30.0  # 10 classes: well above chance after 3 epochs
    assert proc.stdout.count("lit-quant training: ddp") == 1  # one summary, from rank 0 only
    # evaluation over two processes (unpadded sampler) equals a single-process evaluation of the same checkpoint
    cfg = resolve_config(load_yaml(run / "config.yaml"))
    dm = build_datamodule(cfg)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(load_classifier(run / "best.ckpt"), datamodule=dm, verbose=False)[0]
    assert 100 * single["test/top1"] == pytest.approx(metrics["test/top1"], abs=1e-4)
    assert single["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)
