"""The deployed model file: integer weights packed to their width, qparams, and how to rebuild the model.

Layout (one ``torch.save`` dict, few tensors so per-tensor overhead stays small):

* ``weights``: one ``uint8`` buffer; each layer's integers stored as ``u = q - quant_min`` (never negative),
  two per byte (low nibble first) for widths up to 4 bits, one byte up to 8 bits, two bytes (little endian)
  up to 16 bits;
* ``floats``: one ``float32`` buffer with every weight scale, bias and activation scale;
* ``ints``: one ``int32`` buffer with every zero point;
* ``index``: per tensor, its offsets and shape; plus ``arch``, ``plan``, ``data`` to rebuild the module tree.

:func:`load_deployed` returns the calibrated :class:`QuantizedModel` (weights on the integer grid, qparams
restored, fake quant on), from which every exporter (int8 kernels, integer engine, ONNX) runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_quant.deploy.graph import ExportError, layer_weight
from lit_quant.errors import UserError
from lit_quant.io import atomic_write
from lit_quant.quant import QuantPlan, enable_fake_quant, enable_observer, iter_quantizers, prepare
from lit_quant.quant.functional import QuantizedTensor, dequantize
from lit_quant.quant.layers import QuantWeightLayer
from lit_quant.quant.preparation import QuantizedModel
from lit_quant.safe_load import load_checkpoint

FORMAT = "lit_quant-deploy-1"


def bytes_per_value(bits: int) -> float:
    """Storage of one integer of ``bits``: 1/2 byte up to 4 bits, 1 up to 8, 2 up to 16."""
    return 0.5 if bits <= 4 else 1.0 if bits <= 8 else 2.0


def pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers ``u`` (``0 <= u < 2^bits``) as a flat ``uint8`` tensor (see the module docstring)."""
    flat = u.reshape(-1).long()
    if bits <= 4:
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        return (flat[0::2] | (flat[1::2] << 4)).to(torch.uint8)
    if bits <= 8:
        return flat.to(torch.uint8)
    return torch.stack([flat & 0xFF, flat >> 8], 1).reshape(-1).to(torch.uint8)


