"""Calibration speed and quantization error of our observers against plain forwards and torch.ao.

Times PTQ calibration of ResNet-20 (1x28x28 input, Fashion-MNIST test images when found, else random
images of that shape) with each of our observers on the activations, against (a) plain fp32 forward passes
of the float model, (b) the BN-folded float model, and (c) torch.ao FX ``prepare_fx`` with
``HistogramObserver`` activations, all in the same run and interleaved per repeat so machine load hits
them alike. Calibration time includes computing every quantizer's qparams at the end.

Error: for every activation tensor our model quantizes, the MSE between the tensor and its fake-quantized
copy, with our qparams and with the qparams torch.ao's ``MinMaxObserver`` and ``HistogramObserver`` compute
on the very same tensors. "The tensor" is what the quantizer quantizes, which is not always its input: a
ReLU fused into its output quantizer (``FakeQuantize.forward(x, relu=True)``) makes that ``relu(x)``. So
every tensor is taken where the quantizer hands it to its own observer (a forward pre-hook on the
observer), which by the quantizer's contract is the tensor it quantizes: calibration feeds it to the
torch.ao observers, and an untimed pass over the error images (observers on, fake quant off: the float
model's activations) measures both errors on it. Reported per observer against each torch.ao observer as
the geometric mean over tensors of ``ours / torch.ao`` and the count of tensors where ours is no worse; the
counterpart column compares like with like (``minmax`` with ``MinMaxObserver``, whose qparams it matches
bit for bit, every other observer with ``HistogramObserver``, torch.ao's default activation observer).

``--ckpt`` replaces the random-weight model by a trained Fashion-MNIST checkpoint of ``train.py`` (its
architecture must take 1x28x28 inputs): trained activations have the long tails that decide 8-bit errors.

``--smoke`` shrinks every size to seconds (a check that the benchmark runs and its figures are sane, not a
measurement); ``--json PATH`` also writes every figure printed, for scripts and tests.

``--model mobilenet_v2`` (or any torchvision classifier) times a random-weight network of that
architecture instead of ResNet-20, on the same images padded to its smallest input.

Run:  python benchmarks/calibration.py [--images 2048 --batch-size 256 --repeats 5 --threads 2 --clock wall]
      python benchmarks/calibration.py --ckpt checkpoints/fashion-mnist-resnet20/best.ckpt --skip-timing
      python benchmarks/calibration.py --smoke --json /tmp/calibration.json
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke import add_smoke_arguments, parse_with_smoke  # noqa: E402
from lit_quant.app.models import build_model, model_info
from lit_quant.quant import (
    OBSERVER_NAMES,
    OBSERVERS,
    QParams,
    QuantPlan,
    QuantSpec,
    calibrate,
    enable_fake_quant,
    enable_observer,
    fake_quantize,
    fuse_conv_bn,
    iter_quantizers,
    prepare,
    reset_observers,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torch.ao.quantization import (
        HistogramObserver,
        MinMaxObserver,
        QConfig,
        QConfigMapping,
        default_per_channel_weight_observer,
    )
    from torch.ao.quantization.quantize_fx import prepare_fx

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

#: torch.ao observers every one of ours is measured against, by the name printed.
AO_OBSERVERS: dict[str, type[nn.Module]] = {"MinMaxObserver": MinMaxObserver, "HistogramObserver": HistogramObserver}
#: torch.ao observer computing the same statistic as ours; observers not listed compare with HistogramObserver,
#: torch.ao's default activation observer.
AO_COUNTERPART: dict[str, str] = {"minmax": "MinMaxObserver"}

#: Sizes of ``--smoke``: seconds on one core, enough for every code path (several batches, several images).
SMOKE_SIZES: dict[str, Any] = {"images": 32, "batch_size": 16, "repeats": 1, "threads": 1, "error_images": 16}


def load_images(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """``n`` normalised 1x28x28 images: Fashion-MNIST test images if present, else seeded random ones."""
    if FASHION.exists():
        raw = gzip.decompress(FASHION.read_bytes())
        images = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(-1, 1, 28, 28)[:n]
        return (images.float() / 255 - 0.2860) / 0.3530, f"Fashion-MNIST test images ({FASHION})"
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=g) - 0.2860) / 0.3530, "random images (Fashion-MNIST not found)"


def make_model(seed: int, name: str = "resnet20") -> nn.Module:
    """``name`` (1 input channel, 10 classes, the small-image stem for torchvision models) with random
    weights and random BatchNorm statistics (non-trivial activations), eval mode."""
    torch.manual_seed(seed)
    model = build_model(name, 1, 10, small_input=True)  # small_input only changes torchvision models
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def load_trained(path: str) -> nn.Module:
    """The fp32 model of a ``train.py`` checkpoint, eval mode (lit_quant's own loader and its errors)."""
    from lit_quant.app.training import load_classifier

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


def ao_observer(kind: str, spec: QuantSpec) -> nn.Module:
    """A torch.ao observer of ``kind`` (a key of :data:`AO_OBSERVERS`) on ``spec``'s integer range.

    Raises:
        ValueError: a spec torch.ao's per-tensor affine ``quint8`` observers cannot express.
    """
    if spec.scheme != "asym_u" or spec.per_channel or not 0 <= spec.quant_min < spec.quant_max <= 255:
        raise ValueError(f"the torch.ao comparison needs per-tensor asym_u activations of at most 8 bits; got {spec}")
    return AO_OBSERVERS[kind](dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=spec.quant_min,
                              quant_max=spec.quant_max)


def hook_observed(model: nn.Module, sink: Callable[[str, torch.Tensor], None]) -> list[RemovableHandle]:
    """Call ``sink(name, x)`` with every tensor an activation quantizer of ``model`` hands to its observer.

    The hook sits on the observer, not on the quantizer's own forward: the quantizer observes exactly the
    tensor it quantizes (``relu(x)`` for ``forward(x, relu=True)``), so whatever it does to its input
    first, the comparison sees the same tensor as the quantizer. Remove the handles when done.
    """
    return [fq.observer.register_forward_pre_hook(lambda _m, a, n=name: sink(n, a[0]))
            for name, fq in iter_quantizers(model, "act")]


def check_seen(counts: dict[str, int], batches: int, what: str) -> None:
    """Raise unless every quantizer's observer was called at least once per batch.

    An observer fed some other way than its forward (e.g. a range taken from the fake-quant pass) would
    leave its quantizer's tensors out of the comparison without a word: fail loudly instead.
    """
    missed = [name for name, n in counts.items() if n < batches]
    if missed:
        raise RuntimeError(f"{what}: {len(missed)} quantizer(s) did not call their observer on every batch "
                           f"({', '.join(missed[:4])}): the benchmark cannot see the tensors they quantize")


def timed(fn: Callable[[], None], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def quantization_errors(model: nn.Module, observer: str, bits: int, batches: list[torch.Tensor],
                        eval_batches: list[torch.Tensor], options: dict[str, float] | None = None,
                        ) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """Per activation tensor: our MSE sum, each torch.ao observer's (``AO_OBSERVERS``, qparams computed on
    the same tensors), and the sum of ``x^2``, all on the tensors the quantizers quantize (see
    :func:`hook_observed`) of ``eval_batches``."""
    q = prepare(model, QuantPlan.from_bits(8, bits, act_observer=observer, observer_args={observer: options or {}}))
    acts = dict(iter_quantizers(q, "act"))
    refs = {kind: {name: ao_observer(kind, fq.spec) for name, fq in acts.items()} for kind in AO_OBSERVERS}
    counts = dict.fromkeys(acts, 0)

    def observe(name: str, x: torch.Tensor) -> None:
        counts[name] += 1
        for by_name in refs.values():
            by_name[name](x)

    hooks = hook_observed(q, observe)
    try:
        calibrate(q, batches)  # our observers and torch.ao's see the same tensors
    finally:
        for h in hooks:
            h.remove()
    check_seen(counts, len(batches), "calibration")
    ours_qp: dict[str, QParams] = {name: fq.qparams() for name, fq in acts.items()}
    ref_qp = {kind: {name: obs.calculate_qparams() for name, obs in by_name.items()} for kind, by_name in refs.items()}
    ours_err = dict.fromkeys(acts, 0.0)
    ref_err = {kind: dict.fromkeys(acts, 0.0) for kind in refs}
    power = dict.fromkeys(acts, 0.0)
    counts = dict.fromkeys(acts, 0)

    def measure(name: str, x: torch.Tensor) -> None:
        counts[name] += 1
        qp = ours_qp[name]
        ours = fake_quantize(x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.axis)
        ours_err[name] += float(((ours - x) ** 2).sum())
        for kind, by_name in ref_qp.items():
            s, z = by_name[name]
            ref = fake_quantize(x, s, z, qp.quant_min, qp.quant_max)
            ref_err[kind][name] += float(((ref - x) ** 2).sum())
        power[name] += float((x ** 2).sum())

    # Observers on and fake quant off, as in calibration: the model computes in float and every quantizer
    # hands its observer what it quantizes. Both sides' qparams are the copies taken above, so whatever the
    # observers record in this pass changes nothing measured.
    enable_fake_quant(q, False)
    enable_observer(q, True)
    hooks = hook_observed(q, measure)
    try:
        forward_all(q, eval_batches)
    finally:
        for h in hooks:
            h.remove()
    check_seen(counts, len(eval_batches), "error pass")
    return (list(ours_err.values()), {kind: list(errs.values()) for kind, errs in ref_err.items()},
            list(power.values()))


def compare(mine: list[float], ref: list[float], power: list[float]) -> dict[str, float]:
    """Geometric mean over tensors of ``mine / ref``, tensors where mine is no worse, both relative errors."""
    ratio = math.exp(statistics.fmean(math.log(max(a, 1e-30) / max(b, 1e-30)) for a, b in zip(mine, ref)))
    return {"geomean_ratio": ratio, "no_worse": sum(a <= b * (1 + 1e-6) for a, b in zip(mine, ref)),
            "tensors": len(mine), "rel_err_ours": sum(mine) / sum(power), "rel_err_ao": sum(ref) / sum(power)}


def time_calibration(args: argparse.Namespace, model: nn.Module, batches: list[torch.Tensor], source: str
                     ) -> dict[str, dict[str, float]]:
    """Median calibration time per variant, interleaved per repeat, printed with the ratio to a plain forward;
    returned as ``{variant: {"seconds": ..., "ratio": ...}}``."""
    fused, _ = fuse_conv_bn(model)
    ours = {name: prepare(model, QuantPlan.from_bits(8, 8, act_observer=name)) for name in args.observers}
    ao = ao_prepare(model, batches[0][:1])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {sum(len(b) for b in batches)} images "
          f"({source}), batch {args.batch_size}, {args.repeats} repeats (median), {args.clock} clock, "
          f"load average {os.getloadavg()[0]:.2f} at start")

    forward_all(model, batches[:1])  # warm-up
    times: dict[str, list[float]] = {"fp32 forward": [], "fp32 forward, BN folded": [], "torch.ao histogram": []}
    times.update({name: [] for name in ours})
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
        times["fp32 forward"].append(timed(lambda: forward_all(model, batches), clock))
        times["fp32 forward, BN folded"].append(timed(lambda: forward_all(fused, batches), clock))
        fresh = copy.deepcopy(ao)
        times["torch.ao histogram"].append(timed(lambda fresh=fresh: ao_calibrate(fresh, batches), clock))
        for name, q in ours.items():
            reset_observers(q)
            times[name].append(timed(lambda q=q: calibrate(q, batches), clock))
    base = statistics.median(times["fp32 forward"])
    rows = {name: {"seconds": statistics.median(ts), "ratio": statistics.median(ts) / base}
            for name, ts in times.items()}
    print(f"\n{'calibration':<26}{'seconds':>9}{'x fp32 forward':>16}")
    for name, row in rows.items():
        print(f"{name:<26}{row['seconds']:>9.3f}{row['ratio']:>16.2f}")

    print(f"load average {os.getloadavg()[0]:.2f} after timing")
    return rows


def measure_errors(args: argparse.Namespace, model: nn.Module, batches: list[torch.Tensor],
                   eval_batches: list[torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Quantization errors of every observer against every torch.ao observer, printed; returned per observer
    as ``{"counterpart": kind, "vs": {kind: compare(...)}}``."""
    print(f"\nquantization error at {args.bits}-bit activations, per activation tensor ({args.error_images} images), "
          "vs torch.ao observers on the same tensors (the tensors the quantizers quantize)")
    print(f"{'observer':<12}{'counterpart':>19}{'ours/ao':>10}{'no worse':>10}{'ours/MinMax':>13}{'ours/Hist':>11}"
          f"{'rel.err ours':>14}{'MinMax':>11}{'Hist':>11}")
    extra = {k: float(v) if "." in v else int(v) for k, v in (a.split("=", 1) for a in args.observer_arg)}
    results: dict[str, dict[str, Any]] = {}
    for name in args.observers:
        known = OBSERVERS[name].DEFAULTS
        mine, refs, power = quantization_errors(model, name, args.bits, batches, eval_batches,
                                                {k: v for k, v in extra.items() if k in known})
        vs = {kind: compare(mine, ref, power) for kind, ref in refs.items()}
        counterpart = AO_COUNTERPART.get(name, "HistogramObserver")
        results[name] = {"counterpart": counterpart, "vs": vs}
        c, mm, hist = vs[counterpart], vs["MinMaxObserver"], vs["HistogramObserver"]
        no_worse = f"{c['no_worse']}/{c['tensors']}"
        print(f"{name:<12}{counterpart:>19}{c['geomean_ratio']:>10.3f}{no_worse:>10}"
              f"{mm['geomean_ratio']:>13.3f}{hist['geomean_ratio']:>11.3f}{c['rel_err_ours']:>14.3e}"
              f"{mm['rel_err_ao']:>11.3e}{hist['rel_err_ao']:>11.3e}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bits", type=int, default=8, help="activation bits for the error comparison (at most 8)")
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
    parser.add_argument("--model", default="resnet20",
                        help="random-weight model: resnet20 or a torchvision classifier such as mobilenet_v2 "
                             "(images padded to its smallest input)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    images, source = load_images(args.images, args.seed)
    model = load_trained(args.ckpt) if args.ckpt else make_model(args.seed, args.model)
    size = model_info(args.model).min_size if not args.ckpt else 28
    if size > images.shape[-1]:  # zero-pad (the normalised background) up to the model's smallest input
        pad = size - images.shape[-1]
        images = nn.functional.pad(images, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2),
                                   value=float(images.min()))
    batches = list(images.split(args.batch_size))
    label = args.ckpt or f"random-weight {args.model}"
    print(f"model: {label}")
    report: dict[str, Any] = {"benchmark": "calibration", "torch": torch.__version__, "model": label,
                              "images": source, "args": vars(args)}
    if not args.skip_timing:
        report["timing"] = time_calibration(args, model, batches, source)
    if not args.skip_errors:
        eval_batches = list(images[:args.error_images].split(args.batch_size))
        report["errors"] = measure_errors(args, model, batches, eval_batches)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
