"""Time of the layer-wise PTQ steps (GPTQ, AdaRound, bias correction) on ResNet-20, beside calibration.

Prepares ResNet-20 (1x28x28 input) at ``--weight-bits`` / ``--act-bits`` (``mse`` ranges), calibrates it on
``--images`` Fashion-MNIST test images (random images of that shape when the data set is not installed),
then runs each layer-wise step alone on a fresh copy of the calibrated model, on the same images: GPTQ
rounding, AdaRound rounding (``--adaround-iters`` Adam steps per layer) and bias correction. Prints each
step's seconds, its ratio to the calibration's, and the mean relative output error of a layer
(``||(W - Q) X|| / ||W X||``) with the step's rounding against round-to-nearest's.

``--ckpt`` uses a trained Fashion-MNIST checkpoint of ``train.py`` instead of random weights.
``--smoke`` shrinks every size to seconds (checks that the benchmark runs; measures nothing); ``--json PATH``
also writes every figure printed.

Run:  python benchmarks/layerwise.py --ckpt checkpoints/fashion-mnist-resnet20/best.ckpt [--images 1024 --threads 2]
      python benchmarks/layerwise.py --smoke --json /tmp/layerwise.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibration import load_images, load_trained, make_model
from smoke import add_smoke_arguments, parse_with_smoke

from lit_quant.quant import QuantPlan, calibrate, prepare
from lit_quant.quant.layerwise import layerwise_ptq, weight_rounding

#: Sizes of ``--smoke``.
SMOKE_SIZES: dict[str, Any] = {"images": 32, "batch_size": 16, "adaround_iters": 20, "threads": 1}

#: The steps timed: name -> layerwise_ptq arguments.
STEPS: dict[str, dict[str, Any]] = {"GPTQ": {"rounding": "gptq"}, "AdaRound": {"rounding": "adaround"},
                                    "bias correction": {"rounding": "nearest", "bias_correction": True}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a train.py Fashion-MNIST checkpoint (default: random weights)")
    parser.add_argument("--images", type=int, default=1024, help="calibration images (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration batch size (default: 128)")
    parser.add_argument("--weight-bits", type=int, default=4, help="weight bits, 2..16 (default: 4)")
    parser.add_argument("--act-bits", type=int, default=8, help="activation bits, 2..16 (default: 8)")
    parser.add_argument("--adaround-iters", type=int, default=2000, help="AdaRound steps per layer (default: 2000)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and images (default: 0)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    torch.set_num_threads(args.threads)
    model = load_trained(args.ckpt) if args.ckpt else make_model(args.seed)
    images, source = load_images(args.images, args.seed)
    batches = list(images.split(args.batch_size))
    plan = QuantPlan.from_bits(args.weight_bits, args.act_bits, weight_observer="mse", act_observer="mse")
    start = time.perf_counter()
    calibrated = prepare(model, plan)
    calibrate(calibrated, batches)
    calib_s = time.perf_counter() - start
    print(f"ResNet-20 ({'checkpoint ' + args.ckpt if args.ckpt else 'random weights'}), W{args.weight_bits}"
          f"A{args.act_bits}, {len(images)} calibration images ({source}), {args.threads} threads")
    print(f"{'step':<16} {'seconds':>8} {'x calibration':>14} {'layer error':>12} {'nearest':>8}")
    print(f"{'calibration':<16} {calib_s:>8.1f} {1.0:>14.2f}")
    report: dict[str, Any] = {"args": vars(args), "calibration": {"seconds": calib_s}}
    for name, kwargs in STEPS.items():
        q = copy.deepcopy(calibrated)
        rounding = weight_rounding(kwargs.get("rounding", "gptq"), iters=args.adaround_iters)
        result = layerwise_ptq(q, batches, rounding, bias_correction=kwargs.get("bias_correction", False))
        errors = list(result.errors.values())
        used, nearest = (sum(e[i] for e in errors) / len(errors) for i in (1, 0))
        print(f"{name:<16} {result.seconds:>8.1f} {result.seconds / calib_s:>14.2f} {used:>12.4f} {nearest:>8.4f}")
        report[name] = {"seconds": result.seconds, "ratio": result.seconds / calib_s, "layers": result.layers,
                        "rel_err_ours": used, "rel_err_nearest": nearest}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
