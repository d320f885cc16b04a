"""``run_quantize``: post-training quantization of a trained checkpoint, side by side with torch.ao.

Every variant starts from a fresh load of the same fp32 checkpoint, calibrates on the same deterministic
calibration batches (the data module's ``predict_dataloader``) and is evaluated through the same Lightning
``trainer.test`` on the same test split, so the rows of a report differ only in how they quantize.

Each run writes its report to its own folder ``<run>/quantize/<name>/``; ``<run>/report.json`` and
``<run>/report.csv`` are copies of the newest report.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_quant.app.config import TrainConfig, load_yaml, resolve_config
from lit_quant.deploy.engines import check_backend
from lit_quant.deploy.integer import check_layer_name
from lit_quant.errors import UserError
from lit_quant.io import check_writable, describe_os_error
from lit_quant.app.pipeline.checkpoint import DATA_SETTINGS, save_quantized
from lit_quant.app.pipeline.config import QuantizeConfig, is_sweep
from lit_quant.app.pipeline.context import RunContext, build_eval_trainer
from lit_quant.app.pipeline.deploy import add_deploy_rows
from lit_quant.app.pipeline.mixed import run_mixed
from lit_quant.app.pipeline.ptq import build_plan, ptq_points, ptq_row, weights_fingerprint
from lit_quant.app.pipeline.qat import find_qat_resume, qat_dir_for, qat_row, run_qat
from lit_quant.app.pipeline.reference import builtin_ptq_rows, builtin_qat_row, dynamic_row, half_row
from lit_quant.app.pipeline.rows import Report, RowPair, plot_sweep, write_report
from lit_quant.quant import load_stats, prepare
from lit_quant.app.training import (
    Arch,
    build_datamodule,
    check_nodes,
    load_classifier,
    lock_folder,
    prepare_output_dir,
)

#: Keys of the training run's config.yaml that decide which images are the test split.
DATA_KEYS = ("data_dir", "split_seed", "val_fraction", "fake_size")


@dataclass
class QuantizeResult:
    """What :func:`run_quantize` hands back."""

    rows: list[dict[str, Any]]  # the report rows as written (:meth:`Row.to_dict`)
    pairs: list[RowPair]  # ours against torch.ao, image by image (:func:`paired_rows`)
    run_dir: Path  # the fp32 checkpoint's run folder (holds copies of the newest report)
    report_dir: Path  # this run's own report folder, <run>/quantize/<name>/
    is_global_zero: bool  # rank 0, the process that writes files (under DDP every process runs the work)
    layers: list[dict[str, Any]]  # what our quantized model quantizes, op by op (report.json "layers")
    mixed: dict[str, Any] | None = None  # --sensitivity / --max-drop: what run_mixed returned
    messages: list[str] = field(default_factory=list)  # --explain's text and warnings, printed after the table


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


#: Where rank 0 hands its report folder's name to the other DDP processes (they inherit its environment).
REPORT_NAME_ENV = "LIT_QUANT_REPORT_NAME"


@contextlib.contextmanager
def claimed_report_dir(base: Path, name: str | None) -> Iterator[Path]:
    """This run's own report folder ``<base>/<name>`` for the ``with`` block: ``--name``, else the UTC time and a
    random suffix (``20261203-093000-3fa2c1``: reports sort by when they were made, and two runs started in
    the same second get two folders). The folder is locked meanwhile, so a second run given the same
    ``--name`` stops with one line instead of overwriting it; other DDP processes take rank 0's folder. A
    folder this run created and left empty (it failed before writing) is removed at the end."""
    inherited = os.environ.get(REPORT_NAME_ENV)
    if inherited:
        yield base / inherited
        return
    created = name is None or not (base / name).exists()
    base_created = not base.exists()
    try:
        while name is None:
            candidate = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
            try:
                (base / candidate).mkdir(parents=True)
                name = candidate
            except FileExistsError:
                if not base.is_dir():
                    raise
        folder = check_writable(base / name)
    except OSError as exc:
        raise UserError(f"cannot write this run's report folder: {describe_os_error(exc)}") from None
    fd = lock_folder(folder, f"--name {name}")
    os.environ[REPORT_NAME_ENV] = name
    try:
        yield folder
    finally:
        os.environ.pop(REPORT_NAME_ENV, None)
        if fd is not None:
            os.close(fd)
        if created and [p.name for p in folder.iterdir()] in ([], [".lock"]):
            (folder / ".lock").unlink(missing_ok=True)
            folder.rmdir()
            if base_created:  # <run>/quantize itself, made for this folder alone (another run may fill it now)
                with contextlib.suppress(OSError):
                    base.rmdir()


def _data_config(ckpt_path: Path, arch: Arch, batch_size: int) -> TrainConfig:
    """The data settings of the training run: the architecture's data set, with the data location and split
    recorded in the run folder's config.yaml, so that the test split is the training run's."""
    train_cfg = TrainConfig(data=arch.data, model=arch.model, image_size=arch.image_size,
                            small_input=arch.small_input, batch_size=batch_size, progress=False)
    saved = ckpt_path.parent / "config.yaml"
    if not saved.is_file():
        return train_cfg
    recorded = load_yaml(saved)
    differ = [k for k in ("data", "model") if k in recorded and recorded[k] != getattr(arch, k)]
    if differ:
        raise UserError(f"{ckpt_path} holds a {arch.model} trained on {arch.data}, but its run folder's "
                        f"config.yaml says {recorded.get('model')} on {recorded.get('data')}: the checkpoint "
                        "was copied from another run; move it to its own folder")
    try:
        return resolve_config({**train_cfg.to_dict(), **{k: v for k, v in recorded.items() if k in DATA_KEYS}})
    except UserError as exc:
        raise UserError(f"{saved}: {exc}") from None


def evaluation_data(ckpt_path: Path, arch: Arch, batch_size: int,
                    calib_batches: int) -> tuple[TrainConfig, Any]:
    """The training run's data settings and its set-up data module: the calibration images
    (``calib_batches`` batches of the training split, ``predict_dataloader`` / ``full_calibration_dataloader``)
    and the test split that every row of a report, and every peer library's model, is measured on."""
    train_cfg = _data_config(ckpt_path, arch, batch_size)
    dm = build_datamodule(train_cfg)
    dm.calib_batches = calib_batches
    dm.setup()
    return train_cfg, dm


