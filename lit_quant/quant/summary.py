"""What a prepared model quantizes, op by op: the per-layer table ``quantize.py`` prints and ``report.json``
holds, so that whatever stays float is visible.

Each compute op of the traced graph is one :class:`OpSummary`, in execution order. Ops that only move
values (reshapes, max pooling, flatten, identity, dropout) keep their input's grid and are not listed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lit_quant.quant.fake_quant import FakeQuantize
from lit_quant.quant.graph import tensor_nodes
from lit_quant.quant.layers import QuantOutput, QuantWeightLayer
from lit_quant.quant.optable import PASSTHROUGH_TYPES, RELU_TYPES, SHAPE_FUNCTIONS, SHAPE_METHODS
from lit_quant.quant.preparation import QuantizedModel, is_ao_stub, output_layer


@dataclass(frozen=True)
class OpSummary:
    """One op of the prepared model.

    Attributes:
        name: module path (the name plans use) or, for a functional op left in the graph, its node name.
        op: the float op (``Conv2d``, ``ReLU``, ``add`` ...).
        weight_bits: bits of its weight; None when it has no weight or keeps a float one.
        act_bits: bits of its output; None when the output is not quantized here.
        status: ``quantized``; ``fused``, an accumulator the quantized ReLU after it requantizes (conv + relu,
            add + relu: one integer op); ``float output``, the logits layer: integer weights and input, its
            accumulator dequantized to the model's float output; or ``float``.
    """

    name: str
    op: str
    weight_bits: int | None
    act_bits: int | None
    status: str

    def to_dict(self) -> dict[str, Any]:
        """The op as ``report.json``'s ``layers`` list holds it."""
        return asdict(self)


def _bits(fq: FakeQuantize | None) -> int | None:
    return None if fq is None else int(fq.spec.bits)


def summarize(qmodel: QuantizedModel) -> list[OpSummary]:
    """The ops of ``qmodel`` in execution order (see the module docstring)."""
    gm = qmodel.model
    tensors = tensor_nodes(gm.graph)
    logits = output_layer(gm)
    rows: list[OpSummary] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node in tensors and not rows:
                fq = qmodel.input_quant
                rows.append(OpSummary("input", "input", None, _bits(fq), "quantized" if fq else "float"))
            continue
        if node.op == "call_module":
            row = _module_row(gm, node, logits)
            if row is not None:
                rows.append(row)
        elif node.op in ("call_function", "call_method") and node in tensors:
            if node.target in SHAPE_FUNCTIONS or node.target in SHAPE_METHODS:
                continue
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            rows.append(OpSummary(node.name, str(name), None, None, "float"))
    return rows


def _requantized_by_relu(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node``'s only reader (past a folded BatchNorm's identity) is a quantized ReLU (conv + relu,
    add + relu: one integer op)."""
    while True:
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            return False
        node = users[0]
        reader = gm.get_submodule(str(node.target))
        if type(reader) is not nn.Identity:
            return isinstance(reader, QuantOutput) and isinstance(reader.module, RELU_TYPES)


def _module_row(gm: torch.fx.GraphModule, node: torch.fx.Node, logits: str | None) -> OpSummary | None:
    name = str(node.target)
    module = gm.get_submodule(name)
    if isinstance(module, PASSTHROUGH_TYPES):
        return None
    if isinstance(module, QuantWeightLayer):
        op = type(module).__name__.removeprefix("Quant")
        weight, act = _bits(module.weight_quant), _bits(module.act_quant)
        if act is not None:
            status = "quantized"
        elif weight is not None and _requantized_by_relu(gm, node):
            status = "fused"
        elif weight is not None and name == logits:
            status = "float output"
        else:
            status = "float"
        return OpSummary(name, op, weight, act, status)
    if isinstance(module, QuantOutput):
        inner = module.module
        return OpSummary(name, "QuantStub" if is_ao_stub(inner) else type(inner).__name__, None,
                         _bits(module.act_quant), "quantized")
    return OpSummary(name, type(module).__name__, None, None,
                     "fused" if _requantized_by_relu(gm, node) else "float")
