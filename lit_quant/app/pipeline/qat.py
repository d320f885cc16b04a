"""Our quantization-aware training: the fine-tuning recipe (shared with torch.ao's QAT row, so the two
differ in quantization alone), ``--resume`` and the QAT row."""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lit_quant.callbacks import PTQCalibration, QATCallback
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.config import TrainConfig
from lit_quant.errors import UserError
from lit_quant.io import atomic_write
from lit_quant.app.pipeline.config import QuantizeConfig
from lit_quant.app.pipeline.context import RunContext, show_progress
from lit_quant.app.pipeline.ptq import build_plan, layerwise_steps, logits_cost_note, overrides_note
from lit_quant.app.pipeline.rows import Row
from lit_quant.quant import QuantPlan, prepare
from lit_quant.app.training import (
    Arch,
    BestCheckpoint,
    build_trainer,
    output_dir_lock,
    prepare_output_dir,
    read_checkpoint,
)


@dataclass
class QATResult:
    """What :func:`run_qat` hands back: the kept quantized model (eval mode), its plan, its folder, and which
    epoch it is (0: the calibrated model before any training) with its validation top-1."""

    model: torch.nn.Module
    plan: QuantPlan
    run_dir: Path
    calib_s: float | None
    fit_s: float
    epoch: int
    val_top1: float


def recipe_note(cfg: QuantizeConfig) -> str:
    """How a QAT row was trained beyond plain fine-tuning, for its note: '' without --distill / --warmup-epochs."""
    note = f", distilled from fp32 w={cfg.distill_weight:g} T={cfg.distill_temperature:g}" if cfg.distill else ""
    return note + (f", lr warm-up {cfg.warmup_epochs:g} epochs" if cfg.warmup_epochs else "")


def default_lr(cfg: QuantizeConfig, fp32_lr: float) -> float:
    """``--lr``, else the recipe's fraction of the fp32 run's peak rate (1/100 outside a recipe)."""
    if cfg.lr is not None:
        return cfg.lr
    recipe = cfg.recipe
    return fp32_lr * (recipe.lr_factor if recipe is not None else 0.01)


def sync_bn(cfg: QuantizeConfig) -> bool:
    """SyncBatchNorm on CUDA (torch's SyncBatchNorm has no CPU kernels). On CPU, DDP's buffer broadcast
    gives every rank rank 0's running statistics at each forward; batch statistics stay per rank."""
    return cfg.hardware.accelerator != "cpu" and torch.cuda.is_available()


def qat_train_config(cfg: QuantizeConfig, arch: Arch) -> TrainConfig:
    """The Trainer settings of a QAT run (hardware, precision, epochs) as a :class:`TrainConfig`."""
    return TrainConfig(hardware=cfg.hardware, data=arch.data, model=arch.model, batch_size=cfg.batch_size,
                       epochs=cfg.epochs, seed=cfg.seed, progress=show_progress(cfg), log_every_n_steps=1)


def qat_classifier(cfg: QuantizeConfig, classifier: LitClassifier, model: torch.nn.Module) -> LitClassifier:
    """A LitClassifier for fine-tuning ``model``: the fp32 run's optimiser settings, ``--lr`` (default
    :func:`default_lr`) with cosine decay over ``--epochs`` after ``--warmup-epochs``; with ``--distill``
    a frozen copy of the fp32 model is the teacher (ours and torch.ao's QAT get the same loss, so their rows
    differ in quantization alone)."""
    hp = classifier.hparams
    teacher = copy.deepcopy(classifier.model) if cfg.distill else None
    return LitClassifier(model, hp.arch["num_classes"], arch=hp.arch, optimizer=hp.optimizer,
                         lr=default_lr(cfg, hp.lr), momentum=hp.momentum,
                         nesterov=hp.nesterov, weight_decay=hp.weight_decay, scheduler="cosine",
                         label_smoothing=hp.label_smoothing, teacher=teacher, distill_weight=cfg.distill_weight,
                         distill_temperature=cfg.distill_temperature, warmup_epochs=cfg.warmup_epochs)


def qat_dir_for(run_dir: Path, plan: QuantPlan) -> Path:
    """``<run>/qat-w<W>a<A>``: a QAT run's Lightning checkpoints and logs."""
    return run_dir / f"qat-w{plan.weight.bits}a{plan.act.bits}"


def find_qat_resume(cfg: QuantizeConfig, qat_dir: Path) -> Path | None:
    """``--resume last`` / a path, checked to be a QAT checkpoint of this plan's run; None without --resume."""
    if cfg.resume is None:
        return None
    path = qat_dir / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
    read_checkpoint(path, qat=True)
    return path


#: The calibrated model a QAT run starts from, and its validation top-1: epoch 0 of the best-epoch choice.
START_FILE = "start.pt"


