"""torch.ao's rows, the reference every row of ours is compared with: static int8 PTQ (``builtin-ptq``, per
backend), QAT (``builtin-qat``, trained with our QAT recipe; its result is saved so a resumed run reuses it),
dynamic int8 and the half-precision copy. The torch.ao calls themselves live in :mod:`lit_quant.app.torchao_ref`.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from typing_extensions import override

from lit_quant.callbacks import frozen_at
from lit_quant.deploy.engines import available_backends
from lit_quant.io import atomic_write_text
from lit_quant.app.pipeline.config import QuantizeConfig
from lit_quant.app.pipeline.context import RunContext
from lit_quant.app.pipeline.qat import qat_classifier, qat_train_config, recipe_note, sync_bn
from lit_quant.app.pipeline.rows import ROW_KEYS, Row
from lit_quant.quant.errors import QuantError
from lit_quant.app.torchao_ref import (
    builtin_dynamic,
    builtin_half,
    builtin_ptq,
    builtin_qat_convert,
    builtin_qat_prepare,
    builtin_qat_switches,
)
from lit_quant.app.training import Arch, build_trainer

#: File in a run folder holding torch.ao's QAT row and its per-image outcomes, reused by a resumed QAT run.
BUILTIN_QAT_RESULT = "builtin-qat-result.json"


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
        return not frozen_at(trainer.current_epoch, self.freeze_observers_epoch)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        builtin_qat_switches(pl_module.model, self._observing(trainer),
                             bn_training=not frozen_at(trainer.current_epoch, self.freeze_bn_epoch))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        builtin_qat_switches(pl_module.model, observing=False)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            builtin_qat_switches(pl_module.model, self._observing(trainer))


def ptq_backends(cfg: QuantizeConfig) -> list[str]:
    """``--backend``, or with ``--mode compare`` every backend that runs on this CPU."""
    return available_backends() if cfg.mode == "compare" else [cfg.backend]


def builtin_ptq_rows(ctx: RunContext) -> list[tuple[Row, torch.Tensor | None]]:
    """torch.ao static int8 on each of :func:`ptq_backends`."""
    rows = []
    for backend in ptq_backends(ctx.cfg):
        info = {"backend": backend, "weight_bits": 8, "act_bits": 8, "observer": "histogram"}
        try:
            # all calibration images in every process: torch.ao's observers cannot merge ranks' statistics
            result = builtin_ptq(ctx.float_model, ctx.dm.full_calibration_dataloader(), backend, ctx.example)
            # one batch first, its stderr kept: torch.fx prints a failing op's traceback itself before raising
            with contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
                result.model(ctx.example)
            rows.append(ctx.evaluate("builtin-ptq", result.model, calib_s=result.calib_s,
                                     note=f"torch.ao {result.method} int8, real integer kernels", **info))
        except QuantError:
            raise
        except (RuntimeError, NotImplementedError, AssertionError, TypeError) as exc:
            # the reference failing on a model (an op its converted model cannot run) costs only its own row
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            rows.append((Row(variant="builtin-ptq", **info, note=f"torch.ao {backend} int8 failed on this model: "
                                                                 f"{first}"), None))
    return rows


def dynamic_row(ctx: RunContext) -> tuple[Row, torch.Tensor]:
    """torch.ao dynamic int8: Linear weights int8, activations quantized per batch."""
    return ctx.evaluate("builtin-dynamic", builtin_dynamic(ctx.float_model), backend="dynamic", weight_bits=8,
                        act_bits=32, note="torch.ao dynamic: int8 Linear weights, activations quantized per batch; "
                                          "convs stay float")


def half_row(ctx: RunContext) -> tuple[Row, torch.Tensor]:
    """A 16-bit copy of the fp32 model (bfloat16 where float16 does not run)."""
    half = builtin_half(ctx.float_model, ctx.example)
    return ctx.evaluate("half", half, backend=str(half.dtype).removeprefix("torch."), weight_bits=16, act_bits=16,
                        note="16-bit weights and activations")


def run_builtin_qat(cfg: QuantizeConfig, classifier: Any, arch: Arch, dm: Any,
                    run_dir: Path, example: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """torch.ao's QAT on the same fp32 model, data, epochs, optimiser and freeze schedule: ``prepare_qat_fx``
    with the backend's default QAT qconfig, trained by the same Lightning Trainer settings, then ``convert_fx``.
    No checkpoints (an FX GraphModule is not what --resume restores); returns the int8 model and fit time."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    lit = qat_classifier(cfg, classifier, builtin_qat_prepare(classifier.model, cfg.backend, example))
    schedule = BuiltinQATSchedule(cfg.freeze_observers_epoch, cfg.freeze_bn_epoch)
    trainer = build_trainer(qat_train_config(cfg, arch), run_dir / "builtin-qat", callbacks=[schedule],
                            sync_batchnorm=sync_bn(cfg), enable_checkpointing=False, inference_mode=False)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    return builtin_qat_convert(lit.model.cpu()), time.perf_counter() - start


