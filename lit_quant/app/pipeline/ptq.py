"""Our post-training quantization rows: the plan behind the flags, calibration (or a stats file instead of
it) and one fake-quant row per point of a run (one width, or every width x observer of a sweep)."""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lit_quant.app.classifier import LitClassifier
from lit_quant.app.pipeline.checkpoint import reusable_ptq
from lit_quant.app.pipeline.config import LOGITS_COST, QuantizeConfig
from lit_quant.app.pipeline.context import RunContext, evaluate_on_test
from lit_quant.app.pipeline.rows import Row
from lit_quant.app.recipes import ptq_recipe
from lit_quant.io import atomic_write_text
from lit_quant.quant import QuantPlan, dump_stats, enable_fake_quant, enable_observer, load_stats, prepare
from lit_quant.quant.equalize import equalize
from lit_quant.quant.layerwise import LayerwiseResult, layerwise_ptq, weight_rounding
from lit_quant.quant.preparation import QuantizedModel, logits_quantizer


def build_plan(cfg: QuantizeConfig, bits: int | None = None, observer: str | None = None,
               qat: bool = False) -> QuantPlan:
    """``--plan`` YAML, else the plan behind the bit / scheme / observer flags (``bits`` / ``observer``
    override them for one point of a sweep). ``qat``: quantizers of ``--qat-method`` (a plan's too); PTQ rows
    use plain fake quantization (STE), so a QAT report's PTQ row is the usual PTQ baseline."""
    if cfg.plan is not None:
        plan = QuantPlan.from_yaml(cfg.plan)
        if not qat:
            return plan
        # QAT trains the plan's widths with the quantizer of --qat-method (or the recipe's); ranges start from
        # the plan's observers
        return dataclasses.replace(plan, weight=plan.weight.replace(quantizer=cfg.qat_method),
                                   act=plan.act.replace(quantizer=cfg.qat_method))
    return QuantPlan.from_bits(bits or cfg.weight_bits, bits or cfg.act_bits, weight_scheme=cfg.weight_scheme,
                               act_scheme=cfg.act_scheme, weight_observer=cfg.weight_observer,
                               act_observer=observer or cfg.act_observer, per_channel=cfg.per_channel,
                               first_last_bits=cfg.first_last_bits, io_bits=cfg.io_bits,
                               depthwise_bits=cfg.depthwise_bits, skip=cfg.no_quant_layers,
                               quantizer=cfg.qat_method if qat else "ste",
                               observer_args={"percentile": {"percentile": cfg.percentile},
                                              "nstd": {"n_std": cfg.n_std}})


def overrides_note(qmodel: QuantizedModel) -> str:
    """The overrides that applied to ``qmodel`` for a row's note ('; overrides: input a8, @last a8'); '' without
    any, so a row whose W/A bits column says 4/4 still tells which tensors were kept wider (and a role that
    matched nothing, ``@depthwise`` in a model without depthwise convolutions, is not listed)."""
    kept = [o.describe() for o in qmodel.applied_overrides]
    return "; overrides: " + ", ".join(kept) if kept else ""


def weights_fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of SHA-256 over the state dict's names and bytes: identifies fp32 weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def calibrate(trainer: pl.Trainer, lit: LitClassifier, dm: Any, stats_file: str | None,
              source: dict[str, Any]) -> float:
    """Calibrate ``lit`` (PTQCalibration during ``trainer.predict``) or load ``stats_file``; returns seconds.

    An existing stats file replaces calibration (Distiller's ``--qe-stats-file``) when its ``source``
    (model, data set, fp32 weights fingerprint) is this one; a missing file is written (atomically).
    """
    start = time.perf_counter()
    stats = Path(stats_file) if stats_file else None
    if stats is not None and stats.is_file():
        load_stats(lit.model, stats, source)
        enable_observer(lit.model, False)
        enable_fake_quant(lit.model, True)
    else:
        trainer.predict(lit, datamodule=dm, return_predictions=False)
        if stats is not None and trainer.is_global_zero:
            atomic_write_text(stats, dump_stats(lit.model, source=source))
    return time.perf_counter() - start


@dataclass
class PTQPoint:
    """One PTQ row to make: its plan and the stem of its files (``ptq-w<W>a<A>[-<observer>]``)."""

    plan: QuantPlan
    stem: str


def ptq_points(cfg: QuantizeConfig, sweep_bits: list[int] | None, observers: list[str] | None) -> list[PTQPoint]:
    """Every width x activation observer of the run (one point without a sweep)."""
    points = []
    for bits in sweep_bits or [None]:
        for observer in observers or [cfg.act_observer]:
            plan = build_plan(cfg, bits, observer)
            suffix = f"-{plan.act.observer}" if observers and len(observers) > 1 else ""
            points.append(PTQPoint(plan, f"ptq-w{plan.weight.bits}a{plan.act.bits}{suffix}"))
    return points


