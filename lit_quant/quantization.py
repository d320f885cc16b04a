"""Post-training quantization of a trained checkpoint, side by side with torch.ao: the work behind quantize.py.

Every variant starts from a fresh load of the same fp32 checkpoint, calibrates on the same deterministic
calibration batches (the data module's ``predict_dataloader``) and is evaluated through the same Lightning
``trainer.test`` on the same test split, so the rows of a report differ only in how they quantize.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

from lit_quant.callbacks import BuiltinQATSchedule, PTQCalibration, QATCallback
from lit_quant.classifier import LitClassifier
from lit_quant.cli import console
from lit_quant.config import TrainConfig, check_choices, check_warmup, load_yaml, option, resolve_config
from lit_quant.deploy.graph import agreement
from lit_quant.deploy.int8 import export_int8, int8_blockers, reduce_range_note
from lit_quant.deploy.integer import DEFAULT_SCALE_APPROX_BITS, IntegerEngine, check_engine_widths, check_layer_name
from lit_quant.deploy.onnx_export import DEFAULT_OPSET, OnnxModel, check_opset, export_onnx
from lit_quant.deploy.pack import save_deployed
from lit_quant.errors import UserError
from lit_quant.io import atomic_write, atomic_write_text
from lit_quant.measure import latency_ms, model_size_bytes, paired_comparison
from lit_quant.precision import resolve_precision
from lit_quant.quant import (
    QuantError,
    QuantPlan,
    dump_stats,
    enable_fake_quant,
    enable_observer,
    load_stats,
    prepare,
    read_stats,
)
from lit_quant.quant.spec import OBSERVER_NAMES, SCHEMES
from lit_quant.safe_load import load_checkpoint
from lit_quant.torchao_ref import (
    available_backends,
    builtin_dynamic,
    builtin_half,
    builtin_ptq,
    builtin_qat_convert,
    builtin_qat_prepare,
    check_backend,
)
from lit_quant.training import (
    build_datamodule,
    build_trainer,
    hardware_settings,
    load_classifier,
    model_from_arch,
    prepare_output_dir,
    read_checkpoint,
    state_dict_mismatch,
)

#: Keys every report row carries (``report.json`` ``{"rows": [...], "pairs": [...]}`` and ``report.csv``).
ROW_KEYS = ("variant", "source", "backend", "weight_bits", "act_bits", "observer", "top1", "top5", "fixed_vs_fp32",
            "broken_vs_fp32", "p_vs_fp32", "size_bytes", "latency_ms_bs1", "latency_ms_bs64", "calib_s", "note")
MODES = ("ptq", "qat", "builtin", "compare", "dynamic", "half")
EXPORTS = ("int8", "integer", "onnx")
QAT_METHODS = ("ste", "lsq")


@dataclass
class QuantizeConfig:
    """Everything ``quantize.py`` needs; see the README for each flag."""

    ckpt: str | None = option(None, "fp32 checkpoint (default: the newest best.ckpt under --checkpoint-dir)")
    eval: str | None = option(None, "re-evaluate a quantized checkpoint written by an earlier run (ptq-w*a*.ckpt)")
    checkpoint_dir: str = option("checkpoints", "root folder of runs; reports go to the checkpoint's run folder")
    mode: str = option("ptq", "ptq (fp32, ours, torch.ao --backend), qat (fp32, PTQ, our QAT, torch.ao QAT), builtin (torch.ao only), compare (fp32, ours, "
                       "torch.ao on every backend of this CPU), dynamic (torch.ao dynamic int8 Linear), half (16-bit copy)", choices=MODES)
    weight_bits: int = option(8, "weight bits, 2..16")
    act_bits: int = option(8, "activation bits, 2..16")
    weight_scheme: str = option("sym", "weight scheme", choices=SCHEMES)
    act_scheme: str = option("asym_u", "activation scheme", choices=SCHEMES)
    per_channel: bool = option(True, "per-channel weight quantization (--no-per-channel: per tensor)")
    weight_observer: str = option("minmax", "weight observer", choices=OBSERVER_NAMES)
    act_observer: str = option("mse", "activation observer", choices=OBSERVER_NAMES)
    percentile: float = option(99.99, "clipping percentile of the 'percentile' observer, in (50, 100]")
    n_std: float = option(3.0, "clip at mean +- N standard deviations with the 'nstd' observer")
    first_last_bits: int | None = option(None, "bits of the first and last layer (e.g. 8 with low --bits)")
    io_bits: int | None = option(None, "bits of the model input (the image) and output (the logits) only, e.g. 8 "
                                 "with low --bits; every weight keeps --weight-bits")
    no_quant_layers: tuple[str, ...] = option((), "layers left in float: names or globs (fc 'layers.0.*')")
    plan: str | None = option(None, "YAML quantization plan with per-layer overrides (replaces the bit/scheme flags)")
    stats_file: str | None = option(None, "calibration statistics YAML: reused when it exists, else written")
    calib_batches: int = option(32, "training batches used for calibration")
    batch_size: int = option(128, "batch size of calibration and evaluation")
    backend: str = option("x86", "torch.ao backend of the built-in row (fbgemm, x86, qnnpack, onednn)")
    accelerator: str = option("cpu", "Lightning accelerator of calibration and evaluation: cpu, gpu, cuda, auto")
    devices: str = option("1", "processes (a count or a list like 0,1): calibration statistics are merged "
                          "across them, evaluation is split between them")
    gpus: int | None = option(None, "calibrate and evaluate on N GPUs (accelerator gpu, devices N, DDP)")
    num_nodes: int = option(1, "number of nodes for multi-node DDP")
    strategy: str = option("auto", "Lightning strategy (auto: DDP when devices > 1)")
    # QAT
    epochs: int = option(5, "QAT: fine-tuning epochs (ours and torch.ao's)")
    lr: float | None = option(None, "QAT: peak learning rate, cosine decay (default: 1/100 of the fp32 run's)")
    warmup_epochs: float = option(0.0, "QAT: linear learning-rate warm-up from 1/100 of --lr over this many epochs "
                                  "(fractions allowed; 0: none); keeps low-bit LSQ at a large --lr from diverging "
                                  "in its first steps")
    qat_method: str = option("ste", "QAT: ste (fixed-range fake quant, observers, straight-through rounding) or "
                             "lsq (learned step sizes, for low bits)", choices=QAT_METHODS)
    distill: bool = option(False, "QAT: knowledge distillation from the fp32 model (the teacher) for ours and "
                           "torch.ao's QAT alike; loss (1-w) CE + w T^2 KL(teacher || student)")
    distill_weight: float = option(1.0, "QAT with --distill: weight w of the distillation term, in [0, 1]")
    distill_temperature: float = option(1.0, "QAT with --distill: softmax temperature T, positive")
    freeze_observers_epoch: int | None = option(None, "QAT: stop updating ranges from this epoch (0-based; "
                                                "unset: never)")
    # Default 0: fine-tuning a converged fp32 model, BatchNorm folds its running statistics from the first
    # step; on digits below 8 bits that beat training BatchNorm in every paired seed (docs/RESULTS.md).
    freeze_bn_epoch: int = option(0, "QAT: freeze BatchNorm statistics from this epoch (0-based; 0: fold the fp32 "
                                  "running statistics from the start; >= --epochs: BatchNorm trains all run)")
    precision: str | None = option(None, "QAT: Lightning precision (32-true, bf16-mixed, 16-mixed, ...)")
    opt_level: str | None = option(None, "QAT: apex-style mixed precision level", choices=("O0", "O1", "O2", "O3"))
    resume: str | None = option(None, "QAT: continue from 'last' (the run's qat-w<W>a<A>/last.ckpt) or a path")
    seed: int = option(42, "QAT: random seed (shuffling, augmentation)")
    deterministic: bool = option(False, "QAT: deterministic algorithms (bit-identical reruns and resumes)")
    builtin_qat: bool = option(True, "QAT: also train torch.ao's prepare_qat_fx model (same epochs and data)")
    # deployment
    export: tuple[str, ...] = option((), "deploy each PTQ / QAT result: int8 (torch.ao kernels with our qparams), "
                                     "integer (integer-only reference engine), onnx (QDQ model run by onnxruntime)")
    accum_bits: int | None = option(None, "--export integer: accumulator bits of every layer (default: the plan's; 32 "
                                    "where a layer's weight and input have <= 8 bits, else 64); "
                                    "overflows are counted and reported")
    scale_approx_bits: int = option(DEFAULT_SCALE_APPROX_BITS, "--export integer: bits of the fixed-point "
                                    "requantization multiplier M0 (M ~ M0 / 2^n; 31 = gemmlowp / TFLite's Q31)")
    explain: str | None = option(None, "print the integer dataflow of this layer (bit widths, scales, multiplier)")
    onnx_opset: int = option(DEFAULT_OPSET, "--export onnx: ONNX opset (13 or newer: per-channel QuantizeLinear)")
    latency: bool = option(True, "measure CPU latency at batch 1 and 64 (1 thread, rank 0 only)")
    progress: bool | None = option(None, "rich progress bars for calibration, QAT and evaluation; unset (None): "
                                   "on when stderr is a terminal")

    def validate(self) -> None:
        """Range checks with one-line messages."""
        for name in ("weight_bits", "act_bits", "first_last_bits", "io_bits"):
            value = getattr(self, name)
            if value is not None and not 2 <= value <= 16:
                raise UserError(f"--{name.replace('_', '-')} must be in 2..16, got {value}")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.n_std <= 0:
            raise UserError(f"--n-std must be positive, got {self.n_std}")
        for name in ("calib_batches", "batch_size", "num_nodes"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        check_warmup(self.warmup_epochs, self.epochs)
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.distill_temperature <= 0:
            raise UserError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if not self.distill and (self.distill_weight != 1.0 or self.distill_temperature != 1.0):
            raise UserError("--distill-weight / --distill-temperature are settings of --distill: add --distill")
        for name in ("freeze_observers_epoch", "freeze_bn_epoch"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a non-negative epoch, got {value}")
        if self.gpus is not None and self.gpus <= 0:
            raise UserError(f"--gpus must be positive, got {self.gpus}")
        unknown = [e for e in self.export if e not in EXPORTS]
        if unknown:
            raise UserError(f"invalid --export '{unknown[0]}'; choose from {', '.join(EXPORTS)}")
        if (self.export or self.explain) and self.mode not in ("ptq", "compare", "qat"):
            raise UserError("--export / --explain deploy our quantized model: use --mode ptq, compare or qat")
        if "integer" not in self.export and (self.accum_bits is not None or self.scale_approx_bits != DEFAULT_SCALE_APPROX_BITS):
            raise UserError("--accum-bits / --scale-approx-bits are settings of the integer engine: add --export integer")
        check_engine_widths(self.accum_bits, self.scale_approx_bits)
        if "onnx" not in self.export and self.onnx_opset != DEFAULT_OPSET:
            raise UserError("--onnx-opset is a setting of --export onnx")
        if "onnx" in self.export:
            check_opset(self.onnx_opset)
        check_choices(self)
        resolve_precision(self.precision, self.opt_level, on_cuda=False)  # both given, or an unknown value


def find_checkpoint(ckpt: str | None, checkpoint_dir: str | Path) -> Path:
    """``--ckpt``, or the newest ``*/best.ckpt`` under ``checkpoint_dir``."""
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise UserError(f"checkpoint {path} not found")
        return path
    candidates = sorted(Path(checkpoint_dir).glob("*/best.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"no fp32 checkpoint (*/best.ckpt) under {checkpoint_dir}/; train one with train.py "
                        "or pass --ckpt")
    return candidates[-1]


def _progress(cfg: QuantizeConfig) -> bool:
    """``--progress`` / ``--no-progress``, else bars only when a person is watching (stderr is a terminal)."""
    return sys.stderr.isatty() if cfg.progress is None else cfg.progress


def _trainer(cfg: QuantizeConfig | None = None) -> pl.Trainer:
    """The one Trainer of a run: calibration (``predict`` + :class:`PTQCalibration`) and every evaluation.

    ``use_distributed_sampler=False``: the data module shards evaluation without padding (see its loaders).
    """
    cfg = cfg or QuantizeConfig()
    callbacks: list[pl.Callback] = [PTQCalibration()]
    progress = _progress(cfg)
    if progress:
        callbacks.append(RichProgressBar())
    try:
        return pl.Trainer(**hardware_settings(cfg), logger=False, enable_progress_bar=progress,
                          enable_model_summary=False, use_distributed_sampler=False, callbacks=callbacks)
    except (MisconfigurationException, ValueError) as exc:
        raise UserError(f"invalid trainer settings: {exc}") from exc


def _evaluate(trainer: pl.Trainer, model: torch.nn.Module, num_classes: int,
              dm: Any) -> tuple[dict[str, float], torch.Tensor]:
    """Top-1 / top-5 (percent) on the test split, and the per-image top-1 outcomes (bool) for paired tests."""
    lit = LitClassifier(model, num_classes)
    result = trainer.test(lit, datamodule=dm, verbose=False)[0]
    assert lit.test_correct is not None
    return {"top1": 100.0 * result["test/top1"], "top5": 100.0 * result.get("test/top5", float("nan"))}, \
        lit.test_correct


def paired_rows(rows: list[dict[str, Any]], outcomes: dict[int, torch.Tensor]) -> list[dict[str, Any]]:
    """Image-by-image comparisons of the report: every row against fp32 (its ``fixed_vs_fp32`` /
    ``broken_vs_fp32`` / ``p_vs_fp32`` keys, filled in place) and each torch.ao row against ours.

    ``outcomes`` maps a row's index to its per-image top-1 outcomes (rows not evaluated have none). Ours
    against torch.ao: ``builtin-qat`` against ``qat``, each ``builtin-ptq`` against the PTQ row when there
    is exactly one. Returns those pairs as ``{"ours", "theirs", "ours_only", "theirs_only", "p_value"}``,
    ``ours_only`` counting the images only our model gets right (``p_value``: exact McNemar,
    :func:`lit_quant.measure.paired_comparison`).
    """
    fp32 = next((i for i, r in enumerate(rows) if r["variant"] == "fp32" and i in outcomes), None)
    for i, correct in outcomes.items():
        if fp32 is not None and i != fp32:
            cmp = paired_comparison(outcomes[fp32], correct)
            rows[i] |= {"fixed_vs_fp32": cmp.only_b, "broken_vs_fp32": cmp.only_a, "p_vs_fp32": cmp.p_value}

    by_variant: dict[str, list[int]] = {}
    for i in outcomes:
        by_variant.setdefault(rows[i]["variant"], []).append(i)
    pairs = []
    for ours, theirs in (("qat", "builtin-qat"), ("ptq", "builtin-ptq")):
        if len(by_variant.get(ours, [])) != 1:  # a sweep has several PTQ rows: no single one to pair
            continue
        i = by_variant[ours][0]
        for j in by_variant.get(theirs, []):
            cmp = paired_comparison(outcomes[i], outcomes[j])
            pairs.append({"ours": ours, "theirs": f"{theirs} ({rows[j]['backend']})", "ours_only": cmp.only_a,
                          "theirs_only": cmp.only_b, "p_value": cmp.p_value})
    return pairs


def _measure(model: torch.nn.Module, example: torch.Tensor, enabled: bool) -> dict[str, float | None]:
    if not enabled:
        return {"latency_ms_bs1": None, "latency_ms_bs64": None}
    # real test images where the batch holds 64, else the first image repeated
    batch64 = example[:64] if len(example) >= 64 else example[:1].expand(64, *example.shape[1:]).contiguous()
    # One thread: 2-thread timings on a shared 2-core machine measure the other jobs (see measure.py).
    return {"latency_ms_bs1": latency_ms(model, example[:1], threads=1),
            "latency_ms_bs64": latency_ms(model, batch64, threads=1)}


@dataclass
class QuantizeResult:
    """What :func:`run_quantize` hands back."""

    rows: list[dict[str, Any]]
    pairs: list[dict[str, Any]]  # ours against torch.ao, image by image (:func:`paired_rows`)
    run_dir: Path  # where the report was written
    is_global_zero: bool  # rank 0, the process that writes files (under DDP every process runs the work)


def run_quantize(cfg: QuantizeConfig, sweep_bits: list[int] | None = None,
                 observers: list[str] | None = None) -> QuantizeResult:
    """Run ``cfg.mode`` on the checkpoint: the report rows, ours-against-torch.ao pairs and where they went.

    ``sweep_bits`` (ptq mode) quantizes weights and activations at each width in turn, with each activation
    observer of ``observers`` (default: ``cfg.act_observer``), and plots top-1 against bits.
    """
    ckpt_path = find_checkpoint(cfg.ckpt, cfg.checkpoint_dir)
    # One load: prepare() and builtin_ptq() deep-copy the float model, so every variant starts from it intact.
    classifier = load_classifier(ckpt_path)
    float_model, arch = classifier.model.eval(), classifier.hparams.arch
    if cfg.mode in ("ptq", "builtin", "compare", "qat"):
        check_backend(cfg.backend)
    build_plan(cfg, qat=cfg.mode == "qat")  # a bad --plan file fails before any work
    if cfg.explain:  # a wrong layer name fails before any work
        check_layer_name(prepare(float_model, build_plan(cfg)), cfg.explain)
    if cfg.mode == "qat":  # a bad --resume fails before any work is done or any file written
        find_qat_resume(cfg, qat_dir_for(ckpt_path.parent, build_plan(cfg, qat=True)))
    train_cfg = TrainConfig(data=arch["data"], model=arch["model"], image_size=arch["image_size"],
                            small_input=arch["small_input"], batch_size=cfg.batch_size, progress=False)
    run_dir = ckpt_path.parent
    saved = run_dir / "config.yaml"
    if saved.is_file():  # same data location and split as the training run
        recorded = load_yaml(saved)
        differ = [k for k in ("data", "model") if k in recorded and recorded[k] != arch[k]]
        if differ:
            raise UserError(f"{ckpt_path} holds a {arch['model']} trained on {arch['data']}, but its run folder's "
                            f"config.yaml says {recorded.get('model')} on {recorded.get('data')}: the checkpoint "
                            "was copied from another run; move it to its own folder")
        data_keys = ("data_dir", "split_seed", "val_fraction", "fake_size")  # what decides the test images
        try:
            train_cfg = resolve_config({**train_cfg.to_dict(), **{k: v for k, v in recorded.items() if k in data_keys}})
        except UserError as exc:
            raise UserError(f"{saved}: {exc}") from None
    prepare_output_dir(run_dir, "the checkpoint's run folder")
    if cfg.stats_file is not None:  # a file to reuse is checked now, a file to write goes where files can go
        stats = Path(cfg.stats_file)
        if stats.exists():
            read_stats(stats)
        else:
            prepare_output_dir(stats.parent, "--stats-file")
    data_settings = {k: getattr(train_cfg, k) for k in ("data", "data_dir", "split_seed", "val_fraction", "fake_size",
                                                        "model", "image_size", "small_input")}
    source = {"model": arch["model"], "data": arch["data"], "weights": weights_fingerprint(float_model)}
    dm = build_datamodule(train_cfg)
    dm.calib_batches = cfg.calib_batches
    dm.setup()
    example = next(iter(dm.test_dataloader()))[0]
    num_classes = arch["num_classes"]
    trainer = _trainer(cfg)
    rows: list[dict[str, Any]] = []
    outcomes: dict[int, torch.Tensor] = {}  # row index -> per-image top-1 outcomes

    def row(variant: str, model: torch.nn.Module, real: bool = True, size: int | None = None, timed: bool = True,
            **info: Any) -> None:
        """Evaluate ``model`` into a report row; size and latency only for a ``real`` model (a fake-quant
        simulation stores and runs floats, so its size and speed would say nothing about integers).
        ``size``: bytes of the file the model ships as (default: its state dict); ``timed``: measure latency."""
        # every rank evaluates its shard (metrics are reduced over ranks); only rank 0 times the model, so
        # the processes do not slow each other's clocks
        metrics, outcomes[len(rows)] = _evaluate(trainer, model, num_classes, dm)
        rows.append({k: None for k in ROW_KEYS} | info | {"variant": variant} | metrics
                    | {"size_bytes": (size or model_size_bytes(model)) if real else None}
                    | _measure(model, example, real and timed and cfg.latency and trainer.is_global_zero))

    def deploy(qmodel: torch.nn.Module, stem: str) -> None:
        """Rows for ``--export`` of one fake-quant result (the row just added) and ``--explain``."""
        base = rows[-1]
        if not (cfg.export or cfg.explain):
            return
        engine = IntegerEngine(qmodel, cfg.accum_bits, cfg.scale_approx_bits) \
            if cfg.explain or "integer" in cfg.export else None
        if cfg.explain and trainer.is_global_zero:
            console.print(engine.explain(cfg.explain, example), markup=False, highlight=False, soft_wrap=True)
            engine.reset_stats()  # the overflow report covers the evaluation only
        bits = {k: base[k] for k in ("weight_bits", "act_bits", "observer")}
        fake_top1 = base["top1"]
        deployed = run_dir / f"{stem}-deploy.pt"
        if cfg.export and trainer.is_global_zero:
            save_deployed(deployed, qmodel, arch, data_settings)
        if "int8" in cfg.export:
            blockers = int8_blockers(qmodel)
            for backend in available_backends() if cfg.mode == "compare" else [cfg.backend]:
                if blockers:  # said in the table, not silently changed
                    rows.append({k: None for k in ROW_KEYS} | bits | {
                        "variant": "int8-export", "source": base["variant"], "backend": backend,
                        "note": f"not expressible on {backend} int8 kernels: {blockers[0]}"
                                + (f" (+{len(blockers) - 1} more)" if len(blockers) > 1 else "")})
                    continue
                int8 = export_int8(qmodel, backend)
                row("int8-export", int8, source=base["variant"], backend=backend, **bits, note="")
                caveat = reduce_range_note(qmodel, backend)
                rows[-1]["note"] = (f"our qparams on torch.ao {backend} int8 kernels; fake-quant top-1 "
                                    f"{fake_top1:.2f} ({rows[-1]['top1'] - fake_top1:+.2f})" + (f"; {caveat}" if caveat else ""))
        if "integer" in cfg.export:
            row("integer", engine, source=base["variant"], backend="integer", size=_file_size(deployed), timed=False,
                **bits, note="")
            check = agreement(engine, qmodel, dm.test_dataloader())
            over = engine.overflow_layers()
            overflow = "" if not over else (
                f"; ACCUMULATOR OVERFLOW (saturated) in {len(over)} layer(s): "
                + ", ".join(f"{n} needs {st.bits_needed} bits, {st.overflows} values" for n, st in list(over.items())[:3]))
            rows[-1]["note"] = (f"integer-only engine, {engine.scale_bits}-bit multipliers; predictions differ from "
                                f"fake-quant on {check['disagree']} of {check['images']} images, logits within "
                                f"{check['max_logit_diff_steps']:.0f} output steps; size = packed deploy file; "
                                "latency not timed (a reference, float64 integer containers)" + overflow)
            if over and trainer.is_global_zero:
                console.print(f"[yellow]warning:[/] accumulator overflow with --accum-bits "
                              f"{next(iter(over.values())).accum_bits}: " + ", ".join(
                                  f"{n} (needs {st.bits_needed} bits)" for n, st in over.items()))
        if "onnx" in cfg.export:
            path = run_dir / f"{stem}.onnx"
            if trainer.is_global_zero:
                export_onnx(qmodel, path, example, cfg.onnx_opset)
            if trainer.world_size > 1:
                torch.distributed.barrier()  # the other ranks read the file rank 0 wrote
            onnx_model = OnnxModel(path)
            row("onnx", onnx_model, source=base["variant"], backend="onnxruntime", size=_file_size(path), **bits, note="")
            check = agreement(onnx_model, qmodel, dm.test_dataloader())
            rows[-1]["note"] = (f"ONNX QDQ opset {cfg.onnx_opset}, onnxruntime CPU; predictions differ from "
                                f"PyTorch fake-quant on {check['disagree']} image(s)")

    row("fp32", float_model, backend="float", weight_bits=32, act_bits=32, note="fp32 checkpoint")
    if cfg.mode in ("ptq", "compare", "qat"):
        sweep = [(bits, observer) for bits in sweep_bits or [None] for observer in observers or [cfg.act_observer]]
        for bits, observer in sweep:
            plan = build_plan(cfg, bits, observer)
            suffix = f"-{plan.act.observer}" if observers and len(observers) > 1 else ""
            stem = f"ptq-w{plan.weight.bits}a{plan.act.bits}{suffix}"
            # a resumed QAT run keeps the PTQ model its first run calibrated, when it is of this plan and model
            reused = reusable_ptq(run_dir / f"{stem}.ckpt", plan, source) if cfg.mode == "qat" and cfg.resume else None
            if reused is not None:
                lit, calib_s = LitClassifier(reused[0], num_classes), reused[1]["row"].get("calib_s")
            else:
                lit = LitClassifier(prepare(float_model, plan), num_classes)
                calib_s = _calibrate(trainer, lit, dm, cfg.stats_file if len(sweep) == 1 else None, source)
            row("ptq", lit.model, real=False, backend="fake-quant", weight_bits=plan.weight.bits,
                act_bits=plan.act.bits, observer=plan.act.observer, calib_s=calib_s,
                note="fake-quant simulation in float: no integer size or latency to report" + _overrides_note(plan)
                     + (f"; calibrated qparams reused from {stem}.ckpt" if reused is not None else ""))
            if trainer.is_global_zero and reused is None:
                save_quantized(run_dir / f"{stem}.ckpt", lit.model, plan, arch, data_settings, rows[-1], source=source)
            deploy(lit.model, stem)
    if cfg.mode == "qat":
        qat = run_qat(cfg, classifier, arch, dm, run_dir)
        row("qat", qat.model, real=False, backend="fake-quant", weight_bits=qat.plan.weight.bits,
            act_bits=qat.plan.act.bits, observer=qat.plan.act.observer, calib_s=qat.calib_s,
            note=f"our QAT ({cfg.qat_method}{_recipe_note(cfg)}), {cfg.epochs} epochs in {qat.fit_s:.0f} s; "
                 "fake-quant simulation" + _overrides_note(qat.plan))
        if trainer.is_global_zero:
            save_quantized(qat.run_dir.with_suffix(".ckpt"), qat.model, qat.plan, arch, data_settings, rows[-1],
                           kind="qat", source=source)
        deploy(qat.model, qat.run_dir.name)
        if cfg.builtin_qat:
            key = builtin_qat_key(cfg, source, data_settings, trainer.world_size)
            saved = read_builtin_qat_result(run_dir, key) if cfg.resume else None
            if saved is not None:  # a resumed run keeps torch.ao's row of its first run: same settings, same model
                rows.append(saved[0] | {"note": saved[0]["note"] + f"; reused from {BUILTIN_QAT_RESULT}"})
                outcomes[len(rows) - 1] = saved[1]
            else:
                model, fit_s = run_builtin_qat(cfg, classifier, arch, dm, run_dir, example)
                row("builtin-qat", model, backend=cfg.backend, weight_bits=8, act_bits=8, observer="ema",
                    note=f"torch.ao prepare_qat_fx int8{_recipe_note(cfg)}, {cfg.epochs} epochs in {fit_s:.0f} s, "
                         "real integer kernels")
                if trainer.is_global_zero:
                    write_builtin_qat_result(run_dir, key, rows[-1], outcomes[len(rows) - 1])
    elif cfg.mode == "dynamic":
        row("builtin-dynamic", builtin_dynamic(float_model), backend="dynamic", weight_bits=8, act_bits=32,
            note="torch.ao dynamic: int8 Linear weights, activations quantized per batch; convs stay float")
    elif cfg.mode == "half":
        half = builtin_half(float_model, example)
        row("half", half, backend=str(half.dtype).removeprefix("torch."), weight_bits=16, act_bits=16,
            note="16-bit weights and activations")
    else:  # torch.ao static int8: --backend, or with compare every backend that runs on this CPU
        for backend in available_backends() if cfg.mode == "compare" else [cfg.backend]:
            # all calibration images in every process: torch.ao's observers cannot merge ranks' statistics
            result = builtin_ptq(float_model, dm.full_calibration_dataloader(), backend, example)
            row("builtin-ptq", result.model, backend=backend, weight_bits=8, act_bits=8, observer="histogram",
                calib_s=result.calib_s, note=f"torch.ao {result.method} int8, real integer kernels")
    pairs = paired_rows(rows, outcomes)
    if trainer.is_global_zero:
        write_report(rows, run_dir, pairs)
        if sweep_bits and len(sweep_bits) > 1:
            plot_sweep(rows, run_dir / "accuracy_vs_bits.png")
    return QuantizeResult(rows, pairs, run_dir, trainer.is_global_zero)


def _file_size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def weights_fingerprint(model: torch.nn.Module) -> str:
    """First 16 hex digits of SHA-256 over the state dict's names and bytes: identifies fp32 weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class QATResult:
    """What :func:`run_qat` hands back: the trained quantized model (eval mode), its plan, its folder."""

    model: torch.nn.Module
    plan: QuantPlan
    run_dir: Path
    calib_s: float | None
    fit_s: float