def builtin_qat_key(cfg: QuantizeConfig, source: dict[str, Any], data: dict[str, Any],
                    world_size: int) -> dict[str, Any]:
    """Everything that decides torch.ao's QAT model: the fp32 weights, the data, the recipe and the hardware
    layout. A saved result is reused only under an equal key."""
    recipe = ("backend", "epochs", "lr", "warmup_epochs", "distill", "distill_weight", "distill_temperature",
              "freeze_observers_epoch", "freeze_bn_epoch", "seed", "batch_size")
    hardware = ("precision", "opt_level", "deterministic", "accelerator")
    return {"source": dict(source), "data": dict(data), "world_size": world_size,
            **{k: getattr(cfg, k) for k in recipe}, **{k: getattr(cfg.hardware, k) for k in hardware}}


def write_builtin_qat_result(run_dir: Path, key: dict[str, Any], row: Row, correct: torch.Tensor) -> None:
    """Save torch.ao's QAT row and its per-image top-1 outcomes (as a 0/1 string) under ``key``."""
    payload = {"key": key, "row": row.to_dict(), "correct": "".join("1" if c else "0" for c in correct.tolist())}
    atomic_write_text(run_dir / BUILTIN_QAT_RESULT, json.dumps(payload, indent=1) + "\n")


def read_builtin_qat_result(run_dir: Path, key: dict[str, Any]) -> tuple[Row, torch.Tensor] | None:
    """The saved torch.ao QAT row and outcomes when saved under an equal ``key``; else None."""
    path = run_dir / BUILTIN_QAT_RESULT
    try:
        payload = json.loads(path.read_text())
        if payload.get("key") != json.loads(json.dumps(key)):  # compare in JSON form (tuples become lists)
            return None
        row, correct = dict(payload["row"]), str(payload["correct"])
        if set(correct) - {"0", "1"} or not set(ROW_KEYS) <= set(row):
            return None
        return Row.from_dict(row), torch.tensor([c == "1" for c in correct])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def builtin_qat_row(ctx: RunContext) -> tuple[Row, torch.Tensor]:
    """torch.ao's QAT row: reused from :data:`BUILTIN_QAT_RESULT` by a resumed run with the same key (same
    settings, same model), else trained and saved."""
    cfg = ctx.cfg
    key = builtin_qat_key(cfg, ctx.source, ctx.data_settings, ctx.trainer.world_size)
    saved = read_builtin_qat_result(ctx.run_dir, key) if cfg.resume else None
    if saved is not None:
        row, correct = saved
        row.note = f"{row.note}; reused from {BUILTIN_QAT_RESULT}"
        return row, correct
    model, fit_s = run_builtin_qat(cfg, ctx.classifier, ctx.arch, ctx.dm, ctx.run_dir, ctx.example)
    row, correct = ctx.evaluate("builtin-qat", model, backend=cfg.backend, weight_bits=8, act_bits=8, observer="ema",
                                note=f"torch.ao prepare_qat_fx int8{recipe_note(cfg)}, {cfg.epochs} epochs in "
                                     f"{fit_s:.0f} s, real integer kernels")
    if ctx.is_global_zero:
        write_builtin_qat_result(ctx.run_dir, key, row, correct)
    return row, correct
