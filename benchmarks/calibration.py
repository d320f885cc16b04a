"""Calibration speed and quantization error of our observers against plain forwards and torch.ao.

Times PTQ calibration of ResNet-20 (1x28x28 input, Fashion-MNIST test images when found, else random
images of that shape) with each of our observers on the activations, against (a) plain fp32 forward passes
of the float model, (b) the BN-folded float model, and (c) torch.ao FX ``prepare_fx`` with
``HistogramObserver`` activations, all in the same run and interleaved per repeat so machine load hits
them alike. Calibration time includes computing every quantizer's qparams at the end.

Error: for every activation tensor our model quantizes, the MSE between the tensor and its fake-quantized
copy, with our qparams and with the qparams a torch.ao ``HistogramObserver`` computes on the very same
tensors (fed through forward hooks in an untimed pass). Reported as the geometric mean over tensors of
``ours / torch.ao`` and the count of tensors where ours is no worse.

``--ckpt`` replaces the random-weight model by a trained Fashion-MNIST checkpoint of ``train.py`` (its
architecture must take 1x28x28 inputs): trained activations have the long tails that decide 8-bit errors.

Run:  python benchmarks/calibration.py [--images 2048 --batch-size 256 --repeats 5 --threads 2 --clock wall]
      python benchmarks/calibration.py --ckpt checkpoints/fashion-mnist-resnet20/best.ckpt --skip-timing
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_quant.models import build_model
from lit_quant.quant import (
    OBSERVER_NAMES,
    OBSERVERS,
    FakeQuantize,
    QuantPlan,
    calibrate,
    fake_quantize,
    fuse_conv_bn,
    iter_quantizers,
    prepare,
    reset_observers,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization import HistogramObserver, QConfig, QConfigMapping, default_per_channel_weight_observer
    from torch.ao.quantization.quantize_fx import prepare_fx

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def load_images(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` normalised 1x28x28 images: Fashion-MNIST test images if present, else seeded random ones."""
    if FASHION.exists():
        raw = gzip.decompress(FASHION.read_bytes())
        images = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(-1, 1, 28, 28)[:n]
        return (images.float() / 255 - 0.2860) / 0.3530, f"Fashion-MNIST test images ({FASHION})"
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) - 0.2860) / 0.3530, "random images (Fashion-MNIST not found)"


def make_model(seed: int) -> nn.Module:
    """ResNet-20 with random weights and random BatchNorm statistics (non-trivial activations), eval mode."""
    torch.manual_seed(seed)
    model = build_model("resnet20", 1, 10)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def load_trained(path: str) -> nn.Module:
    """The fp32 model of a ``train.py`` checkpoint, eval mode (lit_quant's own loader and its errors)."""
    from lit_quant.training import load_classifier

    return load_classifier(path).model.eval()


def forward_all(model: nn.Module, batches: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def ao_calibrate(prepared: nn.Module, batches: list[torch.Tensor]) -> None:
    """torch.ao calibration: forwards, then every observer's qparams (what ``convert_fx`` would compute)."""
    forward_all(prepared, batches)
    for m in prepared.modules():
        if isinstance(m, HistogramObserver):
            m.calculate_qparams()


def ao_prepare(model: nn.Module, example: torch.Tensor) -> nn.Module:
    qconfig = QConfig(activation=HistogramObserver.with_args(dtype=torch.quint8, reduce_range=False),
                      weight=default_per_channel_weight_observer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig), (example,))