def _check_before_work(cfg: QuantizeConfig, ckpt_path: Path, float_model: Any, source: dict[str, Any]) -> None:
    """Fail on a bad backend, plan (layer names, ``--no-quant-layers``, observer options), stats file,
    ``--explain`` layer or ``--resume`` before any work is done or any file written: the plan is prepared
    on the float model once here, and a stats file to reuse is loaded into that copy."""
    if cfg.mode in ("ptq", "builtin", "compare", "qat"):
        check_backend(cfg.backend)
    check_nodes(cfg.hardware.num_nodes)
    build_plan(cfg, qat=cfg.mode == "qat")
    if cfg.mode in ("ptq", "compare", "qat"):
        prepared = prepare(float_model, build_plan(cfg))
        if cfg.mode == "qat":
            prepare(float_model, build_plan(cfg, qat=True), qat=True)
        if cfg.explain:
            check_layer_name(prepared, cfg.explain)
        if cfg.stats_file is not None and Path(cfg.stats_file).exists():
            load_stats(prepared, cfg.stats_file, source)
    if cfg.stats_file is not None and not Path(cfg.stats_file).exists():
        prepare_output_dir(Path(cfg.stats_file).parent, "--stats-file")
    if cfg.mode == "qat":
        find_qat_resume(cfg, qat_dir_for(ckpt_path.parent, build_plan(cfg, qat=True)))


def check_finite_outputs(model: torch.nn.Module, images: torch.Tensor) -> None:
    """:class:`UserError` when the fp32 model itself computes NaN or infinite logits on ``images`` (weights that
    overflow): no quantization can be measured against it."""
    with torch.no_grad():
        logits = model(images)
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).any(dim=-1).sum()) if logits.dim() > 1 else len(logits)
        raise UserError(f"the fp32 model itself produces non-finite logits (NaN or infinity) on {bad} of "
                        f"{len(images)} test images: its weights overflow; retrain it or pass another --ckpt")


def _context(cfg: QuantizeConfig, ckpt_path: Path, stack: contextlib.ExitStack) -> RunContext:
    """Load the fp32 checkpoint once and set up data, Trainer and folders (this run's report folder is
    claimed for as long as ``stack`` is open)."""
    # One load: prepare() and builtin_ptq() deep-copy the float model, so every variant starts from it intact.
    classifier = load_classifier(ckpt_path)
    classifier.model.eval()
    arch = Arch.from_dict(classifier.hparams.arch, str(ckpt_path))
    source = {"model": arch.model, "data": arch.data, "weights": weights_fingerprint(classifier.model)}
    _check_before_work(cfg, ckpt_path, classifier.model, source)
    run_dir = ckpt_path.parent
    prepare_output_dir(run_dir, "the checkpoint's run folder")
    train_cfg, dm = evaluation_data(ckpt_path, arch, cfg.batch_size, cfg.calib_batches)
    data_settings = {k: getattr(train_cfg, k) for k in DATA_SETTINGS}
    example = next(iter(dm.test_dataloader()))[0]
    check_finite_outputs(classifier.model, example)
    out_dir = stack.enter_context(claimed_report_dir(run_dir / "quantize", cfg.name))
    return RunContext(cfg, classifier, arch, data_settings, source, dm, example, build_eval_trainer(cfg), run_dir,
                      out_dir)


