"""Model size on disk and CPU latency: the "size" and "latency at batch 1 / 64" columns of the results table.

Pure PyTorch, so it measures our own quantized models, torch.ao's and float models the same way. The
numbers are for reports and benchmark scripts; tests assert properties (positive, smaller), never timings.
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``, written to memory: the size of a checkpoint on disk.

    The state dict holds what a deployment ships: parameters and buffers, and for quantized modules the
    int8 weights with their scales and zero points (torch.ao's packed conv / linear parameters serialize
    through their own ``__getstate__``, so they count at their real, unpacked int8 size). It includes
    the pickle overhead per tensor (names, storage headers), which dominates for very small models.
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latency_ms(model: nn.Module, example: torch.Tensor, warmup: int = 3, repeats: int = 10,
               threads: int | None = None) -> float:
    """Median wall time of one forward of ``example`` through ``model``, in milliseconds.

    Runs ``warmup`` untimed forwards (first calls pay for allocation, weight packing and kernel
    selection), then ``repeats`` timed ones under ``torch.inference_mode``. The median rather than the
    mean, because a shared CPU gives occasional long outliers. The model's train / eval mode is left as
    it is: put it in eval mode first.

    Args:
        model: any module that takes ``example``.
        example: input batch (batch size 1 and 64 for the report's two columns).
        warmup: untimed forwards, ``>= 0``.
        repeats: timed forwards, ``>= 1``.
        threads: ``torch.set_num_threads`` for the measurement (restored afterwards); ``None`` keeps the
            current setting. On a CPU shared with other jobs use ``threads=1``: with more threads than free
            cores every op waits at an OpenMP barrier for a descheduled thread (seen here: ResNet-20 at
            batch 1 took 1.8 ms on one thread and 680 ms on two while the other core was busy).

    Raises:
        ValueError: ``warmup < 0``, ``repeats < 1`` or ``threads < 1``.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times: list[float] = []
        with torch.inference_mode():
            for _ in range(warmup):
                model(example)
            for _ in range(repeats):
                start = time.perf_counter()
                model(example)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return statistics.median(times) * 1000.0