def layerwise_note(cfg: QuantizeConfig, result: LayerwiseResult) -> str:
    """What layer-wise PTQ did, for the row's note: steps, layers, images, time, and the mean relative output
    error of the layers against round-to-nearest."""
    steps = [s for s, on in (("GPTQ weight rounding", cfg.weight_rounding == "gptq"),
                             (f"AdaRound weight rounding ({cfg.adaround_iters} steps per layer, lr {cfg.adaround_lr:g})",
                              cfg.weight_rounding == "adaround"),
                             ("bias correction", cfg.bias_correction)) if on]
    errors = result.errors.values()
    nearest = sum(e[0] for e in errors) / max(len(errors), 1)
    used = sum(e[1] for e in errors) / max(len(errors), 1)
    return (f"{' + '.join(steps)}: {result.layers} layers on {result.samples} images in {result.seconds:.1f} s; "
            f"mean relative output error of a layer {used:.4f} (round-to-nearest {nearest:.4f})")


def layerwise_on(cfg: QuantizeConfig) -> bool:
    """Whether the flags (or the QAT recipe) ask for GPTQ / AdaRound rounding or bias correction."""
    return cfg.weight_rounding != "nearest" or bool(cfg.bias_correction)


def layerwise_steps(cfg: QuantizeConfig, model: torch.nn.Module, dm: Any) -> LayerwiseResult | None:
    """GPTQ rounding and bias correction of a calibrated ``model`` on the whole calibration set, as the flags
    (or the QAT recipe) ask; None when neither is on."""
    if not layerwise_on(cfg):
        return None
    rounding = weight_rounding(cfg.weight_rounding, iters=cfg.adaround_iters, lr=cfg.adaround_lr)
    return layerwise_ptq(model, dm.full_calibration_dataloader(), rounding=rounding,
                         bias_correction=bool(cfg.bias_correction))


def logits_cost_note(ctx: RunContext, model: torch.nn.Module, row: Row) -> str:
    """For a model whose logits are quantized (asked for with ``--io-bits`` or a plan's ``@output``): '; ' and
    what that cost on the test split, from a second evaluation with the logits float; '' when they are float."""
    fq = logits_quantizer(model) if isinstance(model, QuantizedModel) else None
    if fq is None or not bool(fq.fake_quant_enabled) or row.top1 is None:
        return ""
    fq.fake_quant_enabled.fill_(False)
    try:
        metrics, _ = evaluate_on_test(ctx.trainer, model, ctx.num_classes, ctx.dm)
    finally:
        fq.fake_quant_enabled.fill_(True)
    return (f"; {LOGITS_COST}{fq.spec.bits} bits as asked: with float logits (the default) top-1 would be "
            f"{metrics['top1']:.2f}, so quantizing them cost {metrics['top1'] - row.top1:+.2f} points")


def ptq_row(ctx: RunContext, point: PTQPoint, stats_file: str | None) -> tuple[Row, torch.Tensor, torch.nn.Module, bool]:
    """Calibrate (or reuse) and evaluate one PTQ point: its row, per-image outcomes, the fake-quant model and
    whether the model was reused from the point's checkpoint.

    A resumed QAT run keeps the PTQ model its first run calibrated, when it is of this plan and model.
    """
    cfg, plan = ctx.cfg, point.plan
    layerwise_done = ""
    # a saved PTQ model is reused only where the plan says everything about it (no layer-wise steps)
    reused = reusable_ptq(ctx.run_dir / f"{point.stem}.ckpt", plan, ctx.source) \
        if cfg.mode == "qat" and cfg.resume and not layerwise_on(cfg) else None
    if reused is not None:
        lit, calib_s = LitClassifier(reused[0], ctx.num_classes), reused[1]["row"].get("calib_s")
    else:
        start = time.perf_counter()
        model, equalized = equalize(ctx.float_model) if cfg.cle else (ctx.float_model, None)
        equalize_s = time.perf_counter() - start
        lit = LitClassifier(prepare(model, plan), ctx.num_classes)
        calib_s = equalize_s + calibrate(ctx.trainer, lit, ctx.dm, stats_file, ctx.source)
        if equalized is not None:
            layerwise_done += (f"; cross-layer equalization of {len(equalized.pairs)} layer pairs, biases "
                               f"absorbed in {len(equalized.absorbed)}")
        result = layerwise_steps(cfg, lit.model, ctx.dm)
        if result is not None:
            calib_s += result.seconds
            layerwise_done += f"; {layerwise_note(cfg, result)}"
    row, correct = ctx.evaluate(
        "ptq", lit.model, real=False, backend="fake-quant", weight_bits=plan.weight.bits, act_bits=plan.act.bits,
        observer=plan.act.observer, calib_s=calib_s,
        note="fake-quant simulation in float: no integer size or latency to report" + overrides_note(lit.model)
             + layerwise_done + (f"; calibrated qparams reused from {point.stem}.ckpt" if reused is not None else "")
             + (f"; {ptq_recipe(cfg.ptq_recipe, cfg.weight_bits, cfg.act_bits).describe()} (flags given override it)"
                if cfg.from_ptq_recipe and layerwise_done else ""))
    row.note += logits_cost_note(ctx, lit.model, row)
    return row, correct, lit.model, reused is not None
