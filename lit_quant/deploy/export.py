"""One call from a quantized model to a deployed one: :func:`export_quantized`.

It takes what the library produces: a :class:`QuantizedModel` from :func:`lit_quant.quant.prepare`, or a
user's LightningModule after :class:`lit_quant.PTQCalibration` or :class:`lit_quant.QATCallback` replaced its
network by one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lit_quant.deploy.graph import ExportError
from lit_quant.quant.preparation import QuantizedModel

#: What :func:`export_quantized` writes: a file per target, or (``int8``) a module in memory.
TARGETS: tuple[str, ...] = ("pt2e", "executorch", "onnx", "int8")


def quantized_network(model: nn.Module) -> QuantizedModel:
    """The one :class:`QuantizedModel` in ``model`` (``model`` itself, or the network a callback quantized).

    Raises:
        ExportError: none (the model is not quantized yet), or several (a network of several modules, which
            export one by one).
    """
    if isinstance(model, QuantizedModel):
        return model
    found = [name for name, m in model.named_modules() if isinstance(m, QuantizedModel)
             and not any(name.startswith(f"{other}.") for other, o in model.named_modules()
                         if isinstance(o, QuantizedModel) and other != name)]
    if not found:
        raise ExportError(f"{type(model).__name__} holds no quantized network: run PTQCalibration or QATCallback "
                          "(or lit_quant.prepare and calibrate) first")
    if len(found) > 1:
        raise ExportError(f"{type(model).__name__} holds {len(found)} quantized modules ({', '.join(found)}): "
                          "export each one (export_quantized(model.<name>, ...))")
    return model.get_submodule(found[0])


def export_quantized(model: nn.Module, target: str, example: torch.Tensor, path: str | Path | None = None,
                     backend: str = "x86") -> Path | nn.Module:
    """Deploy the quantized network of ``model`` (:func:`quantized_network`) to ``target``, on inputs shaped
    like ``example`` (a batch):

    * ``pt2e``: a ``torch.export`` program with PT2E quantize / dequantize ops, written to ``path``
      (:func:`lit_quant.deploy.pt2e.export_pt2e`; :func:`lit_quant.deploy.pt2e.lower_x86` compiles a loaded one
      to int8 kernels);
    * ``executorch``: a ``.pte`` program with the XNNPACK delegate, written to ``path``
      (:func:`lit_quant.deploy.pte.export_executorch`);
    * ``onnx``: a QDQ ONNX model, written to ``path`` (:func:`lit_quant.deploy.onnx_export.export_onnx`);
    * ``int8``: torch.ao int8 kernels for ``backend``, returned as a module (no file).

    Returns the path written, or the int8 module.

    Raises:
        ExportError: an unknown target, a missing path, a missing optional package (with its pip command), or
            what the target cannot express (one line naming it).
    """
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}; choose from {', '.join(TARGETS)}")
    qmodel = quantized_network(model)
    was_training = qmodel.training
    qmodel.eval()
    try:
        if target == "int8":
            from lit_quant.deploy.int8 import export_int8

            return export_int8(qmodel, backend)
        if path is None:
            raise ExportError(f"export_quantized(..., {target!r}) writes a file: pass path=")
        if target == "pt2e":
            from lit_quant.deploy.pt2e import export_pt2e, save_pt2e

            return save_pt2e(export_pt2e(qmodel, example), path)
        if target == "executorch":
            from lit_quant.deploy.pte import export_executorch

            return export_executorch(qmodel, example, path)
        from lit_quant.deploy.onnx_export import export_onnx

        return export_onnx(qmodel, path, example)
    finally:
        qmodel.train(was_training)
