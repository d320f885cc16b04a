"""ExecuTorch export: our quantized model as a ``.pte`` program whose int8 ops run in the XNNPACK delegate.

The program is the PT2E form of :func:`lit_quant.deploy.pt2e.export_pt2e` in XNNPACK's int8 scheme: signed
8-bit activations (an unsigned grid moves to ``int8`` with its zero point shifted by 128, the same values),
symmetric int8 weights (per channel or per tensor), the inputs of a concatenation on its output grid, and the
float logits layer as a float product with its weight dequantized ahead of time. ExecuTorch's
``to_edge_transform_and_lower`` hands every quantize / dequantize pattern to the ``XnnpackPartitioner``; the
``.pte`` is then run by ``executorch.runtime`` (:class:`PteModel`) in batches of the size it was exported
for (one by default: the phone and edge-board case).

What XNNPACK's int8 kernels cannot express is refused by :func:`xnnpack_blockers` instead of changed:
activations of other than 8 bits, asymmetric weights, per-channel activations.

executorch is an optional extra (``pip install lit-quant[executorch]``), imported inside the functions; a
call without it raises :class:`ExportError` with the pip command.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lit_quant.deploy.graph import ExportError, scheme_blockers, summarize_blockers
from lit_quant.deploy.pt2e import export_pt2e
from lit_quant.io import atomic_write
from lit_quant.quant.preparation import QuantizedModel

#: What ``pip install`` gets the ExecuTorch release that pairs with this torch and torchao.
EXECUTORCH_PIP = "pip install executorch==1.5.1"


def check_executorch_runtime() -> None:
    """Raise :class:`ExportError` with the pip command when executorch is not installed (found without
    importing it, so that the check costs nothing before the work)."""
    import importlib.util

    if importlib.util.find_spec("executorch") is None:
        raise ExportError(f"--export executorch needs ExecuTorch: {EXECUTORCH_PIP}")


def xnnpack_blockers(qmodel: QuantizedModel) -> list[str]:
    """Why ``qmodel`` has no XNNPACK int8 form (empty: it has one): 8-bit activations and symmetric weights."""
    return scheme_blockers(qmodel, "XNNPACK")


def export_executorch(qmodel: QuantizedModel, example: torch.Tensor, path: str | Path, batch: int = 1) -> Path:
    """Write ``qmodel`` as an ExecuTorch program with the XNNPACK delegate to ``path`` (atomically), for
    batches of ``batch`` images shaped like ``example[0]`` (default one: the phone and edge-board case).

    Raises:
        ExportError: executorch missing, :func:`xnnpack_blockers`, or an op the partitioner leaves out of the
            delegate (named: the portable runtime has no int8 kernel for it).
    """
    check_executorch_runtime()
    blockers = xnnpack_blockers(qmodel)
    if blockers:
        raise ExportError(f"cannot export to ExecuTorch XNNPACK: {summarize_blockers(blockers, 3)}")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    one = example[:1].expand(batch, *example.shape[1:]).contiguous()
    program = torch.export.export(export_pt2e(qmodel, one, signed=True).module(), (one,))
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    left = sorted({str(n.target).split(":")[0] for n in edge.exported_program().graph.nodes
                   if n.op == "call_function" and "delegate" not in str(n.target) and "getitem" not in str(n.target)
                   and "quantized_decomposed" in str(n.target)})
    if left:
        raise ExportError(f"XNNPACK does not take {left[0]}" + (f" (+{len(left) - 1} more)" if len(left) > 1 else "")
                          + ": the portable runtime has no int8 kernel for it")
    buffer = edge.to_executorch().buffer
    path = Path(path)
    atomic_write(path, lambda fh: fh.write(buffer))
    return path


class PteModel(nn.Module):
    """A ``.pte`` program as a module: ``forward(x) -> logits``, run by ``executorch.runtime`` in chunks of the
    program's ``batch`` (a last smaller chunk padded with its last image).

    Raises:
        ExportError: executorch missing, or no program at ``path``.
    """

    def __init__(self, path: str | Path, batch: int = 1) -> None:
        super().__init__()
        self.batch = batch
        check_executorch_runtime()
        path = Path(path)
        if not path.is_file():
            raise ExportError(f"no ExecuTorch program at {path}; export one first")
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, n, outs = x.float().contiguous(), len(x), []
        for i in range(0, n, self.batch):
            chunk = x[i:i + self.batch]
            short = self.batch - len(chunk)
            if short:
                chunk = torch.cat([chunk, chunk[-1:].expand(short, *chunk.shape[1:])])
            outs.append(self.method.execute([chunk.contiguous()])[0][:self.batch - short])
        return torch.cat(outs)
