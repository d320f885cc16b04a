"""Deployment of a quantized model: real torch.ao int8 modules from our qparams (:mod:`.int8`), the
integer-only reference engine (:mod:`.integer`) and ONNX QuantizeLinear / DequantizeLinear export
(:mod:`.onnx_export`). All read the dataflow from :func:`lit_quant.deploy.graph.deploy_graph`.

Names are resolved on first use (PEP 562), so that the torch-free :mod:`.options` loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {name: "lit_quant.deploy.graph" for name in ("ExportError", "Step", "agreement",
                                                                        "deploy_graph")}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
