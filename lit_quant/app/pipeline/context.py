"""What every part of a quantize run shares: the Trainer that calibrates and evaluates, the data, the fp32
model and where files go (:class:`RunContext`), and :meth:`RunContext.evaluate`, which turns a model into a
report :class:`~lit_quant.app.pipeline.rows.Row`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import RichProgressBar

from lit_quant.callbacks import PTQCalibration
from lit_quant.app.classifier import LitClassifier
from lit_quant.errors import UserError
from lit_quant.io import publish
from lit_quant.app.measure import latency_ms, model_size_bytes
from lit_quant.app.pipeline.config import QuantizeConfig
from lit_quant.app.pipeline.rows import Row
from lit_quant.app.training import Arch, hardware_settings


def show_progress(cfg: QuantizeConfig) -> bool:
    """``--progress`` / ``--no-progress``, else bars only when a person is watching (stderr is a terminal)."""
    return sys.stderr.isatty() if cfg.progress is None else cfg.progress


def build_eval_trainer(cfg: QuantizeConfig | None = None) -> pl.Trainer:
    """The one Trainer of a run: calibration (``predict`` + :class:`PTQCalibration`) and every evaluation.

    ``use_distributed_sampler=False``: the data module shards evaluation without padding (see its loaders).
    """
    cfg = cfg or QuantizeConfig()
    callbacks: list[pl.Callback] = [PTQCalibration()]
    progress = show_progress(cfg)
    if progress:
        callbacks.append(RichProgressBar())
    try:
        return pl.Trainer(**hardware_settings(cfg.hardware), logger=False, enable_progress_bar=progress,
                          enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks)
    except (MisconfigurationException, ValueError) as exc:
        raise UserError(f"invalid trainer settings: {exc}") from exc


def evaluate_on_test(trainer: pl.Trainer, model: torch.nn.Module, num_classes: int,
                  dm: Any) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1 / top-5 (percent) on the test split, and the per-image top-1 outcomes (bool) for paired tests."""
    lit = LitClassifier(model, num_classes)
    result = trainer.test(lit, datamodule=dm, verbose=False)[0]
    assert lit.test_correct is not None
    return {"top1": 100.0 * result["test/top1"], "top5": 100.0 * result.get("test/top5", float("nan"))}, \
        lit.test_correct


def file_size(path: Path) -> int | None:
    """Bytes of ``path``; None when it was not written (another rank's file)."""
    return path.stat().st_size if path.is_file() else None


@dataclass
class RunContext:
    """The shared state of one quantize run.

    ``out_dir`` is this run's own report folder ``<run>/quantize/<name>/``: its report, quantized checkpoints
    and deploy files; ``run_dir`` is the fp32 checkpoint's run folder, where the newest of each is published
    (:meth:`publish`).
    """

    cfg: QuantizeConfig
    classifier: LitClassifier
    arch: Arch
    data_settings: dict[str, Any]  # what rebuilds the test split (saved in quantized checkpoints)
    source: dict[str, Any]  # model, data set and fp32 weights fingerprint
    dm: Any
    example: torch.Tensor  # the first test batch: latency input, ONNX trace, --explain
    trainer: pl.Trainer
    run_dir: Path
    out_dir: Path

    def publish(self, name: str) -> None:
        """Make ``<run>/<name>`` the newest of this run's ``<out_dir>/<name>`` (rank 0; atomic, so runs
        finishing at once each keep their own file and the newest name is one of them whole)."""
        if self.is_global_zero:
            publish(self.out_dir / name, self.run_dir / name)

    @property
    def float_model(self) -> torch.nn.Module:
        return self.classifier.model

    @property
    def num_classes(self) -> int:
        return self.arch.num_classes

    @property
    def is_global_zero(self) -> bool:
        return bool(self.trainer.is_global_zero)

    def evaluate(self, variant: str, model: torch.nn.Module, real: bool = True, size: int | None = None,
                 timed: bool = True, **info: Any) -> tuple[Row, torch.Tensor]:
        """Evaluate ``model`` into a report row and its per-image outcomes; size and latency only for a
        ``real`` model (a fake-quant simulation stores and runs floats, so its size and speed would say
        nothing about integers). ``size``: bytes of the file the model ships as (default: its state dict);
        ``timed``: measure latency."""
        # every rank evaluates its shard (metrics are reduced over ranks); only rank 0 times the model, so
        # the processes do not slow each other's clocks
        metrics, correct = evaluate_on_test(self.trainer, model, self.num_classes, self.dm)
        row = Row(variant=variant, **info, **metrics, size_bytes=(size or model_size_bytes(model)) if real else None)
        if real and timed and self.cfg.latency and self.is_global_zero:
            row.latency_ms_bs1, row.latency_ms_bs64 = self._latency(model)
        return row, correct

    def _latency(self, model: torch.nn.Module) -> tuple[float, float]:
        """Milliseconds per forward at batch 1 and 64, on one thread."""
        example = self.example
        # real test images where the batch holds 64, else the first image repeated
        batch64 = example[:64] if len(example) >= 64 else example[:1].expand(64, *example.shape[1:]).contiguous()
        # One thread: 2-thread timings on a shared 2-core machine measure the other jobs (see measure.py).
        return latency_ms(model, example[:1], threads=1), latency_ms(model, batch64, threads=1)
