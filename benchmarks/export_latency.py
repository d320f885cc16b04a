"""Latency of our exported int8 model against torch.ao's own converted model of the same network.

Both are real int8 models on the same quantized engine (fbgemm / x86 / qnnpack kernels): ours is
``lit_quant.deploy.int8.export_int8`` of our PTQ model (our qparams), torch.ao's is ``prepare_fx`` /
``convert_fx`` with its default qconfig. Timings are interleaved (fp32, torch.ao, ours, repeated) on one
thread, medians reported, and the ratios printed are measured side by side in this one run.

``--random-weights`` times a random-weight ResNet-20 on random 1x28x28 images instead of a checkpoint and
its data set (latency does not depend on the values). ``--smoke`` shrinks every size to seconds and implies
``--random-weights`` (a check that the benchmark runs and its figures are sane, not a measurement);
``--json PATH`` also writes every figure printed, for scripts and tests.

    python benchmarks/export_latency.py --ckpt checkpoints/digits-resnet20/best.ckpt
    python benchmarks/export_latency.py --smoke --json /tmp/export_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke import add_smoke_arguments, parse_with_smoke  # noqa: E402

from lit_quant.app.config import TrainConfig
from lit_quant.deploy.engines import available_backends
from lit_quant.deploy.int8 import export_int8
from lit_quant.app.models import build_model
from lit_quant.quant import QuantPlan, calibrate, prepare
from lit_quant.app.torchao_ref import builtin_ptq
from lit_quant.app.training import build_datamodule, load_classifier

#: Sizes of ``--smoke``: seconds on one core (one calibration batch, a few timed forwards, batches 1 and 4, and
#: only the first available backend unless ``--backends`` names some).
SMOKE_SIZES: dict[str, Any] = {"random_weights": True, "rounds": 1, "repeats": 2, "calib_batches": 1,
                               "batches": [1, 4]}
#: Images per calibration batch and the largest batch timed.
BATCH = 64


def _time(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            out.append((time.perf_counter() - start) * 1000.0)
    return out


def checkpoint_setup(path: str, calib_batches: int) -> tuple[torch.nn.Module, list[Any], torch.Tensor, str]:
    """The fp32 model of checkpoint ``path``, ``calib_batches`` training batches, 64 test images, a title."""
    classifier = load_classifier(path)
    model, arch = classifier.model.eval(), classifier.hparams.arch
    dm = build_datamodule(TrainConfig(data=arch["data"], model=arch["model"], image_size=arch["image_size"],
                                      small_input=arch["small_input"], batch_size=BATCH, progress=False))
    dm.setup()
    calib = [b for _, b in zip(range(calib_batches), dm.train_dataloader())]
    x64 = next(iter(dm.test_dataloader()))[0][:BATCH]
    return model, calib, x64, f"{arch['model']} on {arch['data']}"


def random_setup(calib_batches: int, seed: int) -> tuple[torch.nn.Module, list[Any], torch.Tensor, str]:
    """A random-weight ResNet-20 for 1x28x28 inputs, ``calib_batches`` batches of random images, 64 more."""
    torch.manual_seed(seed)
    model = build_model("resnet20", 1, 10).eval()
    calib = [torch.randn(BATCH, 1, 28, 28) for _ in range(calib_batches)]
    return model, calib, torch.randn(BATCH, 1, 28, 28), "random-weight resnet20 on random images"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/digits-resnet20/best.ckpt", help="fp32 checkpoint")
    parser.add_argument("--random-weights", action="store_true",
                        help="random-weight ResNet-20 on random 1x28x28 images instead of --ckpt")
    parser.add_argument("--backends", nargs="+", default=None, help="quantized engines (default: all that run here)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model per round")
    parser.add_argument("--calib-batches", type=int, default=8, help=f"calibration batches of {BATCH}")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, BATCH], help=f"batch sizes timed (<= {BATCH})")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    if not all(1 <= b <= BATCH for b in args.batches):
        parser.error(f"--batches must lie in 1..{BATCH}; got {args.batches}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model, calib, x64, title = (random_setup(args.calib_batches, args.seed) if args.random_weights
                                else checkpoint_setup(args.ckpt, args.calib_batches))
    qmodel = prepare(model, QuantPlan.from_bits(8, 8, act_observer="mse"))
    calibrate(qmodel, calib)
    print(f"{title}, input {tuple(x64.shape[1:])}, 1 thread, median of {args.rounds} x {args.repeats} "
          "interleaved forwards")
    print(f"{'backend':8} {'batch':>5} {'fp32 ms':>8} {'torch.ao ms':>11} {'ours ms':>8} {'ao speedup':>10} "
          f"{'ours speedup':>12} {'ours/ao time':>12}")
    rows: list[dict[str, Any]] = []
    backends = args.backends or available_backends()
    if args.smoke and not args.backends:
        backends = backends[:1]  # one engine shows the export and both timings run
    for backend in backends:
        ao = builtin_ptq(model, calib, backend, x64).model
        ours = export_int8(qmodel, backend)
        for batch in args.batches:
            x = x64[:batch]
            times: dict[str, list[float]] = {"fp32": [], "ao": [], "ours": []}
            for m in (model, ao, ours):  # warm-up: packing, allocation, kernel selection
                _time(m, x, 3)
            for _ in range(args.rounds):
                for key, m in (("fp32", model), ("ao", ao), ("ours", ours)):
                    times[key] += _time(m, x, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"backend": backend, "batch": batch, "fp32_ms": med["fp32"], "ao_ms": med["ao"],
                   "ours_ms": med["ours"], "ao_speedup": med["fp32"] / med["ao"],
                   "ours_speedup": med["fp32"] / med["ours"], "ours_over_ao": med["ours"] / med["ao"]}
            rows.append(row)
            print(f"{backend:8} {batch:5d} {row['fp32_ms']:8.2f} {row['ao_ms']:11.2f} {row['ours_ms']:8.2f} "
                  f"{row['ao_speedup']:9.2f}x {row['ours_speedup']:11.2f}x {row['ours_over_ao']:11.2f}x")
    if args.json:
        report = {"benchmark": "export_latency", "torch": torch.__version__, "model": title, "args": vars(args),
                  "timing": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
