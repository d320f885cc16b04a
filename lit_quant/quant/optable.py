"""The op table: everything lit-quant knows about each weight-free tensor op, in one entry per op.

Each :class:`OpDef` records the op's module and its functional forms (what tracing rewrites into that
module), whether its output gets its own quantizer or stays on its input's grid, whether it is a ReLU that
the layer or ``add`` before it absorbs, and how each exporter emits it (the ONNX op, the torch.ao
``quantized::`` kernel, whether the integer-only engine computes it). Tracing (:mod:`lit_quant.quant.graph`),
``prepare``, the summary table, the exporters in :mod:`lit_quant.deploy` and the docs' coverage table all
read :data:`OPS`; adding an op is adding an entry here (and its tests). Conv2d / Linear, which carry
weights, are the quantized layers of :mod:`lit_quant.quant.layers`, not entries.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lit_quant.quant.ops import Add, Cat, MatMul, Mean, Mul

Build = Callable[[dict[str, Any]], "nn.Module | None"]


def _no_attrs(module: nn.Module) -> dict[str, Any]:
    return {}


def _no_args(module: nn.Module) -> tuple[Any, ...]:
    return ()


@dataclass(frozen=True)
class OpDef:
    """One op of the table.

    Attributes:
        name: the op's name; a functional call becomes a module named after it (``layer1.0.add``).
        module: the module computing it (a ``torch.nn`` module, or one of :mod:`lit_quant.quant.ops`).
        forms: functions and ``Tensor`` method names that compute it; tracing rewrites each call into a
            ``module`` call.
        params: the forms' argument names after the tensor input, in order (for unary forms).
        form_params: forms whose arguments differ from ``params`` (``torch.softmax`` has no ``_stacklevel``).
        build: ``module`` from the bound constant arguments, or None when that call has no module equivalent
            (default: ``module(**arguments)`` without ``inplace``).
        arity: ``unary`` (one tensor), ``binary`` (two tensors), ``list`` (a list of tensors, as ``torch.cat``)
            or ``norm`` (a layer norm with its parameters: tracing builds the module around them).
        quantized: whether its output gets its own quantizer; False for ops that keep integers on their input's
            grid (max pooling, flatten, identity, dropout).
        relu: for a ReLU-like op, its output range ``(low, high)`` (None: unbounded); such an op is fused into
            the layer or ``add`` before it, and that producer's accumulator is requantized into this range.
        absorbs_relu: whether a following ``relu`` op fuses into this one (``add`` + ReLU is one integer op).
        onnx: the ONNX op that computes it; the ONNX exporter writes an op newer than the chosen opset, or one
            ONNX does not have (``SiLU``), as its formula.
        onnx_attrs: the ONNX node's attributes from the module; raises ``ValueError`` for a configuration ONNX
            cannot express.
        onnx_inputs: constant ONNX inputs after the data inputs, from the module (the clip bounds, the norm's
            weight and bias).
        int8_kernel: the torch.ao ``quantized::`` kernel that takes the output scale and zero point, called as
            ``kernel(*inputs, *int8_args(module), scale, zero_point)``; None: the int8 model dequantizes,
            computes the float op and quantizes with the output qparams (what fake quantization computes).
        int8_args: the kernel's arguments from the module.
        integer: whether the integer-only engine computes it in integers.
    """

    name: str
    module: type[nn.Module]
    forms: tuple[Any, ...] = ()
    params: tuple[str, ...] = ()
    form_params: dict[Any, tuple[str, ...]] = field(default_factory=dict)
    build: Build | None = None
    arity: Literal["unary", "binary", "list", "norm"] = "unary"
    quantized: bool = True
    relu: tuple[float, float | None] | None = None
    absorbs_relu: bool = False
    onnx: str | None = None
    onnx_attrs: Callable[[nn.Module], dict[str, Any]] = field(default=_no_attrs)
    onnx_inputs: Callable[[nn.Module], tuple[torch.Tensor, ...]] = field(default=_no_args)
    int8_kernel: str | None = None
    int8_args: Callable[[nn.Module], tuple[Any, ...]] = field(default=_no_args)
    integer: bool = False

    def bind(self, form: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments after the tensor input of a call ``form(x, *args, **kwargs)``, by name."""
        return {**dict(zip(self.form_params.get(form, self.params), args)), **kwargs}

    def make(self, kwargs: dict[str, Any]) -> nn.Module | None:
        """The module computing a form's call with constant arguments ``kwargs`` (from :meth:`bind`)."""
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        return self.build(kw) if self.build is not None else self.module(**kw)


