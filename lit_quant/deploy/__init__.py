"""Deployment of a quantized model: real torch.ao int8 modules from our qparams (:mod:`.int8`), the
integer-only reference engine (:mod:`.integer`), ONNX QuantizeLinear / DequantizeLinear export
(:mod:`.onnx_export`) and the ``torch.export`` program in PT2E form that Inductor compiles to int8 kernels
(:mod:`.pt2e`). All read the dataflow from :func:`lit_quant.deploy.graph.deploy_graph`.

Names are resolved on first use (PEP 562), so that the torch-free :mod:`.options` loads no torch.
"""

from __future__ import annotations

from lit_quant.quant.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    **{name: "lit_quant.deploy.graph" for name in ("ExportError", "Step", "agreement", "deploy_graph")},
    "export_quantized": "lit_quant.deploy.export"}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