def add_ptq_rows(ctx: RunContext, report: Report, sweep_bits: list[int] | None, observers: list[str] | None) -> None:
    """Our PTQ rows (one per point of the sweep) with their export rows; each point's quantized checkpoint is
    kept for a single-point run (``--eval`` and QAT resume read it), and for a sweep with ``--save-checkpoints``."""
    cfg = ctx.cfg
    points = ptq_points(cfg, sweep_bits, observers)
    keep = not is_sweep(sweep_bits, observers) or cfg.save_checkpoints
    for point in points:
        row, correct, model, reused = ptq_row(ctx, point, cfg.stats_file if len(points) == 1 else None)
        report.add(row, correct)
        report.describe(model)
        if keep and ctx.is_global_zero and not reused:
            save_quantized(ctx.out_dir / f"{point.stem}.ckpt", model, point.plan, ctx.arch, ctx.data_settings,
                           row.to_dict(), source=ctx.source)
            ctx.publish(f"{point.stem}.ckpt")
        add_deploy_rows(ctx, report, row, model, point.stem)


def add_qat_rows(ctx: RunContext, report: Report) -> None:
    """Our QAT row (saved as ``qat-w<W>a<A>.ckpt``) with its export rows, then torch.ao's QAT row."""
    cfg = ctx.cfg
    qat = run_qat(cfg, ctx.classifier, ctx.arch, ctx.dm, ctx.run_dir)
    row, correct = qat_row(ctx, qat)
    report.add(row, correct)
    report.describe(qat.model)
    if ctx.is_global_zero:
        save_quantized(ctx.out_dir / f"{qat.run_dir.name}.ckpt", qat.model, qat.plan, ctx.arch, ctx.data_settings,
                       row.to_dict(), kind="qat", source=ctx.source)
        ctx.publish(f"{qat.run_dir.name}.ckpt")
    add_deploy_rows(ctx, report, row, qat.model, qat.run_dir.name)
    if cfg.builtin_qat:
        report.add(*builtin_qat_row(ctx))


def write_outputs(ctx: RunContext, report: Report, pairs: list[RowPair], sweep_bits: list[int] | None) -> None:
    """The report in the run's own folder, copied to ``<run>/report.json`` / ``report.csv`` (the newest),
    and the sweep's plot."""
    rows = report.dicts()
    write_report(rows, ctx.out_dir, pairs, report.layers)
    for name in ("report.json", "report.csv"):
        ctx.publish(name)
    if sweep_bits and len(sweep_bits) > 1:
        plot_sweep(rows, ctx.out_dir / "accuracy_vs_bits.png")


def run_quantize(cfg: QuantizeConfig, sweep_bits: list[int] | None = None,
                 observers: list[str] | None = None) -> QuantizeResult:
    """Run ``cfg.mode`` on the checkpoint: the report rows, ours-against-torch.ao pairs and where they went.

    ``sweep_bits`` (ptq mode) quantizes weights and activations at each width in turn, with each activation
    observer of ``observers`` (default: ``cfg.act_observer``), and plots top-1 against bits.
    """
    ckpt_path = find_checkpoint(cfg.ckpt, cfg.checkpoint_dir)
    with contextlib.ExitStack() as stack:
        ctx = _context(cfg, ckpt_path, stack)
        report = Report()
        report.add(*ctx.evaluate("fp32", ctx.float_model, backend="float", weight_bits=32, act_bits=32,
                                 note="fp32 checkpoint"))
        mixed = None
        if cfg.sensitivity or cfg.max_drop is not None:
            mixed = run_mixed(ctx, report, sweep_bits or [])
        elif cfg.mode in ("ptq", "compare", "qat"):
            add_ptq_rows(ctx, report, sweep_bits, observers)
        if cfg.mode == "qat":
            add_qat_rows(ctx, report)
        elif cfg.mode == "dynamic":
            report.add(*dynamic_row(ctx))
        elif cfg.mode == "half":
            report.add(*half_row(ctx))
        else:  # torch.ao static int8: --backend, or with compare every backend that runs on this CPU
            for row, correct in builtin_ptq_rows(ctx):
                report.add(row, correct)
        pairs = report.pairs()
        if ctx.is_global_zero:
            write_outputs(ctx, report, pairs, None if mixed is not None else sweep_bits)
        return QuantizeResult(report.dicts(), pairs, ctx.run_dir, ctx.out_dir, ctx.is_global_zero, report.layers, mixed,
                              report.messages)