def timed(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def quantization_errors(model: nn.Module, observer: str, bits: int, batches: list[torch.Tensor],
                        eval_batches: list[torch.Tensor], options: dict[str, float] | None = None,
                        ) -> tuple[list[float], list[float], list[float]]:
    """Per activation tensor: our MSE, torch.ao HistogramObserver's MSE (same tensors), and E[x^2]."""
    q = prepare(model, QuantPlan.from_bits(8, bits, act_observer=observer, observer_args={observer: options or {}}))
    acts = dict(iter_quantizers(q, "act"))
    refs = {name: HistogramObserver(dtype=torch.quint8, quant_min=0, quant_max=2 ** bits - 1) for name in acts}
    hooks = [fq.register_forward_pre_hook(lambda m, a, n=name: refs[n](a[0])) for name, fq in acts.items()]
    calibrate(q, batches)  # our observers and the reference ones see the same tensors
    for h in hooks:
        h.remove()
    sums = {name: [0.0, 0.0, 0.0] for name in acts}
    ref_qp = {name: refs[name].calculate_qparams() for name in acts}

    def measure(m: FakeQuantize, args: tuple, name: str) -> None:
        x = args[0]
        ours = fake_quantize(x, m.scale, m.zero_point, m.spec.quant_min, m.spec.quant_max)
        s, z = ref_qp[name]
        ref = fake_quantize(x, s, z, 0, 2 ** bits - 1)
        sums[name][0] += float(((ours - x) ** 2).sum())
        sums[name][1] += float(((ref - x) ** 2).sum())
        sums[name][2] += float((x ** 2).sum())

    hooks = [fq.register_forward_pre_hook(lambda m, a, n=name: measure(m, a, n)) for name, fq in acts.items()]
    forward_all(q, eval_batches)
    for h in hooks:
        h.remove()
    return [v[0] for v in sums.values()], [v[1] for v in sums.values()], [v[2] for v in sums.values()]


def time_calibration(args: argparse.Namespace, model: nn.Module, batches: list[torch.Tensor], source: str) -> None:
    """Median calibration time per variant, interleaved per repeat, printed with the ratio to a plain forward."""
    fused, _ = fuse_conv_bn(model)
    ours = {name: prepare(model, QuantPlan.from_bits(8, 8, act_observer=name)) for name in args.observers}
    ao = ao_prepare(model, batches[0][:1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {sum(len(b) for b in batches)} images ({source}), "
          f"batch {args.batch_size}, {args.repeats} repeats (median), {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.2f} at start")

    forward_all(model, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"fp32 forward": [], "fp32 forward, BN folded": [], "torch.ao histogram": []}
    times.update({name: [] for name in ours})
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
        times["fp32 forward"].append(timed(lambda: forward_all(model, batches), clock))
        times["fp32 forward, BN folded"].append(timed(lambda: forward_all(fused, batches), clock))
        fresh = copy.deepcopy(ao)
        times["torch.ao histogram"].append(timed(lambda: ao_calibrate(fresh, batches), clock))
        for name, q in ours.items():
            reset_observers(q)
            times[name].append(timed(lambda q=q: calibrate(q, batches), clock))
    base = statistics.median(times["fp32 forward"])
    print(f"\n{'calibration':<26}{'seconds':>9}{'x fp32 forward':>16}")
    for name, ts in times.items():
        print(f"{name:<26}{statistics.median(ts):>9.3f}{statistics.median(ts) / base:>16.2f}")

    print(f"load average {os.getloadavg()[0]:.2f} after timing")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=8, help="activation bits for the error comparison")
    parser.add_argument("--observers", nargs="+", default=list(OBSERVER_NAMES), choices=OBSERVER_NAMES)
    parser.add_argument("--error-images", type=int, default=512, help="images the errors are measured on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine, "
                             "meaningful with --threads 1)")
    parser.add_argument("--skip-errors", action="store_true", help="timings only")
    parser.add_argument("--skip-timing", action="store_true", help="errors only")
    parser.add_argument("--observer-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="option given to every observer of the error comparison that has it "
                             "(max_samples=0, percentile=99.999, ...)")
    parser.add_argument("--ckpt", help="trained Fashion-MNIST checkpoint instead of the random-weight ResNet-20")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images, source = load_images(args.images, args.seed)
    batches = list(images.split(args.batch_size))
    model = load_trained(args.ckpt) if args.ckpt else make_model(args.seed)
    print(f"model: {args.ckpt or 'random-weight ResNet-20'}")
    if not args.skip_timing:
        time_calibration(args, model, batches, source)
    if args.skip_errors:
        return 0
    eval_batches = list(images[:args.error_images].split(args.batch_size))
    print(f"\nquantization error at {args.bits}-bit activations, per activation tensor ({args.error_images} images), "
          "vs torch.ao HistogramObserver on the same tensors")
    print(f"{'observer':<12}{'geo-mean ours/ao':>18}{'tensors ours<=ao':>18}{'rel. err ours':>15}{'rel. err ao':>13}")
    extra = {k: float(v) if "." in v else int(v) for k, v in (a.split("=", 1) for a in args.observer_arg)}
    for name in args.observers:
        known = OBSERVERS[name].DEFAULTS
        mine, ref, power = quantization_errors(model, name, args.bits, batches, eval_batches,
                                               {k: v for k, v in extra.items() if k in known})
        ratio = math.exp(statistics.fmean(math.log(max(a, 1e-30) / max(b, 1e-30)) for a, b in zip(mine, ref)))
        better = sum(a <= b * (1 + 1e-6) for a, b in zip(mine, ref))
        print(f"{name:<12}{ratio:>18.3f}{f'{better}/{len(mine)}':>18}{sum(mine) / sum(power):>15.3e}"
              f"{sum(ref) / sum(power):>13.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