def unpack(data: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` unsigned integers (int64)."""
    d = data.long()
    if bits <= 4:
        return torch.stack([d & 0xF, d >> 4], 1).reshape(-1)[:count]
    if bits <= 8:
        return d[:count]
    return (d[0::2] | (d[1::2] << 8))[:count]


class _Writer:
    def __init__(self) -> None:
        self.bytes: list[torch.Tensor] = []
        self.floats: list[torch.Tensor] = []
        self.ints: list[torch.Tensor] = []
        self.n_bytes = self.n_floats = self.n_ints = 0

    def add_bytes(self, t: torch.Tensor) -> int:
        self.bytes.append(t)
        self.n_bytes += t.numel()
        return self.n_bytes - t.numel()

    def add_floats(self, t: torch.Tensor) -> list[int]:
        t = t.detach().float().reshape(-1).cpu()
        self.floats.append(t)
        self.n_floats += t.numel()
        return [self.n_floats - t.numel(), t.numel()]

    def add_ints(self, t: torch.Tensor) -> list[int]:
        t = t.detach().to(torch.int32).reshape(-1).cpu()
        self.ints.append(t)
        self.n_ints += t.numel()
        return [self.n_ints - t.numel(), t.numel()]


def save_deployed(path: str | Path, qmodel: QuantizedModel, arch: dict[str, Any], data: dict[str, Any] | None = None
                  ) -> int:
    """Write ``qmodel`` as a deployed file (atomically); returns its size in bytes."""
    w = _Writer()
    layers: dict[str, Any] = {}
    for name, module in qmodel.model.named_modules():
        if not isinstance(module, QuantWeightLayer):
            continue
        if module.weight_quant is None:
            raise ExportError(f"layer {name} has float weights; the deployed file holds integer layers only")
        qw = layer_weight(module)
        bits = int(module.weight_quant.spec.bits)
        u = qw.int_repr.long() - qw.quant_min
        bias = module.float_bias()
        layers[name] = {"shape": list(qw.int_repr.shape), "bits": bits, "quant_min": qw.quant_min,
                        "offset": w.add_bytes(pack(u, bits)), "scale": w.add_floats(qw.scale),
                        "zero_point": w.add_ints(qw.zero_point),
                        "bias": None if bias is None else w.add_floats(bias)}
    acts = {name: {"scale": w.add_floats(fq.scale), "zero_point": w.add_ints(fq.zero_point)}
            for name, fq in iter_quantizers(qmodel, "act")}
    payload = {"lit_quant": FORMAT, "arch": dict(arch), "data": data or {}, "plan": qmodel.plan.to_dict(),
               "layers": layers, "acts": acts,
               "weights": torch.cat(w.bytes) if w.bytes else torch.zeros(0, dtype=torch.uint8),
               "floats": torch.cat(w.floats), "ints": torch.cat(w.ints)}
    atomic_write(Path(path), lambda fh: torch.save(payload, fh))
    return Path(path).stat().st_size


def load_deployed(path: str | Path, build_model: Callable[[dict[str, Any]], nn.Module]) -> tuple[QuantizedModel,
                                                                                             dict[str, Any]]:
    """Rebuild the quantized model of a file written by :func:`save_deployed` (and return the payload).

    ``build_model`` makes the untrained float model of the file's ``arch`` record (the application's
    ``lit_quant.app.training.model_from_arch`` for its own runs): the file holds weights and qparams, not code.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"deployed model {path} not found")
    try:
        payload = load_checkpoint(path, "deployed model")
    except UserError as exc:  # corrupt, not a torch file, or an object that could run code
        raise ExportError(str(exc)) from None
    if not isinstance(payload, dict) or payload.get("lit_quant") != FORMAT:
        raise ExportError(f"{path} is not a deployed model written by quantize.py --export")
    qmodel = prepare(build_model(payload["arch"]).eval(), QuantPlan.from_dict(payload["plan"]))
    floats, ints, data = payload["floats"], payload["ints"], payload["weights"]

    def f(ref: list[int]) -> torch.Tensor:
        return floats[ref[0]:ref[0] + ref[1]].clone()

    def i(ref: list[int]) -> torch.Tensor:
        return ints[ref[0]:ref[0] + ref[1]].clone()

    modules = dict(qmodel.model.named_modules())
    quantizers = dict(iter_quantizers(qmodel, "act"))
    if set(payload["layers"]) != {n for n, m in modules.items() if isinstance(m, QuantWeightLayer)} or \
            set(payload["acts"]) != set(quantizers):
        raise ExportError(f"{path}: its layers do not match its plan and architecture (file damaged?)")
    with torch.no_grad():
        for name, entry in payload["layers"].items():
            layer = modules[name]
            count = int(torch.tensor(entry["shape"]).prod())
            nbytes = int(-(-count * bytes_per_value(entry["bits"]) // 1))
            u = unpack(data[entry["offset"]:entry["offset"] + nbytes], entry["bits"], count)
            q = (u + entry["quant_min"]).reshape(entry["shape"])
            scale, zp = f(entry["scale"]), i(entry["zero_point"])
            spec = layer.weight_quant.spec
            layer.weight.copy_(dequantize(QuantizedTensor(q, scale, zp, spec.quant_min, spec.quant_max,
                                                          layer.weight_quant.axis)))
            if entry["bias"] is not None:
                layer.bias.copy_(f(entry["bias"]))
            layer.weight_quant.set_qparams(scale, zp)
        for name, entry in payload["acts"].items():
            quantizers[name].set_qparams(f(entry["scale"]), i(entry["zero_point"]))
    enable_observer(qmodel, False)
    enable_fake_quant(qmodel, True)
    return qmodel.eval(), payload