_POOL_AVG = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_POOL_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _max_pool(kw: dict[str, Any]) -> nn.Module | None:
    return None if kw.get("return_indices") else nn.MaxPool2d(**kw)


def _mean(kw: dict[str, Any]) -> nn.Module | None:
    if kw.get("dim") is None or kw.get("dtype") is not None:
        return None
    return Mean(kw["dim"], bool(kw.get("keepdim", False)))


def _softmax(kw: dict[str, Any]) -> nn.Module | None:
    kw.pop("_stacklevel", None)
    return nn.Softmax(kw["dim"]) if kw.get("dim") is not None and kw.get("dtype") is None and len(kw) <= 2 else None


def pair(v: Any) -> list[int]:
    """An int or a pair (torch's kernel, stride, padding arguments) as a two-element list."""
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _avg_pool_attrs(m: nn.AvgPool2d) -> dict[str, Any]:
    if m.divisor_override is not None:
        raise ValueError("AvgPool2d with divisor_override cannot be exported; remove it")
    kernel = pair(m.kernel_size)
    return {"kernel_shape": kernel, "strides": pair(m.stride or kernel), "pads": pair(m.padding) * 2,
            "ceil_mode": int(m.ceil_mode), "count_include_pad": int(m.count_include_pad)}


def _global_pool_attrs(m: nn.AdaptiveAvgPool2d) -> dict[str, Any]:
    if m.output_size not in (1, (1, 1), [1, 1]):
        raise ValueError(f"AdaptiveAvgPool2d({m.output_size}) cannot be exported; only output size 1 "
                         "(global average pooling)")
    return {}


def _norm_inputs(m: nn.LayerNorm) -> tuple[torch.Tensor, ...]:
    shape = tuple(m.normalized_shape)
    weight = m.weight.detach() if m.weight is not None else torch.ones(shape)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(shape)
    return weight.cpu().float(), bias.cpu().float()


_INPLACE = ("inplace",)