def run_qat(cfg: QuantizeConfig, classifier: LitClassifier, arch: Arch, dm: Any,
            run_dir: Path) -> QATResult:
    """Quantization-aware fine-tuning of the fp32 model with our quantizers, through the Lightning Trainer,
    keeping the epoch with the best validation top-1.

    Calibrates first (``predict`` with :class:`PTQCalibration`: the same initial qparams as PTQ, then the
    same GPTQ rounding and bias correction as the PTQ row when they are on) and validates that model: it is
    epoch 0, saved with its validation top-1 as ``start.pt``. Then ``fit`` with :class:`QATCallback` for
    ``--epochs``, validating after each; ``best.ckpt`` holds the epoch with the highest validation top-1
    (on ties the lowest validation loss, as train.py's ``best.ckpt``), ``last.ckpt`` the latest, under
    ``<run>/qat-w<W>a<A>/``, which no other run may write meanwhile (:func:`output_dir_lock`), and
    ``--resume`` continues from ``last.ckpt`` (plan, qparams, LSQ scales, freeze state, optimiser, schedule, RNG state
    and the best epoch so far restored by Lightning; the callback re-prepares the model before the load).
    The result is the best epoch's model, or the calibrated one where no epoch beat it: QAT never ends below
    its own starting point on validation.
    """
    plan = build_plan(cfg, qat=True)
    qat_dir = qat_dir_for(run_dir, plan)
    resume = find_qat_resume(cfg, qat_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callback = QATCallback(plan, cfg.freeze_observers_epoch, cfg.freeze_bn_epoch)
    last_cb = ModelCheckpoint(dirpath=str(qat_dir), filename="last", save_top_k=1, enable_version_counter=False)
    best_cb = BestCheckpoint(dirpath=str(qat_dir), filename="best", monitor="val/top1", tie_break="val/loss",
                             auto_insert_metric_name=False, enable_version_counter=False)
    train_cfg = qat_train_config(cfg, arch)
    # best_cb before last_cb: last.ckpt then holds the best-epoch state with this epoch counted, so a resumed
    # run chooses among the same epochs as an uninterrupted one.
    # inference_mode=False: quantizer buffers replaced during calibration or validation (a per-channel scale
    # taking its shape, an observer reset) would otherwise be inference tensors that training cannot update.
    trainer = build_trainer(train_cfg, qat_dir, callbacks=[PTQCalibration(), callback, best_cb, last_cb],
                            sync_batchnorm=sync_bn(cfg), inference_mode=False)
    prepare_output_dir(qat_dir, "the QAT run folder")
    with output_dir_lock(qat_dir, "the QAT run folder"):
        calib_s = None
        start_file = qat_dir / START_FILE
        if resume is None:  # a fresh run starts from calibrated qparams; a resumed one loads them
            lit = qat_classifier(cfg, classifier, prepare(classifier.model, plan, qat=True))
            start = time.perf_counter()
            trainer.predict(lit, datamodule=dm, return_predictions=False)
            layerwise_steps(cfg, lit.model, dm)  # the PTQ row's GPTQ / bias correction, on its calibration set
            calib_s = time.perf_counter() - start
            metrics = trainer.validate(lit, datamodule=dm, verbose=False)[0]
            if trainer.is_global_zero:
                start_state = {"state_dict": lit.state_dict(), "val_top1": float(metrics["val/top1"]),
                               "val_loss": float(metrics["val/loss"])}
                atomic_write(start_file, lambda fh: torch.save(start_state, fh))
            trainer.strategy.barrier()
        else:
            lit = qat_classifier(cfg, classifier, copy.deepcopy(classifier.model))
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(lit, datamodule=dm, ckpt_path=str(resume) if resume else None)
        fit_s = time.perf_counter() - start
        epoch, val_top1 = keep_best_epoch(lit, best_cb, start_file)
    return QATResult(lit.model.eval(), plan, qat_dir, calib_s, fit_s, epoch, val_top1)


def keep_best_epoch(lit: LitClassifier, best_cb: BestCheckpoint, start_file: Path) -> tuple[int, float]:
    """Load into ``lit`` the best epoch's weights and qparams, or the calibrated start's when no epoch beats
    it: a higher validation top-1, or the same at a lower validation loss; returns ``(epoch, validation
    top-1)``, epochs counted from 1 (0: the start)."""
    if not start_file.is_file():
        raise UserError(f"{start_file} is missing: the QAT run's calibrated start; run without --resume")
    start = torch.load(start_file, map_location=lit.device, weights_only=True)
    best = best_cb.best_model_score
    start_key = (float(start["val_top1"]), -float(start.get("val_loss", math.inf)))
    best_loss = best_cb.best_tie_break
    if best is not None and best_cb.best_model_path and \
            (float(best), -math.inf if best_loss is None else -best_loss) > start_key:
        ckpt = read_checkpoint(best_cb.best_model_path, qat=True)
        lit.load_state_dict(ckpt["state_dict"])
        return int(ckpt["epoch"]) + 1, 100.0 * float(best)
    lit.load_state_dict(start["state_dict"])
    return 0, 100.0 * float(start["val_top1"])


def qat_row(ctx: RunContext, qat: QATResult) -> tuple[Row, torch.Tensor]:
    """The report row of our QAT result and its per-image outcomes."""
    cfg = ctx.cfg
    row, correct = ctx.evaluate(
        "qat", qat.model, real=False, backend="fake-quant", weight_bits=qat.plan.weight.bits,
        act_bits=qat.plan.act.bits, observer=qat.plan.act.observer, calib_s=qat.calib_s,
        note=f"our QAT ({cfg.qat_method}{recipe_note(cfg)}), {cfg.epochs} epochs in {qat.fit_s:.0f} s, kept epoch "
             f"{qat.epoch} (best validation top-1 {qat.val_top1:.2f}; 0 = the calibrated start); "
             + (f"{cfg.recipe.describe(min(cfg.weight_bits, cfg.act_bits))} (flags given override it"
                + ("; --plan sets widths and ranges" if cfg.plan else "") + "); "
                if cfg.recipe is not None and cfg.from_recipe else "")
             + "fake-quant simulation" + overrides_note(qat.model))
    row.note += logits_cost_note(ctx, qat.model, row)
    return row, correct
