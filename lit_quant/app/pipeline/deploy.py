"""Export rows of one fake-quant result (``--export int8 / integer / onnx / pt2e / executorch``) and ``--explain``: each
deployed model is evaluated on the same test split and its note says how far it is from the fake-quant row
it came from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lit_quant.deploy.graph import agreement, logit_gap, summarize_blockers
from lit_quant.deploy.int8 import export_int8, int8_blockers, reduce_range_note
from lit_quant.deploy.integer import IntegerEngine
from lit_quant.deploy.onnx_export import OnnxModel, export_onnx
from lit_quant.deploy.pack import save_deployed
from lit_quant.deploy.pt2e import export_pt2e, lower_x86, pt2e_blockers, save_pt2e
from lit_quant.deploy.pte import PteModel, export_executorch, xnnpack_blockers
from lit_quant.app.pipeline.context import RunContext, file_size
from lit_quant.app.pipeline.reference import ptq_backends
from lit_quant.app.pipeline.rows import Report, Row


def add_deploy_rows(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, stem: str) -> None:
    """Add the ``--export`` rows of ``qmodel`` (whose own row is ``base``) to ``report``, and ``--explain``'s
    text and any overflow warning to its messages."""
    cfg = ctx.cfg
    if not (cfg.export or cfg.explain):
        return
    engine = IntegerEngine(qmodel, cfg.accum_bits, cfg.scale_approx_bits) \
        if cfg.explain or "integer" in cfg.export else None
    if cfg.explain and ctx.is_global_zero:
        report.messages.append(engine.explain(cfg.explain, ctx.example))
        engine.reset_stats()  # the overflow report covers the evaluation only
    bits = {"weight_bits": base.weight_bits, "act_bits": base.act_bits, "observer": base.observer}
    deployed = ctx.out_dir / f"{stem}-deploy.pt"
    if cfg.export and ctx.is_global_zero:
        save_deployed(deployed, qmodel, ctx.arch.to_dict(), ctx.data_settings)
        ctx.publish(deployed.name)
    if "int8" in cfg.export:
        _int8_rows(ctx, report, base, qmodel, bits)
    if "integer" in cfg.export:
        _integer_row(ctx, report, base, engine, qmodel, bits, file_size(deployed))
    if "onnx" in cfg.export:
        _onnx_row(ctx, report, base, qmodel, bits, stem)
    if "pt2e" in cfg.export:
        _pt2e_row(ctx, report, base, qmodel, bits, stem)
    if "executorch" in cfg.export:
        _executorch_row(ctx, report, base, qmodel, bits, stem)


def _int8_rows(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, bits: dict) -> None:
    """Our qparams on torch.ao's int8 kernels, per backend; a row with the reason where they cannot run it."""
    blockers = int8_blockers(qmodel)
    for backend in ptq_backends(ctx.cfg):
        if blockers:  # said in the table, not silently changed
            report.add(Row("int8-export", source=base.variant, backend=backend, **bits,
                           note=f"not expressible on {backend} int8 kernels: {summarize_blockers(blockers)}"))
            continue
        row, correct = ctx.evaluate("int8-export", export_int8(qmodel, backend), source=base.variant,
                                    backend=backend, **bits)
        caveat = reduce_range_note(qmodel, backend)
        row.note = (f"our qparams on torch.ao {backend} int8 kernels; fake-quant top-1 {base.top1:.2f} "
                    f"({row.top1 - base.top1:+.2f})" + (f"; {caveat}" if caveat else ""))
        report.add(row, correct)


