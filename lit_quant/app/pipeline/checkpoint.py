"""The quantized-checkpoint format (``ptq-w<W>a<A>.ckpt`` / ``qat-w<W>a<A>.ckpt``): self-contained files
that rebuild a calibrated model without the fp32 checkpoint and without calibrating again.

Payload: ``{"lit_quant": "ptq" | "qat", "arch", "data", "plan", "state_dict", "row", "source"}``, read
weights-only (a file from elsewhere runs no code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lit_quant.app.config import TrainConfig
from lit_quant.errors import UserError
from lit_quant.io import atomic_write
from lit_quant.app.pipeline.context import build_eval_trainer, evaluate_on_test
from lit_quant.quant import QuantError, QuantPlan, enable_fake_quant, enable_observer, prepare
from lit_quant.safe_load import load_checkpoint
from lit_quant.app.training import Arch, build_datamodule, model_from_arch, state_dict_mismatch


def save_quantized(path: Path, model: torch.nn.Module, plan: QuantPlan, arch: Arch,
                   data: dict[str, Any], row: dict[str, Any], kind: str = "ptq",
                   source: dict[str, Any] | None = None) -> None:
    """Write a self-contained quantized checkpoint: architecture, data settings, plan, calibrated state dict,
    its report row and ``source`` (model, data set and fp32 weights fingerprint it was made from).

    The plan and the qparams (buffers of the quantizers) travel in the file, so :func:`evaluate_quantized`
    rebuilds the model without the fp32 checkpoint and without calibrating again.
    """
    payload = {"lit_quant": kind, "arch": arch.to_dict(), "data": data, "plan": plan.to_dict(),
               "state_dict": model.state_dict(), "row": row, "source": dict(source or {})}
    atomic_write(path, lambda fh: torch.save(payload, fh))


#: The training run's settings a quantized checkpoint records (``data``): what rebuilds its test split.
DATA_SETTINGS = ("data", "data_dir", "split_seed", "val_fraction", "fake_size", "model", "image_size", "small_input")
_PAYLOAD_KEYS = ("lit_quant", "arch", "data", "plan", "state_dict", "row", "source")


def load_quantized(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`; :class:`UserError` with one line naming the field
    when it is not one, or is malformed (its architecture, data settings and plan are checked before any
    model is built)."""
    path = Path(path)
    payload = load_checkpoint(path, "quantized checkpoint")  # weights-only: a file from elsewhere runs no code
    if not isinstance(payload, dict) or payload.get("lit_quant") not in ("ptq", "qat"):
        if isinstance(payload, dict) and "hyper_parameters" in payload:
            raise UserError(f"{path} is an fp32 training checkpoint: quantize it with --ckpt; --eval takes the "
                            "ptq-w*a*.ckpt / qat-w*a*.ckpt quantize.py writes")
        raise UserError(f"{path} is not a quantized checkpoint written by quantize.py (an fp32 one goes to --ckpt)")
    missing = [k for k in _PAYLOAD_KEYS if k not in payload]
    if missing:
        raise UserError(f"{path}: quantized checkpoint without {', '.join(missing)}")
    arch = Arch.from_dict(payload["arch"], str(path))
    data = payload["data"]
    unknown = sorted(set(data) - set(DATA_SETTINGS)) if isinstance(data, dict) else ["(not a mapping)"]
    if unknown:
        raise UserError(f"{path}: unknown data setting(s) {', '.join(unknown)}; allowed: {', '.join(DATA_SETTINGS)}")
    try:
        plan = QuantPlan.from_dict(payload["plan"])
    except QuantError as exc:
        raise UserError(f"{path}: its plan is invalid: {exc}") from None
    model = prepare(model_from_arch(arch).eval(), plan, qat=payload["lit_quant"] == "qat")
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


def evaluate_quantized(path: str | Path, batch_size: int) -> dict[str, Any]:
    """Top-1 / top-5 of a saved quantized checkpoint on its data set's test split (no calibration)."""
    model, payload = load_quantized(path)
    dm = build_datamodule(TrainConfig(**payload["data"], batch_size=batch_size, progress=False))
    metrics, _ = evaluate_on_test(build_eval_trainer(), model, payload["arch"]["num_classes"], dm)
    return payload["row"] | {"variant": f"{payload['lit_quant']} (reloaded)"} | metrics
