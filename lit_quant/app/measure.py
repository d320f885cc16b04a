"""Model size on disk, CPU latency and paired accuracy: the "size", "latency at batch 1 / 64" and "vs fp32"
columns of the results table.

Pure PyTorch, so it measures our own quantized models, torch.ao's and float models the same way. The
numbers are for reports and benchmark scripts; tests assert properties (positive, smaller), never timings.
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from fractions import Fraction
from math import comb

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


@dataclass(frozen=True)
class PairedComparison:
    """Two models' predictions on the same test images, image by image.

    Attributes:
        only_a: images model ``a`` classifies correctly and model ``b`` does not.
        only_b: images ``b`` classifies correctly and ``a`` does not.
        p_value: two-sided exact McNemar test of "equal accuracy" (see :func:`paired_comparison`).
    """

    only_a: int
    only_b: int
    p_value: float


def paired_comparison(correct_a: torch.Tensor, correct_b: torch.Tensor) -> PairedComparison:
    """Compare two models evaluated on the same images in the same order (per-image correctness, bool).

    Top-1 of the two differs by ``(only_b - only_a) / N``; whether that difference is more than chance is
    decided by the ``n = only_a + only_b`` discordant images alone, the images both get right or both get
    wrong say nothing about it. Under "equal accuracy" each discordant image is equally likely to fall
    either way, ``only_a ~ Binomial(n, 1/2)``, so the exact (binomial) McNemar test gives

        ``p = min(1, 2 * sum_{k=0}^{min(only_a, only_b)} C(n, k) / 2^n)``,  ``p = 1`` for ``n = 0``,

    computed in exact integer arithmetic (no underflow at ``n`` in the thousands). ``p >= 0.05`` means the
    two accuracies are not distinguishable on this test set at the 5 % level, whatever the sign of the
    difference: 22 images against 19 (a difference of 3, whatever the test set's size) has ``p = 0.76``.

    Raises:
        ValueError: the two vectors differ in length (not the same test images).
    """
    a, b = correct_a.reshape(-1).bool(), correct_b.reshape(-1).bool()
    if a.numel() != b.numel():
        raise ValueError(f"paired comparison needs the same images: {a.numel()} against {b.numel()} outcomes")
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    n, low = only_a + only_b, min(only_a, only_b)
    tail = Fraction(sum(comb(n, k) for k in range(low + 1)), 2**n)
    return PairedComparison(only_a, only_b, float(min(Fraction(1), 2 * tail)))