def _qat_train_config(cfg: QuantizeConfig, arch: dict[str, Any]) -> TrainConfig:
    """The Trainer settings of a QAT run (hardware, precision, epochs) as a :class:`TrainConfig`."""
    return TrainConfig(data=arch["data"], model=arch["model"], batch_size=cfg.batch_size, epochs=cfg.epochs,
                       seed=cfg.seed, deterministic=cfg.deterministic, accelerator=cfg.accelerator,
                       devices=cfg.devices, gpus=cfg.gpus, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                       precision=cfg.precision, opt_level=cfg.opt_level, progress=_progress(cfg),
                       log_every_n_steps=1)


def _qat_classifier(cfg: QuantizeConfig, classifier: LitClassifier, model: torch.nn.Module) -> LitClassifier:
    """A LitClassifier for fine-tuning ``model``: the fp32 run's optimiser settings, ``--lr`` (default 1/100
    of the fp32 peak rate) with cosine decay over ``--epochs`` after ``--warmup-epochs``; with ``--distill`` a frozen copy of the fp32
    model is the teacher (ours and torch.ao's QAT get the same loss, so their rows differ in quantization
    alone)."""
    hp = classifier.hparams
    teacher = copy.deepcopy(classifier.model) if cfg.distill else None
    return LitClassifier(model, hp.arch["num_classes"], arch=hp.arch, optimizer=hp.optimizer,
                         lr=cfg.lr if cfg.lr is not None else hp.lr / 100.0, momentum=hp.momentum,
                         nesterov=hp.nesterov, weight_decay=hp.weight_decay, scheduler="cosine",
                         label_smoothing=hp.label_smoothing, teacher=teacher, distill_weight=cfg.distill_weight,
                         distill_temperature=cfg.distill_temperature, warmup_epochs=cfg.warmup_epochs)