#: Every weight-free op lit-quant traces, quantizes and exports, by name.
OPS: tuple[OpDef, ...] = (
    # ReLU-likes: fused into the layer / add before them
    OpDef("relu", nn.ReLU, (F.relu, torch.relu, "relu", "relu_"), _INPLACE, relu=(0.0, None),
          onnx="Relu", integer=True),
    OpDef("relu6", nn.ReLU6, (F.relu6,), _INPLACE, relu=(0.0, 6.0), onnx="Clip",
          onnx_inputs=lambda m: (torch.tensor(0.0), torch.tensor(6.0)), integer=True),
    # arithmetic
    OpDef("add", Add, (operator.add, operator.iadd, torch.add, "add", "add_"), arity="binary", absorbs_relu=True,
          onnx="Add", int8_kernel="add", integer=True),
    OpDef("mul", Mul, (operator.mul, operator.imul, torch.mul, "mul", "mul_"), arity="binary", onnx="Mul",
          int8_kernel="mul"),
    OpDef("matmul", MatMul, (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"), arity="binary",
          onnx="MatMul", int8_kernel="matmul"),
    OpDef("cat", Cat, (torch.cat, torch.concat, torch.concatenate), ("dim",), arity="list", onnx="Concat",
          onnx_attrs=lambda m: {"axis": int(m.dim)}, int8_kernel="cat", int8_args=lambda m: (m.dim,), integer=True),
    # activations
    OpDef("hardswish", nn.Hardswish, (F.hardswish,), _INPLACE, onnx="HardSwish", int8_kernel="hardswish"),
    OpDef("hardsigmoid", nn.Hardsigmoid, (F.hardsigmoid,), _INPLACE, onnx="HardSigmoid",
          onnx_attrs=lambda m: {"alpha": 1.0 / 6.0, "beta": 0.5}),  # torch's clip(x / 6 + 1/2, 0, 1)
    OpDef("silu", nn.SiLU, (F.silu,), _INPLACE, onnx="SiLU"),
    OpDef("sigmoid", nn.Sigmoid, (torch.sigmoid, F.sigmoid, "sigmoid"), onnx="Sigmoid"),
    OpDef("tanh", nn.Tanh, (torch.tanh, F.tanh, "tanh"), onnx="Tanh"),
    OpDef("elu", nn.ELU, (F.elu,), ("alpha", "inplace"), onnx="Elu",
          onnx_attrs=lambda m: {"alpha": float(m.alpha)}),
    OpDef("mish", nn.Mish, (F.mish,), _INPLACE, onnx="Mish"),
    OpDef("gelu", nn.GELU, (F.gelu,), ("approximate",), onnx="Gelu",
          onnx_attrs=lambda m: {"approximate": m.approximate}),
    OpDef("softmax", nn.Softmax, (F.softmax, torch.softmax, "softmax"), ("dim", "_stacklevel", "dtype"),
          {torch.softmax: ("dim", "dtype"), "softmax": ("dim", "dtype")}, _softmax, onnx="Softmax",
          onnx_attrs=lambda m: {"axis": int(m.dim)}, int8_kernel="softmax",
          int8_args=lambda m: (m.dim,)),
    OpDef("layer_norm", nn.LayerNorm, (F.layer_norm,), arity="norm", onnx="LayerNormalization",
          onnx_attrs=lambda m: {"axis": -len(m.normalized_shape), "epsilon": float(m.eps)}, onnx_inputs=_norm_inputs,
          int8_kernel="layer_norm", int8_args=lambda m: (list(m.normalized_shape), m.weight, m.bias, m.eps)),
    # reductions and pooling
    OpDef("mean", Mean, (torch.mean, "mean"), ("dim", "keepdim", "dtype"), build=_mean, onnx="ReduceMean",
          onnx_attrs=lambda m: {"axes": [m.dim] if isinstance(m.dim, int) else list(m.dim),
                                "keepdims": int(m.keepdim)}),
    OpDef("avg_pool2d", nn.AvgPool2d, (F.avg_pool2d,), _POOL_AVG, onnx="AveragePool", onnx_attrs=_avg_pool_attrs,
          integer=True),
    OpDef("adaptive_avg_pool2d", nn.AdaptiveAvgPool2d, (F.adaptive_avg_pool2d,), ("output_size",),
          onnx="GlobalAveragePool", onnx_attrs=_global_pool_attrs, integer=True),
    # integers stay on their input's grid
    OpDef("max_pool2d", nn.MaxPool2d, (F.max_pool2d,), _POOL_MAX, build=_max_pool, quantized=False),
    OpDef("flatten", nn.Flatten, quantized=False),
    OpDef("identity", nn.Identity, quantized=False),
    OpDef("dropout", nn.Dropout, quantized=False),
)

#: Functions that only move integers around (reshape, index, split): the tensor stays on its grid.
SHAPE_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    torch.flatten, torch.reshape, operator.getitem, torch.transpose, torch.chunk, torch.permute, torch.squeeze,
    torch.unsqueeze, F.dropout)
#: ``Tensor`` methods that only move integers around.
SHAPE_METHODS: tuple[str, ...] = ("flatten", "reshape", "view", "contiguous", "transpose", "permute", "squeeze",
                                  "unsqueeze", "expand", "chunk", "split")

#: Modules whose output gets its own quantizer (a :class:`lit_quant.quant.layers.QuantOutput` wraps them).
OUTPUT_TYPES: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS if op.quantized)
#: Modules that keep an integer tensor on its input's grid (monotone or shape-only): not quantized again.
PASSTHROUGH_TYPES: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS if not op.quantized)
#: ReLU-like modules, fused into the layer or ``add`` before them.
RELU_TYPES: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS if op.relu is not None)
#: Op modules (besides Conv2d / Linear / BatchNorm) that absorb a following ReLU.
RELU_ABSORBING_TYPES: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS if op.absorbs_relu)
#: Every op module: a trace never enters them.
OP_TYPES: tuple[type[nn.Module], ...] = tuple(op.module for op in OPS)

_BY_TYPE: dict[type[nn.Module], OpDef] = {op.module: op for op in OPS}
#: Each form (function or method name) -> its op.
FORMS: dict[Any, OpDef] = {form: op for op in OPS for form in op.forms}


def op_of(module: nn.Module) -> OpDef | None:
    """The table entry of ``module`` (by exact class, then by base class), or None."""
    entry = _BY_TYPE.get(type(module))
    if entry is None:
        entry = next((op for op in OPS if isinstance(module, op.module)), None)
    return entry
