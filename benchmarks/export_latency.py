"""Latency of our exported int8 model against torch.ao's own converted model of the same network.

Both are real int8 models on the same quantized engine (fbgemm / x86 / qnnpack kernels): ours is
``lit_quant.deploy.int8.export_int8`` of our PTQ model (our qparams), torch.ao's is ``prepare_fx`` /
``convert_fx`` with its default qconfig. Timings are interleaved (fp32, torch.ao, ours, repeated) on one
thread, medians reported, and the ratios printed are measured side by side in this one run.

    python benchmarks/export_latency.py --ckpt checkpoints/digits-resnet20/best.ckpt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_quant.builtin import available_backends, builtin_ptq  # noqa: E402
from lit_quant.config import TrainConfig  # noqa: E402
from lit_quant.deploy.int8 import export_int8  # noqa: E402
from lit_quant.quant import QuantPlan, calibrate, prepare  # noqa: E402
from lit_quant.training import build_datamodule, load_classifier  # noqa: E402


def _time(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            out.append((time.perf_counter() - start) * 1000.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default="checkpoints/digits-resnet20/best.ckpt", help="fp32 checkpoint")
    parser.add_argument("--backends", nargs="+", default=None, help="quantized engines (default: all that run here)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per model per round")
    parser.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    classifier = load_classifier(args.ckpt)
    model, arch = classifier.model.eval(), classifier.hparams.arch
    dm = build_datamodule(TrainConfig(data=arch["data"], model=arch["model"], image_size=arch["image_size"],
                                      small_input=arch["small_input"], batch_size=64, progress=False))
    dm.setup()
    calib = [b for _, b in zip(range(args.calib_batches), dm.train_dataloader())]
    x64 = next(iter(dm.test_dataloader()))[0][:64]
    qmodel = prepare(model, QuantPlan.from_bits(8, 8, act_observer="mse"))
    calibrate(qmodel, calib)
    print(f"{arch['model']} on {arch['data']}, input {tuple(x64.shape[1:])}, 1 thread, median of "
          f"{args.rounds} x {args.repeats} interleaved forwards")
    print(f"{'backend':8} {'batch':>5} {'fp32 ms':>8} {'torch.ao ms':>11} {'ours ms':>8} {'ao speedup':>10} "
          f"{'ours speedup':>12} {'ours/ao time':>12}")
    for backend in args.backends or available_backends():
        ao = builtin_ptq(model, calib, backend, x64).model
        ours = export_int8(qmodel, backend)
        for batch in (1, 64):
            x = x64[:batch]
            times: dict[str, list[float]] = {"fp32": [], "ao": [], "ours": []}
            for m in (model, ao, ours):  # warm-up: packing, allocation, kernel selection
                _time(m, x, 3)
            for _ in range(args.rounds):
                for key, m in (("fp32", model), ("ao", ao), ("ours", ours)):
                    times[key] += _time(m, x, args.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{backend:8} {batch:5d} {med['fp32']:8.2f} {med['ao']:11.2f} {med['ours']:8.2f} "
                  f"{med['fp32'] / med['ao']:9.2f}x {med['fp32'] / med['ours']:11.2f}x {med['ours'] / med['ao']:11.2f}x")


if __name__ == "__main__":
    main()