def _overrides_note(plan: QuantPlan) -> str:
    """The plan's per-layer overrides for a row's note ('; overrides: input a8, @last a8'); '' without any, so
    a row whose W/A bits column says 4/4 still tells which tensors were kept wider."""
    if not plan.overrides:
        return ""
    return "; overrides: " + ", ".join(o.describe() for o in plan.overrides)


def _recipe_note(cfg: QuantizeConfig) -> str:
    """How a QAT row was trained beyond plain fine-tuning, for its note: '' without --distill / --warmup-epochs."""
    note = f", distilled from fp32 w={cfg.distill_weight:g} T={cfg.distill_temperature:g}" if cfg.distill else ""
    return note + (f", lr warm-up {cfg.warmup_epochs:g} epochs" if cfg.warmup_epochs else "")


def _sync_bn(cfg: QuantizeConfig) -> bool:
    """SyncBatchNorm on CUDA (torch's SyncBatchNorm has no CPU kernels). On CPU, DDP's buffer broadcast
    gives every rank rank 0's running statistics at each forward; batch statistics stay per rank."""
    return cfg.accelerator != "cpu" and torch.cuda.is_available()


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
    train_cfg = _qat_train_config(cfg, arch)
    # inference_mode=False: quantizer buffers replaced during calibration or validation (a per-channel scale
    # taking its shape, an observer reset) would otherwise be inference tensors that training cannot update.
    trainer = build_trainer(train_cfg, qat_dir, callbacks=[PTQCalibration(), callback, last_cb],
                            sync_batchnorm=_sync_bn(cfg), inference_mode=False)
    prepare_output_dir(qat_dir, "the QAT run folder")
    calib_s = None
    if resume is None:  # a fresh run starts from calibrated qparams; a resumed one loads them
        lit = _qat_classifier(cfg, classifier, prepare(classifier.model, plan, qat=True))
        start = time.perf_counter()
        trainer.predict(lit, datamodule=dm, return_predictions=False)
        calib_s = time.perf_counter() - start
    else:
        lit = _qat_classifier(cfg, classifier, copy.deepcopy(classifier.model))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(lit, datamodule=dm, ckpt_path=str(resume) if resume else None)
    return QATResult(lit.model.eval(), plan, qat_dir, calib_s, time.perf_counter() - start)


