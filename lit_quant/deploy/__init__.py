"""Deployment of a quantized model: real torch.ao int8 modules from our qparams (:mod:`.int8`), the
integer-only reference engine (:mod:`.integer`) and ONNX QuantizeLinear / DequantizeLinear export
(:mod:`.onnx_export`). All read the dataflow from :func:`lit_quant.deploy.graph.deploy_graph`."""

from lit_quant.deploy.graph import ExportError, Step, agreement, deploy_graph

__all__ = ["ExportError", "Step", "agreement", "deploy_graph"]