def _integer_row(ctx: RunContext, report: Report, base: Row, engine: IntegerEngine, qmodel: torch.nn.Module,
                 bits: dict, size: int | None) -> None:
    """The integer-only reference engine, with its agreement with fake-quant and any accumulator overflow."""
    row, correct = ctx.evaluate("integer", engine, source=base.variant, backend="integer", size=size, timed=False,
                                **bits)
    check = agreement(engine, qmodel, ctx.dm.test_dataloader())
    over = engine.overflow_layers()
    overflow = "" if not over else (
        f"; ACCUMULATOR OVERFLOW (saturated) in {len(over)} layer(s): "
        + ", ".join(f"{n} needs {st.bits_needed} bits, {st.overflows} values" for n, st in list(over.items())[:3]))
    row.note = (f"integer-only engine, {engine.scale_bits}-bit multipliers; predictions differ from "
                f"fake-quant on {check['disagree']} of {check['images']} images, {logit_gap(check)}; "
                "size = packed deploy file; "
                "latency not timed (a reference, float64 integer containers)" + overflow)
    report.add(row, correct)
    if over and ctx.is_global_zero:
        accum = next(iter(over.values())).accum_bits
        report.messages.append(f"warning: accumulator overflow with --accum-bits {accum}: "
                               + ", ".join(f"{n} (needs {st.bits_needed} bits)" for n, st in over.items()))


def _file_row(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, bits: dict, variant: str,
              backend: str, path: Path, write: Callable[[], object], load: Callable[[], torch.nn.Module],
              describe: str, blocked: tuple[str, list[str]] = ("", [])) -> None:
    """One exported file's row: rank 0 writes ``path`` (``write``) and publishes it; every rank runs what
    ``load`` returns on the test split and compares it with the fake-quant ``qmodel``; ``describe`` starts the
    note. ``blocked``: a prefix and the reasons the target cannot express the plan; any reason gives a row that
    says why instead."""
    prefix, blockers = blocked
    if blockers:
        report.add(Row(variant, source=base.variant, backend=backend, **bits,
                       note=f"{prefix}: {summarize_blockers(blockers)}"))
        return
    if ctx.is_global_zero:
        write()
        ctx.publish(path.name)
    if ctx.trainer.world_size > 1:
        torch.distributed.barrier()  # the other ranks read the file rank 0 wrote
    model = load()
    row, correct = ctx.evaluate(variant, model, source=base.variant, backend=backend, size=file_size(path), **bits)
    check = agreement(model, qmodel, ctx.dm.test_dataloader())
    row.note = (f"{describe}; predictions differ from PyTorch fake-quant on {check['disagree']} image(s), "
                f"{logit_gap(check)}")
    report.add(row, correct)


def _onnx_row(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, bits: dict, stem: str) -> None:
    """The QDQ ONNX model run by onnxruntime."""
    path = ctx.out_dir / f"{stem}.onnx"
    _file_row(ctx, report, base, qmodel, bits, "onnx", "onnxruntime", path,
              lambda: export_onnx(qmodel, path, ctx.example, ctx.cfg.onnx_opset), lambda: OnnxModel(path),
              f"ONNX QDQ opset {ctx.cfg.onnx_opset}, onnxruntime CPU")


def _pt2e_row(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, bits: dict, stem: str) -> None:
    """The PT2E program (saved as ``<stem>.pt2``) compiled to x86 int8 kernels by Inductor."""
    path = ctx.out_dir / f"{stem}.pt2"
    blockers = pt2e_blockers(qmodel)
    program = None if blockers else export_pt2e(qmodel, ctx.example)  # every rank compiles its own copy
    _file_row(ctx, report, base, qmodel, bits, "pt2e", "inductor", path, lambda: save_pt2e(program, path),
              lambda: lower_x86(program),
              "torch.export program with PT2E quantize / dequantize ops, Inductor x86 int8 kernels",
              ("no PT2E form", blockers))


def _executorch_row(ctx: RunContext, report: Report, base: Row, qmodel: torch.nn.Module, bits: dict,
                    stem: str) -> None:
    """The ``.pte`` program with the XNNPACK delegate run by ``executorch.runtime``."""
    path = ctx.out_dir / f"{stem}.pte"
    _file_row(ctx, report, base, qmodel, bits, "executorch", "xnnpack", path,
              lambda: export_executorch(qmodel, ctx.example, path), lambda: PteModel(path),
              "ExecuTorch .pte, XNNPACK delegate, batch 1",
              ("not expressible in XNNPACK int8", xnnpack_blockers(qmodel)))