def run_builtin_qat(cfg: QuantizeConfig, classifier: LitClassifier, arch: dict[str, Any], dm: Any,
                    run_dir: Path, example: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """torch.ao's QAT on the same fp32 model, data, epochs, optimiser and freeze schedule: ``prepare_qat_fx``
    with the backend's default QAT qconfig, trained by the same Lightning Trainer settings, then ``convert_fx``.
    No checkpoints (an FX GraphModule is not what --resume restores); returns the int8 model and fit time."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    lit = _qat_classifier(cfg, classifier, builtin_qat_prepare(classifier.model, cfg.backend, example))
    train_cfg = _qat_train_config(cfg, arch)
    schedule = BuiltinQATSchedule(cfg.freeze_observers_epoch, cfg.freeze_bn_epoch)
    trainer = build_trainer(train_cfg, run_dir / "builtin-qat", callbacks=[schedule], sync_batchnorm=_sync_bn(cfg),
                            enable_checkpointing=False, inference_mode=False)
    start = time.perf_counter()
    trainer.fit(lit, datamodule=dm)
    return builtin_qat_convert(lit.model.cpu()), time.perf_counter() - start


def _calibrate(trainer: pl.Trainer, lit: LitClassifier, dm: Any, stats_file: str | None,
               source: dict[str, Any]) -> float:
    """Calibrate ``lit`` (PTQCalibration during ``trainer.predict``) or load ``stats_file``; returns seconds.

    An existing stats file replaces calibration (Distiller's ``--qe-stats-file``) when its ``source``
    (model, data set, fp32 weights fingerprint) is this one; a missing file is written.
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


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against bits, one line per observer, with the fp32 level and torch.ao's int8 point (seed 000's
    figure, with dequantization done right)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for observer in sorted({r["observer"] for r in rows if r["variant"] == "ptq"}):
        points = sorted((r["act_bits"], r["top1"]) for r in rows if r["variant"] == "ptq" and r["observer"] == observer)
        ax.plot(*zip(*points), marker="o", label=f"ours ({observer})")
    for r in rows:
        if r["variant"] == "fp32":
            ax.axhline(r["top1"], color="grey", linestyle="--", label="fp32")
        elif r["variant"] == "builtin-ptq":
            ax.plot([8], [r["top1"]], marker="s", linestyle="", label=f"torch.ao {r['backend']} int8")
    ax.set_xlabel("bits (weights and activations)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def build_plan(cfg: QuantizeConfig, bits: int | None = None, observer: str | None = None,
               qat: bool = False) -> QuantPlan:
    """``--plan`` YAML, else the plan behind the bit / scheme / observer flags (``bits`` / ``observer``
    override them for one point of a sweep). ``qat``: quantizers of ``--qat-method``; PTQ rows use plain
    fake quantization (STE), so a QAT report's PTQ row is the usual PTQ baseline."""
    if cfg.plan is not None:
        return QuantPlan.from_yaml(cfg.plan)
    return QuantPlan.from_bits(bits or cfg.weight_bits, bits or cfg.act_bits, weight_scheme=cfg.weight_scheme,
                               act_scheme=cfg.act_scheme, weight_observer=cfg.weight_observer,
                               act_observer=observer or cfg.act_observer, per_channel=cfg.per_channel,
                               first_last_bits=cfg.first_last_bits, io_bits=cfg.io_bits, skip=cfg.no_quant_layers,
                               quantizer=cfg.qat_method if qat else "ste",
                               observer_args={"percentile": {"percentile": cfg.percentile},
                                              "nstd": {"n_std": cfg.n_std}})


def save_quantized(path: Path, model: torch.nn.Module, plan: QuantPlan, arch: dict[str, Any],
                   data: dict[str, Any], row: dict[str, Any], kind: str = "ptq",
                   source: dict[str, Any] | None = None) -> None:
    """Write a self-contained quantized checkpoint: architecture, data settings, plan, calibrated state dict,
    its report row and ``source`` (model, data set and fp32 weights fingerprint it was made from).

    The plan and the qparams (buffers of the quantizers) travel in the file, so :func:`evaluate_quantized`
    rebuilds the model without the fp32 checkpoint and without calibrating again.
    """
    payload = {"lit_quant": kind, "arch": dict(arch), "data": data, "plan": plan.to_dict(),
               "state_dict": model.state_dict(), "row": row, "source": dict(source or {})}
    atomic_write(path, lambda fh: torch.save(payload, fh))


def load_quantized(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; :class:`UserError` when it is not one."""
    path = Path(path)
    payload = load_checkpoint(path, "quantized checkpoint")  # weights-only: a file from elsewhere runs no code
    if not isinstance(payload, dict) or payload.get("lit_quant") not in ("ptq", "qat"):
        raise UserError(f"{path} is not a quantized checkpoint written by quantize.py (an fp32 one goes to --ckpt)")
    arch = payload["arch"]
    model = prepare(model_from_arch(arch).eval(), QuantPlan.from_dict(payload["plan"]), qat=payload["lit_quant"] == "qat")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise UserError(f"{path}: state dict does not match its plan: {state_dict_mismatch(exc)}") from None
    enable_observer(model, False)
    enable_fake_quant(model, True)
    return model.eval(), payload


def reusable_ptq(path: Path, plan: QuantPlan, source: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The calibrated model and payload of the quantized checkpoint ``path`` when it was made from the same
    fp32 weights (``source``) with the same plan; else None (missing, another plan or model, unreadable)."""
    if not path.is_file():
        return None
    try:
        model, payload = load_quantized(path)
    except (UserError, QuantError):
        return None
    if payload.get("lit_quant") != "ptq" or payload.get("source") != source or payload.get("plan") != plan.to_dict():
        return None
    return model, payload


#: File in a run folder holding torch.ao's QAT row and its per-image outcomes, reused by a resumed QAT run.
BUILTIN_QAT_RESULT = "builtin-qat-result.json"


def builtin_qat_key(cfg: QuantizeConfig, source: dict[str, Any], data: dict[str, Any],
                    world_size: int) -> dict[str, Any]:
    """Everything that decides torch.ao's QAT model: the fp32 weights, the data, the recipe and the hardware
    layout. A saved result is reused only under an equal key."""
    recipe = ("backend", "epochs", "lr", "warmup_epochs", "distill", "distill_weight", "distill_temperature",
              "freeze_observers_epoch", "freeze_bn_epoch", "precision", "opt_level", "seed", "deterministic",
              "batch_size", "accelerator")
    return {"source": dict(source), "data": dict(data), "world_size": world_size,
            **{k: getattr(cfg, k) for k in recipe}}


def write_builtin_qat_result(run_dir: Path, key: dict[str, Any], row: dict[str, Any], correct: torch.Tensor) -> None:
    """Save torch.ao's QAT row and its per-image top-1 outcomes (as a 0/1 string) under ``key``."""
    payload = {"key": key, "row": row, "correct": "".join("1" if c else "0" for c in correct.tolist())}
    atomic_write_text(run_dir / BUILTIN_QAT_RESULT, json.dumps(payload, indent=1) + "\n")


def read_builtin_qat_result(run_dir: Path, key: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor] | None:
    """The saved torch.ao QAT row and outcomes when saved under an equal ``key``; else None."""
    path = run_dir / BUILTIN_QAT_RESULT
    try:
        payload = json.loads(path.read_text())
        if payload.get("key") != json.loads(json.dumps(key)):  # compare in JSON form (tuples become lists)
            return None
        row, correct = dict(payload["row"]), str(payload["correct"])
        if set(correct) - {"0", "1"} or not set(ROW_KEYS) <= set(row):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return row, torch.tensor([c == "1" for c in correct])


def evaluate_quantized(path: str | Path, batch_size: int) -> dict[str, Any]:
    """Top-1 / top-5 of a saved quantized checkpoint on its data set's test split (no calibration)."""
    model, payload = load_quantized(path)
    dm = build_datamodule(TrainConfig(**payload["data"], batch_size=batch_size, progress=False))
    metrics, _ = _evaluate(_trainer(), model, payload["arch"]["num_classes"], dm)
    return payload["row"] | {"variant": f"{payload['lit_quant']} (reloaded)"} | metrics


def write_report(rows: list[dict[str, Any]], run_dir: Path, pairs: list[dict[str, Any]] | None = None) -> None:
    """``report.json`` (``{"rows": [...], "pairs": [...]}``) and ``report.csv`` (the rows) in the run folder,
    each written atomically."""
    atomic_write_text(run_dir / "report.json", json.dumps({"rows": rows, "pairs": pairs or []}, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=ROW_KEYS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "report.csv", buffer.getvalue())
