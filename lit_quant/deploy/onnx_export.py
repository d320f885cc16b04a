"""ONNX export in QDQ form: QuantizeLinear / DequantizeLinear pairs around float operators.

The exported graph computes what the fake-quantized PyTorch model computes. Every integer tensor of the
deployed model (the :func:`lit_quant.deploy.graph.deploy_graph` steps) becomes a float value that went through
a ``QuantizeLinear`` / ``DequantizeLinear`` pair with the same qparams::

    q     = saturate(round_half_even(x / s) + z)       QuantizeLinear  (uint8 / int8, 16-bit at opset >= 21)
    x_hat = (q - z) * s                                DequantizeLinear

and every weight is stored as its integers (int8 initializer) with a ``DequantizeLinear`` (per output channel,
``axis=0``, for per-channel weights), so the file holds exactly the deployed integer weights. Conv / Gemm,
ReLU, Add and pooling run in float between the pairs, as in the fake-quant model; runtimes (onnxruntime,
TensorRT) may fuse the patterns into integer kernels.

Per step kind (see :mod:`lit_quant.deploy.graph`):

===============  ==========================================================================================
``input``        graph input ``input`` (float32, dynamic batch) -> fake-quantize with the input quantizer
``layer``        ``Conv`` / ``Gemm(transB=1)`` on ``DequantizeLinear(int8 weight)`` and the bias on its accumulator grid;
                 fake-quantized with the layer's ``act_quant``, or left as the accumulator a ReLU requantizes
``requant``      the op table's ONNX op (:data:`lit_quant.quant.optable.OPS`), then fake-quantize: ``Relu``,
                 ``Clip(0, 6)``, ``HardSwish``, ``Sigmoid``, ``Tanh``, ``Elu``, ``Softmax``, ``Concat``,
                 ... An op newer than the opset is written as its formula (``Gelu`` before opset 20 with
                 ``Erf`` / ``Tanh``, ``Mish`` before 18 as ``x Tanh(Softplus(x))``), SiLU always as
                 ``x * Sigmoid(x)``; ``LayerNormalization`` needs opset 17
``add``          ``Add`` (the sum a following ReLU requantizes)
``passthrough``  ``MaxPool``, ``Flatten``, ``Reshape``, ``Transpose``, ``Expand``, ``Slice`` / ``Gather``,
                 ``Split``: values stay on their input's grid
``shape``        nothing: the shapes of the reshapes that read it are written into the graph, a dimension
                 that follows the batch as a multiple of the input's batch size
``const``        an initializer (float32)
``output``       graph output ``logits`` (float32)
===============  ==========================================================================================

The static arguments of the reshapes (target shape, permutation, split sizes) come from running the
steps in PyTorch at two batch sizes, so the exported graph keeps a dynamic batch.

Where the integer range is narrower than the ONNX storage type (4-bit activations stored in uint8,
``narrow_range``), a ``Clip`` to ``[(qmin - z) s, (qmax - z) s]`` comes first: ``QuantizeLinear`` only
saturates to the type's range, and the clip makes it saturate to ``[qmin, qmax]`` instead.

The only numerical difference to the PyTorch model: ONNX divides ``x / s`` where our kernels multiply by
``1 / s`` (torch.ao's convention), which can move a value sitting on a rounding tie by one step, and float
accumulation order differs between runtimes; both show up as rare one-step differences.

``onnx`` and ``onnxruntime`` are imported inside the functions, so the package imports without them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_quant.deploy.graph import ExportError, Step, act_qparams, deploy_graph, layer_weight
from lit_quant.deploy.options import DEFAULT_OPSET
from lit_quant.io import atomic_write
from lit_quant.quant.fake_quant import enable_observer
from lit_quant.quant.functional import QParams
from lit_quant.quant.optable import op_of, pair
from lit_quant.quant.preparation import QuantizedModel

MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear (axis attribute) needs opset 13
MIN_OPSET_16BIT = 21  # int16 / uint16 QuantizeLinear / DequantizeLinear arrived in opset 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install onnx") from None
    return onnx


def check_opset(opset: int) -> None:
    """:class:`ExportError` unless ``MIN_OPSET <= opset <=`` the newest opset the installed onnx knows."""
    onnx = _import_onnx()
    newest = int(onnx.defs.onnx_opset_version())
    allowed = f"pass --onnx-opset {MIN_OPSET}..{newest}"
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"ONNX opset must be an integer, got {opset!r}; {allowed}")
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is too old: per-channel QuantizeLinear needs opset {MIN_OPSET} or "
                          f"newer; {allowed}")
    if opset > newest:
        raise ExportError(f"ONNX opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                          f"(up to {newest}); {allowed}")


#: Batch sizes the steps are run at: a dimension that differs between the two follows the batch.
_PROBE_BATCHES = (2, 3)


def _probe_values(qmodel: QuantizedModel, steps: list[Step], example: torch.Tensor) -> list[dict[str, Any]]:
    """Every step's value (a tensor, a tuple from ``chunk``, a number from a ``shape`` step) at each of the
    :data:`_PROBE_BATCHES`, from running the steps in PyTorch on zeros of the example's per-sample shape.

    A copy in eval mode with observers off, so exporting never feeds anything into the user's calibration
    statistics or BatchNorm running statistics.
    """
    model = copy.deepcopy(qmodel).eval()
    enable_observer(model, False)
    modules = dict(model.model.named_modules())
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    runs = []
    with torch.no_grad():
        for batch in _PROBE_BATCHES:
            values: dict[str, Any] = {}
            for step in steps:
                args = [values[name] for name in step.inputs]
                try:
                    if step.kind == "input":
                        values[step.name] = model.input_quant(torch.zeros(batch, *example.shape[1:], device=device))
                    elif step.kind == "const":
                        values[step.name] = step.value
                    elif step.module is not None:
                        values[step.name] = modules[step.target](*args)
                    elif step.kind != "output":
                        values[step.name] = step.call(values)
                except Exception as exc:  # e.g. a reshape that hard-codes the batch size
                    raise ExportError(f"{step.name} ({step.target}) fails at batch size {batch} ({exc}); ONNX "
                                      "export needs a model that takes any batch size") from exc
            runs.append(values)
    return runs


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


class _Builder:
    """Collects ONNX nodes and initializers; names every tensor after the step that makes it."""

    def __init__(self, onnx: Any, opset: int) -> None:
        self.onnx, self.helper, self.opset = onnx, onnx.helper, opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self._batch: str | None = None

    def const(self, name: str, array: np.ndarray) -> str:
        # np.array(order='C'), not np.ascontiguousarray: that turns a 0-d (per-tensor scalar) array into 1-d
        self.initializers.append(self.onnx.numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def batch(self) -> str:
        """The graph input's batch size as a 1-element int64 tensor (emitted on first use)."""
        if self._batch is None:
            name = f"{INPUT_NAME}.batch"
            shape = self.node("Shape", [INPUT_NAME], f"{INPUT_NAME}.shape")
            self._batch = self.node("Slice", [shape, self.const(f"{name}.start", np.array([0], np.int64)),
                                              self.const(f"{name}.end", np.array([1], np.int64))], name)
        return self._batch

    def shape(self, name: str, at: tuple[tuple[int, ...], ...], where: str) -> str:
        """An int64 shape tensor for a value of shape ``at[i]`` at batch size ``_PROBE_BATCHES[i]``: a dimension
        that grows with the batch is ``k * N`` (``N`` the graph input's batch), any other is a constant."""
        (sa, sb), (na, nb) = at, _PROBE_BATCHES
        parts: list[str] = []
        fixed: list[int] = []
        for i, (da, db) in enumerate(zip(sa, sb)):
            if da == db:
                fixed.append(da)
                continue
            if da % na or db * na != da * nb:
                raise ExportError(f"{where}: dimension {i} is {da} at batch {na} and {db} at batch {nb}, not a "
                                  "multiple of the batch; ONNX export needs shapes proportional to the batch")
            if fixed:
                parts.append(self.const(f"{name}.dims{len(parts)}", np.array(fixed, np.int64)))
                fixed = []
            factor = self.const(f"{name}.factor{len(parts)}", np.array([da // na], np.int64))
            parts.append(self.node("Mul", [self.batch(), factor], f"{name}.dims{len(parts)}"))
        if not parts:
            return self.const(name, np.array(fixed, np.int64))
        if fixed:
            parts.append(self.const(f"{name}.dims{len(parts)}", np.array(fixed, np.int64)))
        return parts[0] if len(parts) == 1 else self.node("Concat", parts, name, axis=0)

    def storage(self, qmin: int, qmax: int, signed: bool, where: str) -> type:
        """Numpy integer type holding ``[qmin, qmax]``: 8 bits, or 16 at opset >= 21."""
        for dtype in ((np.int8, np.int16) if signed else (np.uint8, np.uint16)):
            info = np.iinfo(dtype)
            if info.min <= qmin and qmax <= info.max:
                if info.bits > 8 and self.opset < MIN_OPSET_16BIT:
                    raise ExportError(f"{where}: integers in [{qmin}, {qmax}] need 16-bit QuantizeLinear, which "
                                      f"needs ONNX opset {MIN_OPSET_16BIT}; pass --onnx-opset {MIN_OPSET_16BIT} or "
                                      "use at most 8 activation bits")
                return dtype
        raise ExportError(f"{where}: integers in [{qmin}, {qmax}] do not fit a 16-bit ONNX type; use at most "
                          "16 bits")

    def fake_quant(self, x: str, qp: QParams, out: str, where: str) -> str:
        """``DequantizeLinear(QuantizeLinear(Clip(x)))`` with per-tensor ``qp``; the result is named ``out``.

        The ``Clip`` to ``[(qmin - z) s, (qmax - z) s]`` is only emitted where ``[qmin, qmax]`` is narrower
        than the storage type: then ``round(clip(x) / s) + z`` lies in ``[qmin, qmax]``, the clamp of the
        PyTorch model, where ``QuantizeLinear`` alone would saturate to the type's range.
        """
        dtype = self.storage(qp.quant_min, qp.quant_max, qp.signed, where)
        scale = qp.scale.detach().cpu().reshape(-1).float()
        zp = qp.zero_point.detach().cpu().reshape(-1)
        if scale.numel() != 1:  # act_qparams refuses per-channel activations; this guards the invariant
            raise ExportError(f"{where}: per-channel activation qparams cannot be exported; use per-tensor activations")
        info = np.iinfo(dtype)
        if qp.quant_min > info.min or qp.quant_max < info.max:
            lo = (float(qp.quant_min) - zp.float()) * scale  # float32 arithmetic, like the PyTorch dequantize
            hi = (float(qp.quant_max) - zp.float()) * scale
            x = self.node("Clip", [x, self.const(f"{out}.clip_min", lo.numpy().reshape(())),
                                   self.const(f"{out}.clip_max", hi.numpy().reshape(()))], f"{out}.clip")
        s = self.const(f"{out}.scale", scale.numpy().astype(np.float32).reshape(()))
        z = self.const(f"{out}.zero_point", zp.numpy().astype(dtype).reshape(()))
        q = self.node("QuantizeLinear", [x, s, z], f"{out}.q")
        return self.node("DequantizeLinear", [q, s, z], out)

    def weight(self, step: Step) -> str:
        """``DequantizeLinear`` of the layer's integer weight, stored as an int8 initializer."""
        layer = step.module
        qp = layer.weight_quant.qparams()
        if not qp.signed:
            raise ExportError(f"{step.target}: {qp.scheme} weights cannot be stored as ONNX int8; use weight scheme "
                              "sym or asym_s")
        if qp.bits > 8:
            raise ExportError(f"{step.target}: {qp.bits}-bit weights do not fit ONNX int8; use at most 8 weight bits")
        qt = layer_weight(layer)
        w = self.const(f"{step.name}.weight_int8", qt.int_repr.cpu().numpy().astype(np.int8))
        scale = qt.scale.detach().cpu().float().reshape(-1).numpy()
        zp = qt.zero_point.detach().cpu().reshape(-1).numpy().astype(np.int8)
        attrs: dict[str, Any] = {}
        if qt.axis is not None:  # one scale per slice along the axis (output channels for axis 0)
            attrs["axis"] = int(qt.axis)
        else:  # per tensor: a scalar scale (a 1-element 1-D scale would read as per-axis)
            scale, zp = scale.reshape(()), zp.reshape(())
        s = self.const(f"{step.name}.weight_scale", scale)
        z = self.const(f"{step.name}.weight_zero_point", zp)
        return self.node("DequantizeLinear", [w, s, z], f"{step.name}.weight", **attrs)


def _emit_layer(b: _Builder, step: Step, x: str, in_shape: tuple[int, ...], out: str) -> str:
    layer = step.module
    w = b.weight(step)
    bias = layer.deployed_bias()  # the accumulator-grid bias the fake-quant layer adds
    bias = torch.zeros(layer.weight.shape[0]) if bias is None else bias.detach()
    bias_name = b.const(f"{step.name}.bias", bias.cpu().float().numpy())
    acc = out if layer.act_quant is None else f"{step.name}.acc"
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise ExportError(f"{step.target}: padding_mode {layer.padding_mode!r} cannot be exported; use zero padding")
        kernel, dilation = pair(layer.kernel_size), pair(layer.dilation)
        if layer.padding == "same":  # torch pads the extra pixel of an odd total at the end
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [0, 0] if layer.padding == "valid" else pair(layer.padding)
            pads = pads + pads  # ONNX: [h_begin, w_begin, h_end, w_end]
        y = b.node("Conv", [x, w, bias_name], acc, kernel_shape=kernel, strides=pair(layer.stride), pads=pads,
                   dilations=dilation, group=int(layer.groups))
    elif isinstance(layer, nn.Linear):
        if len(in_shape) == 2:  # y = x W^T + b
            y = b.node("Gemm", [x, w, bias_name], acc, transB=1)
        else:  # Linear on the last axis of an N-d input: Gemm is 2-D only
            wt = b.node("Transpose", [w], f"{step.name}.weight_t", perm=[1, 0])
            y = b.node("Add", [b.node("MatMul", [x, wt], f"{step.name}.matmul"), bias_name], acc)
    else:
        raise ExportError(f"{step.target}: a quantized {type(layer).__name__} cannot be exported; only Conv2d and "
                          "Linear layers")
    if layer.act_quant is None:  # an accumulator: the ReLU step after it quantizes
        return y
    return b.fake_quant(y, act_qparams(step), out, step.target)


#: Opsets that introduced the ONNX ops the op table names, where newer than :data:`MIN_OPSET`; None: not an
#: ONNX op, always written as its formula.
_SINCE: dict[str, int | None] = {"HardSwish": 14, "LayerNormalization": 17, "Mish": 18, "Gelu": 20, "SiLU": None}


def _gelu(b: _Builder, xs: list[str], name: str, attrs: dict[str, Any]) -> str:
    """``x Phi(x)``: ``0.5 x (1 + erf(x / sqrt 2))``, or its ``tanh`` form."""
    x = xs[0]
    f32 = np.float32
    half = b.node("Mul", [x, b.const(f"{name}.half", np.array(0.5, f32))], f"{name}.half_x")
    if attrs["approximate"] == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.node("Mul", [b.node("Mul", [x, x], f"{name}.x2"), x], f"{name}.x3")
        inner = b.node("Add", [x, b.node("Mul", [cube, b.const(f"{name}.c", np.array(0.044715, f32))],
                                         f"{name}.cx3")], f"{name}.inner")
        t = b.node("Tanh", [b.node("Mul", [inner, b.const(f"{name}.k", np.array(np.sqrt(2 / np.pi), f32))],
                                   f"{name}.scaled")], f"{name}.tanh")
    else:
        t = b.node("Erf", [b.node("Div", [x, b.const(f"{name}.sqrt2", np.array(np.sqrt(2.0), f32))],
                                  f"{name}.x_sqrt2")], f"{name}.erf")
    return b.node("Mul", [half, b.node("Add", [t, b.const(f"{name}.one", np.array(1.0, f32))], f"{name}.1p")], name)


#: Formulas in older ONNX ops, for the ops of :data:`_SINCE`, as torch defines them.
_FORMULAS = {
    # x hardsigmoid(x), hardsigmoid(x) = clip(x / 6 + 1/2, 0, 1)
    "HardSwish": lambda b, xs, name, attrs: b.node(
        "Mul", [xs[0], b.node("HardSigmoid", xs, f"{name}.gate", alpha=1.0 / 6.0, beta=0.5)], name),
    "SiLU": lambda b, xs, name, attrs: b.node("Mul", [xs[0], b.node("Sigmoid", xs, f"{name}.gate")], name),
    "Mish": lambda b, xs, name, attrs: b.node(  # x tanh(softplus(x))
        "Mul", [xs[0], b.node("Tanh", [b.node("Softplus", xs, f"{name}.softplus")], f"{name}.gate")], name),
    "Gelu": _gelu,
}


def _onnx_op(b: _Builder, op_type: str, inputs: list[str], name: str, attrs: dict[str, Any], what: str) -> str:
    """The ONNX op ``op_type`` at the builder's opset: the op itself, or its formula where the opset predates
    it (:data:`_SINCE`); raises :class:`ExportError` when it has no formula."""
    since = _SINCE.get(op_type, MIN_OPSET)
    if since is not None and b.opset >= since:
        if op_type == "ReduceMean" and b.opset >= 18:  # axes became an input in opset 18
            axes = b.const(f"{name}.axes", np.array(attrs.pop("axes"), np.int64))
            return b.node(op_type, [*inputs, axes], name, **attrs)
        return b.node(op_type, inputs, name, **attrs)
    if op_type not in _FORMULAS:
        raise ExportError(f"{what} needs ONNX {op_type}, opset {since} or newer; pass --onnx-opset {since}")
    return _FORMULAS[op_type](b, inputs, name, attrs)


def _emit_requant(b: _Builder, step: Step, xs: list[str], out: str) -> str:
    """The op table's ONNX op for the wrapped module, then fake quantization with its output qparams."""
    inner = step.module.module
    op = op_of(inner)
    if op is None or op.onnx is None:
        raise ExportError(f"{step.target}: a quantized {type(inner).__name__} cannot be exported to ONNX")
    name = f"{step.name}.float"
    try:
        attrs = op.onnx_attrs(inner)
    except ValueError as exc:
        raise ExportError(f"{step.target}: {exc}") from None
    consts = [b.const(f"{name}.{k}", t.numpy()) for k, t in enumerate(op.onnx_inputs(inner))]
    y = _onnx_op(b, op.onnx, [*xs, *consts], name, attrs, f"{step.target}: {type(inner).__name__}")
    return b.fake_quant(y, act_qparams(step), out, step.target)


def _emit_module_passthrough(b: _Builder, step: Step, x: str, ins: tuple[tuple[int, ...], ...],
                             outs: tuple[tuple[int, ...], ...], out: str) -> str:
    mod = step.module
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise ExportError(f"{step.target}: MaxPool2d with return_indices cannot be exported; remove it")
        kernel = pair(mod.kernel_size)
        return b.node("MaxPool", [x], out, kernel_shape=kernel, strides=pair(mod.stride or kernel),
                      pads=pair(mod.padding) * 2, dilations=pair(mod.dilation), ceil_mode=int(mod.ceil_mode))
    if isinstance(mod, nn.Flatten):
        return _emit_reshape(b, step.name, x, ins, outs, out)
    raise ExportError(f"{step.target}: {type(mod).__name__} cannot be exported to ONNX")


def _emit_reshape(b: _Builder, name: str, x: str, ins: tuple[tuple[int, ...], ...],
                  outs: tuple[tuple[int, ...], ...], out: str) -> str:
    """A reshape from shapes ``ins`` to ``outs`` (one per probe batch): nothing, ``Flatten(axis=1)`` for
    ``(N, rest) -> (N, prod(rest))``, else ``Reshape`` to :meth:`_Builder.shape`."""
    if ins == outs:
        return x
    if all(len(o) == 2 and len(i) >= 2 and o == (i[0], int(np.prod(i[1:]))) for i, o in zip(ins, outs)):
        return b.node("Flatten", [x], out, axis=1)  # torch.flatten(x, 1), x.view(x.size(0), -1)
    return b.node("Reshape", [x, b.shape(f"{name}.shape", outs, name)], out)


#: Function / method passthroughs by what they do in ONNX.
_RESHAPES = {"flatten", "reshape", "view", "squeeze", "unsqueeze"}
_PERMUTES = {"transpose", "permute"}
_SPLITS = {"chunk", "split"}


def _emit_call_passthrough(b: _Builder, step: Step, xs: list[Any], runs: list[dict[str, Any]], out: str) -> Any:
    """A function / method passthrough: an ONNX ``Reshape``, ``Transpose``, ``Expand``, ``Slice`` / ``Gather``
    or ``Split``, its static arguments read from what the step did to the probe values."""
    name = step.target
    source = step.inputs[0]
    ins = tuple(_shape(r[source]) for r in runs)
    outs = tuple(_shape(r[step.name]) for r in runs)
    x = xs[0]
    if name in ("contiguous", "dropout"):
        return x
    if name in _RESHAPES:
        return _emit_reshape(b, step.name, x, ins, outs, out)
    if name == "expand":
        return b.node("Expand", [x, b.shape(f"{step.name}.shape", outs, step.name)], out)
    if name in _PERMUTES:
        # the permutation: run the step on a tensor whose dimensions all have different sizes
        primes = (2, 3, 5, 7, 11, 13, 17, 19)[:len(ins[0])]
        env = dict(runs[0])
        env[source] = torch.empty(primes, device="meta")
        perm = [primes.index(d) for d in step.call(env).shape]
        return b.node("Transpose", [x], out, perm=perm)
    if name in _SPLITS:
        parts = runs[0][step.name]
        axis = next((i for i, (d, p) in enumerate(zip(ins[0], _shape(parts[0]))) if d != p), 0)
        if ins[0][axis] != ins[1][axis] and len(parts) > 1:
            raise ExportError(f"{step.name}: splitting along the batch dimension cannot be exported")
        sizes = b.const(f"{step.name}.sizes", np.array([p.shape[axis] for p in parts], np.int64))
        names = [f"{step.name}.{i}" for i in range(len(parts))]
        b.nodes.append(b.helper.make_node("Split", [x, sizes], names, name=step.name, axis=axis))
        return names
    if name == "getitem" and isinstance(x, list):  # one part of a split
        index = next(i for i, part in enumerate(runs[0][source]) if part is runs[0][step.name])
        return x[index]
    if name == "getitem":
        return _emit_index(b, step, x, ins, runs, out)
    raise ExportError(f"{step.name} ({name}) cannot be exported to ONNX")


def _emit_index(b: _Builder, step: Step, x: str, ins: tuple[tuple[int, ...], ...], runs: list[dict[str, Any]],
                out: str) -> str:
    """``x[index]`` with ints, slices and ``...``: one ``Slice`` for the slices, then a ``Gather`` per int."""
    index = step.call_args(runs[0])[0][1]
    index = index if isinstance(index, tuple) else (index,)
    rank = len(ins[0])
    if sum(i is Ellipsis for i in index) > 1 or any(not isinstance(i, (int, slice)) and i is not Ellipsis
                                                    for i in index):
        raise ExportError(f"{step.name}: only indexing with integers, slices and ... can be exported to ONNX")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (rank - len(index) + 1) + index[at + 1:]
    starts, ends, axes, steps_ = [], [], [], []
    for axis, i in enumerate(index):
        if isinstance(i, slice) and i != slice(None):
            if ins[0][axis] != ins[1][axis]:
                raise ExportError(f"{step.name}: slicing the batch dimension cannot be exported")
            start, stop, stride = i.indices(ins[0][axis])
            starts.append(start)
            ends.append(stop if stop >= 0 else -(2 ** 63))  # a negative stride may run past index 0
            axes.append(axis)
            steps_.append(stride)
    y = x
    if axes:
        y = b.node("Slice", [x, *(b.const(f"{step.name}.{k}", np.array(v, np.int64)) for k, v in
                                  (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps_)))],
                   f"{step.name}.slice" if any(isinstance(i, int) for i in index) else out)
    ints = [(axis, i) for axis, i in enumerate(index) if isinstance(i, int)]
    for k, (axis, i) in enumerate(reversed(ints)):  # from the last axis, so earlier axes keep their numbers
        if ins[0][axis] != ins[1][axis]:
            raise ExportError(f"{step.name}: indexing the batch dimension cannot be exported")
        y = b.node("Gather", [y, b.const(f"{step.name}.index{k}", np.array(i % ins[0][axis], np.int64))],
                   out if k == len(ints) - 1 else f"{step.name}.gather{k}", axis=axis)
    return y


def export_onnx(qmodel: QuantizedModel, path: str | Path, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``qmodel`` (prepared and calibrated, or QAT-trained) to ``path`` as an ONNX QDQ model.

    The graph has one input ``input`` (float32, shape ``(batch, *example.shape[1:])`` with a dynamic batch)
    and one output ``logits`` (float32); it computes ``qmodel(input)`` in eval mode (see the module
    docstring for the operators and the rare one-step differences). The file is checked with
    ``onnx.checker`` and written atomically: on any error no file (or the previous one) is left at ``path``.

    Args:
        qmodel: a :class:`QuantizedModel` with the input and every Conv2d / Linear quantized.
        path: the ``.onnx`` file to write (folders are created).
        example: an input batch; gives the input shape (the batch size is free).
        opset: ONNX opset, ``MIN_OPSET`` (13, per-channel QDQ) up to the newest the installed onnx knows;
            16-bit activations need 21.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ExportError: onnx missing, opset out of range, or a model / plan that cannot be expressed (float
            layers, unsigned or wider-than-8-bit weights, unsupported modules), naming what to change.
    """
    check_opset(opset)
    onnx = _import_onnx()
    steps = deploy_graph(qmodel)
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise ExportError("export needs an example input tensor with a batch dimension")
    runs = _probe_values(qmodel, steps, example)
    b = _Builder(onnx, opset)
    outputs = steps[-1].inputs if steps[-1].kind == "output" else []
    if len(outputs) != 1 or not isinstance(runs[0][outputs[0]], torch.Tensor):
        raise ExportError(f"the model returns {len(outputs)} values; ONNX export needs a model returning one "
                          "logits tensor")
    values: dict[str, Any] = {}  # step name -> ONNX tensor holding its value (a list of them for a split)
    for step in steps:
        if step.kind == "shape":  # a Python number: the reshapes that read it take their shapes from the probes
            continue
        xs = [values[name] for name in step.inputs if name in values]
        # the logits producer writes "logits"; a step named like a graph port gets a name no FX node can have
        out = OUTPUT_NAME if step.name == outputs[0] else (
            f"{step.name}.value" if step.name in (INPUT_NAME, OUTPUT_NAME) else step.name)
        if step.kind == "input":
            values[step.name] = b.fake_quant(INPUT_NAME, act_qparams(step, qmodel.input_quant), out, "input")
        elif step.kind == "const":
            values[step.name] = b.const(out, step.value.cpu().float().numpy())
        elif step.kind == "layer":
            values[step.name] = _emit_layer(b, step, xs[0], _shape(runs[0][step.inputs[0]]), out)
        elif step.kind == "requant":
            values[step.name] = _emit_requant(b, step, xs, out)
        elif step.kind == "add":
            values[step.name] = b.node("Add", xs, out)
        elif step.kind == "passthrough" and step.module is not None:
            ins, outs = (tuple(_shape(r[name]) for r in runs) for name in (step.inputs[0], step.name))
            values[step.name] = _emit_module_passthrough(b, step, xs[0], ins, outs, out)
        elif step.kind == "passthrough":
            values[step.name] = _emit_call_passthrough(b, step, xs, runs, out)
        elif step.kind == "output":
            if xs[0] != OUTPUT_NAME:  # the logits are another step's value (e.g. after a no-op reshape)
                b.node("Identity", xs, OUTPUT_NAME)
        else:
            raise ExportError(f"{step.name}: step kind {step.kind!r} cannot be exported to ONNX")

    helper, tp = onnx.helper, onnx.TensorProto
    graph_input = helper.make_tensor_value_info(INPUT_NAME, tp.FLOAT, ["batch", *example.shape[1:]])
    graph_output = helper.make_tensor_value_info(OUTPUT_NAME, tp.FLOAT, ["batch", *_shape(runs[0][outputs[0]])[1:]])
    graph = helper.make_graph(b.nodes, type(qmodel.model).__name__, [graph_input], [graph_output],
                              initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="lit-quant",
                              doc_string="QDQ export of a lit-quant fake-quantized model")
    # the oldest IR version that carries this opset: make_model stamps the newest one, which runtimes
    # older than the onnx package (onnxruntime included) refuse to load
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model does not validate ({str(exc).strip().splitlines()[0]}); "
                          "please report this model") from exc
    data = model.SerializeToString()
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(data))
    return path


class OnnxModel(nn.Module):
    """An exported ONNX model as a module: ``forward(x) -> logits`` through one onnxruntime session.

    By default onnxruntime's QDQ fusions are off (``session.disable_quant_qdq``; its float optimizations stay
    on), so it computes the graph as written: float operators between QuantizeLinear / DequantizeLinear,
    which is the fake-quant model up to rare one-step rounding differences. With ``fuse_qdq=True`` it does
    what a deployment does: rounds the biases to int32 on the ``s_x * s_w`` grid (where they already are:
    the exported biases are the fake-quant model's :meth:`deployed_bias`) and fuses the pairs into QLinearConv / QLinearAdd / QGemm integer kernels. On
    x86 CPUs without VNNI those kernels add 8-bit u8 x s8 products pairwise in saturating int16
    (onnxruntime's documented "reduce_range" caveat), which with 8-bit weights moves logits by tens of
    output steps; 7-bit weights avoid it.

    Raises:
        ExportError: onnxruntime missing, no file at ``path``, or a model onnxruntime cannot load (e.g. an
            opset newer than it supports).
    """

    def __init__(self, path: str | Path, fuse_qdq: bool = False) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running the ONNX model needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"no ONNX model at {path}; export one first")
        try:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            if not fuse_qdq:
                options.add_session_config_entry("session.disable_quant_qdq", "1")
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"onnxruntime {ort.__version__} cannot load {path} ({msg}); export with an opset it "
                              f"supports, e.g. --onnx-opset {DEFAULT_OPSET}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(logits).to(x.device)


def run_onnx(path: str | Path, x: torch.Tensor, fuse_qdq: bool = False) -> torch.Tensor:
    """Logits of the ONNX model at ``path`` for the batch ``x`` (onnxruntime, CPU); see :class:`OnnxModel`."""
    return OnnxModel(path, fuse_qdq)(x)
