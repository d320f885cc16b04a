"""Cost of one QAT training step: ours (STE, LSQ) and torch.ao ``prepare_qat_fx`` against plain fp32.

One step = forward, cross-entropy, backward, SGD step of ResNet-20 (or ``--model``) on a batch of 1x28x28 images
(Fashion-MNIST-shaped random images: the cost does not depend on pixel values), in train mode. Ours is the
model ``prepare(model, plan, qat=True)`` gives (BatchNorm folded into the quantized weight as it trains,
fake quantization of weights and activations, moving-average activation observers) and the step includes
what :class:`lit_quant.callbacks.QATCallback` does after each step (recompute activation qparams; the DDP
sync is a no-op in one process). torch.ao's is ``prepare_qat_fx`` with the backend's default QAT qconfig
(fused fake-quant + moving-average observers, ``ConvBn2d`` modules). The ``--distill`` row is our STE step
with ``quantize.py --distill``'s loss (:meth:`lit_quant.app.classifier.LitClassifier.training_loss`: one more
forward of the frozen fp32 teacher in eval mode, and the KL term). ``--frozen-bn`` times every QAT variant
with BatchNorm statistics frozen (``quantize.py``'s default ``--freeze-bn-epoch 0``, applied to torch.ao's
model with its own ``freeze_bn_stats``): the folded weight uses running statistics, no batch statistics
are computed. Without it BatchNorm trains on batch statistics. All variants are timed in the same
run, interleaved per repeat so machine load hits them alike; the median of ``--repeats`` runs of ``--steps``
steps is reported.

``--smoke`` shrinks every size to seconds (a check that the benchmark runs and its figures are sane, not a
measurement); ``--json PATH`` also writes every figure printed, for scripts and tests.

Run:  python benchmarks/qat_step.py [--batch-size 128 --steps 10 --repeats 5 --threads 2 --bits 8 --frozen-bn]
      python benchmarks/qat_step.py --smoke --json /tmp/qat_step.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke import add_smoke_arguments, parse_with_smoke  # noqa: E402
from lit_quant.app.classifier import LitClassifier
from lit_quant.app.models import build_model, model_info
from lit_quant.quant import QuantPlan, calibrate, enable_fake_quant, enable_observer, prepare, update_qparams
from lit_quant.quant.fake_quant import set_step_qparams
from lit_quant.quant.layers import freeze_bn_stats
from lit_quant.app.torchao_ref import builtin_qat_prepare, builtin_qat_switches

#: Sizes of ``--smoke``: seconds on one core; two repeats so the median is taken over more than one run.
SMOKE_SIZES: dict[str, Any] = {"batch_size": 8, "steps": 1, "repeats": 2, "threads": 1}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, after: Callable[[], None] | None = None,
              loss: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    """One SGD training step of ``model`` on ``(x, y)``; ``after`` runs once the step is done; ``loss`` maps
    the logits to the loss (default: cross-entropy with ``y``)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss = loss or (lambda logits: F.cross_entropy(logits, y))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss(model(x)).backward()
        opt.step()
        if after is not None:
            after()
    return step


def set_batchnorm_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm running statistics of ``x``'s activations: with the initial ones (mean 0, variance 1) a deep
    random network's eval-mode activations overflow before calibration sees them."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def ours(model: nn.Module, bits: int, method: str, x: torch.Tensor, frozen_bn: bool) -> nn.Module:
    """Our QAT model, calibrated on ``x`` and switched to training: fake quant on, observers on, BatchNorm
    statistics frozen or not."""
    q = prepare(model, QuantPlan.from_bits(bits, bits, act_observer="ema", quantizer=method), qat=True)
    calibrate(q, [x])
    set_step_qparams(q, True)
    enable_observer(q, True)
    enable_fake_quant(q, True)
    freeze_bn_stats(q, frozen_bn)
    return q.train()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=8, help="weight and activation bits of our QAT")
    parser.add_argument("--backend", default="x86", help="torch.ao backend of the QAT qconfig")
    parser.add_argument("--model", default="resnet20",
                        help="resnet20 or a torchvision classifier such as mobilenet_v2 (small-image stem, "
                             "images of its smallest input size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frozen-bn", action="store_true",
                        help="BatchNorm statistics frozen in every QAT variant (quantize.py's default schedule)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = max(28, model_info(args.model).min_size)
    x = torch.randn(args.batch_size, 1, size, size)
    y = torch.randint(0, 10, (args.batch_size,))
    fp32 = build_model(args.model, 1, 10, small_input=True).train()  # small_input only changes torchvision models
    set_batchnorm_statistics(fp32, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = builtin_qat_prepare(fp32, args.backend, x[:1]).train()
        builtin_qat_switches(ao, observing=True, bn_training=not args.frozen_bn)
    ste, lsq, ste_kd = (ours(fp32, args.bits, method, x, args.frozen_bn) for method in ("ste", "lsq", "ste"))
    distill = LitClassifier(ste_kd, 10, teacher=copy.deepcopy(fp32))
    steps = {
        "fp32": make_step(fp32, x, y),
        f"ours STE W{args.bits}A{args.bits}": make_step(ste, x, y, lambda: update_qparams(ste, kind="act")),
        f"ours LSQ W{args.bits}A{args.bits}": make_step(lsq, x, y, lambda: update_qparams(lsq, kind="act")),
        f"ours STE W{args.bits}A{args.bits} --distill": make_step(
            ste_kd, x, y, lambda: update_qparams(ste_kd, kind="act"), lambda z: distill.training_loss(z, x, y)),
        f"torch.ao prepare_qat_fx ({args.backend})": make_step(ao, x, y),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, batch {args.batch_size} of "
          f"1x{size}x{size}, {args.steps} steps x {args.repeats} repeats (median), BatchNorm "
          f"{'frozen' if args.frozen_bn else 'on batch statistics'}, load average {os.getloadavg()[0]:.2f}")
    for step in steps.values():  # warm-up (allocator, first-call dispatch)
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times["fp32"])
    rows = {name: {"ms_per_step": 1000 * statistics.median(ts), "ratio": statistics.median(ts) / base}
            for name, ts in times.items()}
    print(f"\n{'training step':<42}{'ms/step':>9}{'x fp32':>9}")
    for name, row in rows.items():
        print(f"{name:<42}{row['ms_per_step']:>9.1f}{row['ratio']:>9.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} after timing")
    if args.json:
        report = {"benchmark": "qat_step", "torch": torch.__version__, "args": vars(args), "timing": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
