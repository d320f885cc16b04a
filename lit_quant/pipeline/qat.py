"""Our quantization-aware training: the fine-tuning recipe (shared with torch.ao's QAT row, so the two
differ in quantization alone), ``--resume`` and the QAT row."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from lit_quant.callbacks import PTQCalibration, QATCallback
from lit_quant.classifier import LitClassifier
from lit_quant.config import TrainConfig
from lit_quant.errors import UserError
from lit_quant.pipeline.config import QuantizeConfig
from lit_quant.pipeline.context import RunContext, show_progress
from lit_quant.pipeline.ptq import build_plan, overrides_note
from lit_quant.pipeline.rows import Row
from lit_quant.quant import QuantPlan, prepare
from lit_quant.training import build_trainer, prepare_output_dir, read_checkpoint


@dataclass
class QATResult:
    """What :func:`run_qat` hands back: the trained quantized model (eval mode), its plan, its folder."""

    model: torch.nn.Module
    plan: QuantPlan
    run_dir: Path
    calib_s: float | None
    fit_s: float


def recipe_note(cfg: QuantizeConfig) -> str:
    """How a QAT row was trained beyond plain fine-tuning, for its note: '' without --distill / --warmup-epochs."""
    note = f", distilled from fp32 w={cfg.distill_weight:g} T={cfg.distill_temperature:g}" if cfg.distill else ""
    return note + (f", lr warm-up {cfg.warmup_epochs:g} epochs" if cfg.warmup_epochs else "")


def sync_bn(cfg: QuantizeConfig) -> bool:
    """SyncBatchNorm on CUDA (torch's SyncBatchNorm has no CPU kernels). On CPU, DDP's buffer broadcast
    gives every rank rank 0's running statistics at each forward; batch statistics stay per rank."""
    return cfg.accelerator != "cpu" and torch.cuda.is_available()


def qat_train_config(cfg: QuantizeConfig, arch: dict[str, Any]) -> TrainConfig:
    """The Trainer settings of a QAT run (hardware, precision, epochs) as a :class:`TrainConfig`."""
    return TrainConfig(data=arch["data"], model=arch["model"], batch_size=cfg.batch_size, epochs=cfg.epochs,
                       seed=cfg.seed, deterministic=cfg.deterministic, accelerator=cfg.accelerator,
                       devices=cfg.devices, gpus=cfg.gpus, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                       precision=cfg.precision, opt_level=cfg.opt_level, progress=show_progress(cfg),
                       log_every_n_steps=1)


def qat_classifier(cfg: QuantizeConfig, classifier: LitClassifier, model: torch.nn.Module) -> LitClassifier:
    """A LitClassifier for fine-tuning ``model``: the fp32 run's optimiser settings, ``--lr`` (default 1/100
    of the fp32 peak rate) with cosine decay over ``--epochs`` after ``--warmup-epochs``; with ``--distill``
    a frozen copy of the fp32 model is the teacher (ours and torch.ao's QAT get the same loss, so their rows
    differ in quantization alone)."""
    hp = classifier.hparams
    teacher = copy.deepcopy(classifier.model) if cfg.distill else None
    return LitClassifier(model, hp.arch["num_classes"], arch=hp.arch, optimizer=hp.optimizer,
                         lr=cfg.lr if cfg.lr is not None else hp.lr / 100.0, momentum=hp.momentum,
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
    ckpt = read_checkpoint(path)
    if not any("QATCallback" in str(key) for key in ckpt.get("callbacks", {})):
        raise UserError(f"--resume {path}: not a QAT checkpoint (no QAT state; it was written by train.py or "
                        "another mode); resume QAT from quantize.py --mode qat's qat-w<W>a<A>/last.ckpt")
    return path


def run_qat(cfg: QuantizeConfig, classifier: LitClassifier, arch: dict[str, Any], dm: Any,
            run_dir: Path) -> QATResult:
    """Quantization-aware fine-tuning of the fp32 model with our quantizers, through the Lightning Trainer.

    Calibrates first (``predict`` with :class:`PTQCalibration`: the same initial qparams as PTQ), then
    ``fit`` with :class:`QATCallback` for ``--epochs``; ``last.ckpt`` under ``<run>/qat-w<W>a<A>/`` is written
    every epoch and ``--resume`` continues from it (plan, qparams, LSQ scales, freeze state, optimiser,
    schedule and RNG state restored by Lightning; the callback re-prepares the model before the load).
    """
    plan = build_plan(cfg, qat=True)
    qat_dir = qat_dir_for(run_dir, plan)
    resume = find_qat_resume(cfg, qat_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    callback = QATCallback(plan, cfg.freeze_observers_epoch, cfg.freeze_bn_epoch)
    last_cb = ModelCheckpoint(dirpath=str(qat_dir), filename="last", save_top_k=1, enable_version_counter=False)
    train_cfg = qat_train_config(cfg, arch)
    # inference_mode=False: quantizer buffers replaced during calibration or validation (a per-channel scale
    # taking its shape, an observer reset) would otherwise be inference tensors that training cannot update.
    trainer = build_trainer(train_cfg, qat_dir, callbacks=[PTQCalibration(), callback, last_cb],
                            sync_batchnorm=sync_bn(cfg), inference_mode=False)
    prepare_output_dir(qat_dir, "the QAT run folder")
    calib_s = None
    if resume is None:  # a fresh run starts from calibrated qparams; a resumed one loads them
        lit = qat_classifier(cfg, classifier, prepare(classifier.model, plan, qat=True))
        start = time.perf_counter()
        trainer.predict(lit, datamodule=dm, return_predictions=False)
        calib_s = time.perf_counter() - start
    else:
        lit = qat_classifier(cfg, classifier, copy.deepcopy(classifier.model))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(lit, datamodule=dm, ckpt_path=str(resume) if resume else None)
    return QATResult(lit.model.eval(), plan, qat_dir, calib_s, time.perf_counter() - start)


def qat_row(ctx: RunContext, qat: QATResult) -> tuple[Row, torch.Tensor]:
    """The report row of our QAT result and its per-image outcomes."""
    cfg = ctx.cfg
    return ctx.evaluate(
        "qat", qat.model, real=False, backend="fake-quant", weight_bits=qat.plan.weight.bits,
        act_bits=qat.plan.act.bits, observer=qat.plan.act.observer, calib_s=qat.calib_s,
        note=f"our QAT ({cfg.qat_method}{recipe_note(cfg)}), {cfg.epochs} epochs in {qat.fit_s:.0f} s; "
             "fake-quant simulation" + overrides_note(qat.plan))
