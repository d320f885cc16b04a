"""Our default PTQ recipe beside Brevitas's and NNCF's PTQ: one checkpoint, the same calibration and test images.

For each setting (``--settings``; W8A8, W4A8, W4A4 with the first and last layers at 8 bits, W4A4 on every
tensor) the script runs:

- **ours**: ``quantize.py --mode ptq`` at that width with the default recipe (round-to-nearest at 8 bits, GPTQ
  rounding and bias correction below), and at W8A8 the torch.ao int8 row the same run reports;
- **Brevitas** (``brevitas_examples``' ImageNet PTQ pipeline, its recommended settings): graph equalization
  (20 iterations, biases merged) after folding BatchNorm, per-channel float-scale weights, asymmetric
  per-tensor activations at the 99.999th percentile, 32-bit biases, calibration, then bias correction;
  ``Brevitas + GPTQ`` adds GPTQ with act-order before bias correction. Brevitas's ``fx`` backend quantizes
  the whole graph; its "first and last layers at 8 bits" exists only in its ``layerwise`` backend (each
  Conv/Linear quantizes its input and weights; additions stay float), which the first/last setting uses;
- **NNCF**: ``nncf.quantize`` (fast bias correction, its default), weights and activations at the setting's
  widths (below 8 bits for its NPU target, the one hardware configuration with 4-bit quantizers). NNCF has no
  per-layer widths, so the first/last setting is not offered.

Every model is calibrated on the calibration images ``quantize.py`` uses (the first ``--calib-batches``
batches of the training split) and scored on the checkpoint's test split. A peer that is not installed
(``pip install -r requirements-bench.txt``), or that refuses a setting, gets its reason in the table.
Seconds are each method's calibration and weight-rounding time, evaluation excluded.

Run:  python benchmarks/peers.py --ckpt checkpoints/fashion-1ep/best.ckpt
      python benchmarks/peers.py --smoke --ckpt <tiny checkpoint> --json /tmp/peers.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke import add_smoke_arguments, parse_with_smoke

import quantize
from lit_quant.app.pipeline.run import evaluation_data, run_quantize
from lit_quant.app.training import Arch, load_classifier

#: The settings: name -> (weight bits, activation bits, bits of the first and last layers or None).
SETTINGS: dict[str, tuple[int, int, int | None]] = {
    "W8A8": (8, 8, None), "W4A8": (4, 8, None), "W4A4-fl8": (4, 4, 8), "W4A4": (4, 4, None)}

#: The peer methods, in the table's column order.
PEERS = ("Brevitas", "Brevitas + GPTQ", "NNCF")

#: Settings a peer has no option for, with the reason shown instead of a figure.
NOT_OFFERED: dict[tuple[str, str], dict[str, Any]] = {
    ("NNCF", "W4A4-fl8"): {"top1": None, "reason": "not offered: no per-layer widths in nncf.quantize"}}

#: Sizes of ``--smoke``.
SMOKE_SIZES: dict[str, Any] = {"calib_batches": 2, "settings": ["W8A8", "W4A4-fl8"], "threads": 1}


def top1(model: nn.Module, loader: Iterable[Any]) -> float:
    """Test top-1 in percent: ``100 * #(argmax logits == label) / #images``."""
    correct = total = 0
    model.eval()
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            logits = getattr(logits, "value", logits)  # a Brevitas QuantTensor carries its float value
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    return 100.0 * correct / total


def run_ours(ckpt: str, setting: str, calib_batches: int, batch_size: int) -> dict[str, Any]:
    """``quantize.py --mode ptq`` at the setting's widths (default recipe): fp32, ours and torch.ao's top-1."""
    weight_bits, act_bits, first_last = SETTINGS[setting]
    argv = ["--ckpt", ckpt, "--mode", "ptq", "--weight-bits", str(weight_bits), "--act-bits", str(act_bits),
            "--calib-batches", str(calib_batches), "--batch-size", str(batch_size), "--no-latency",
            "--no-progress", "--name", f"peers-{setting.lower()}"]
    if first_last:
        argv += ["--first-last-bits", str(first_last)]
    cfg, _, _ = quantize.resolve_args(argv)
    with contextlib.redirect_stdout(io.StringIO()):
        rows = run_quantize(cfg).rows
    ours = next(r for r in rows if r["variant"] == "ptq")
    builtin = [r for r in rows if r["variant"] == "builtin-ptq"]
    return {"fp32": next(r["top1"] for r in rows if r["variant"] == "fp32"), "top1": ours["top1"],
            "seconds": ours["calib_s"], "note": ours["note"], "command": "python quantize.py " + " ".join(argv),
            # torch.ao's row is int8 whatever the widths asked: a peer of the W8A8 setting only
            "torch.ao": {"top1": builtin[0]["top1"], "backend": builtin[0]["backend"]}
            if builtin and (weight_bits, act_bits, first_last) == (8, 8, None) else None}


def brevitas_ptq(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], setting: str, gptq: bool,
                 in_channels: int, num_classes: int) -> nn.Module:
    """Brevitas's ImageNet PTQ example pipeline on ``model`` (see the module docstring)."""
    from brevitas.graph.quantize import layerwise_quantize, preprocess_for_quantize
    from brevitas.inject import value
    from brevitas_examples.imagenet_classification.ptq import ptq_common

    weight_bits, act_bits, first_last = SETTINGS[setting]
    model = preprocess_for_quantize(copy.deepcopy(model).eval(), equalize_iters=20, equalize_merge_bias=True,
                                    merge_bn=True)
    common = {"bias_bit_width": 32, "act_quant_percentile": 99.999, "act_quant_type": "asym",
              "dtype": torch.float32, "device": "cpu"}
    if first_last is None:
        quant = ptq_common.quantize_model(model, backend="fx", weight_bit_width=weight_bits, act_bit_width=act_bits,
                                          weight_quant_granularity="per_channel", scale_factor_type="float_scale",
                                          quant_format="int", **common)
    else:
        # the example's layerwise backend picks its first/last layers as ImageNet's (3 input channels, 1000
        # classes); the same rule with this data set's channels and classes
        def is_first_or_last(module: nn.Module) -> bool:
            return (isinstance(module, nn.Conv2d) and module.in_channels == in_channels) or \
                (isinstance(module, nn.Linear) and module.out_features == num_classes)

        @value
        def weight_bit_width(module: nn.Module) -> int:
            return first_last if is_first_or_last(module) else weight_bits

        @value
        def act_bit_width(module: nn.Module) -> int:
            return first_last if is_first_or_last(module) else act_bits

        maps = ptq_common.create_quant_maps(
            weight_bit_width=weight_bit_width, act_bit_width=act_bit_width, weight_param_method="stats",
            weight_scale_type="float_scale", weight_quant_type="sym", weight_quant_granularity="per_channel",
            weight_narrow_range=False, weight_quant_format="int", act_quant_format="int",
            act_scale_type="float_scale", act_scale_computation_type="static", act_param_method="stats",
            act_quant_granularity="per_tensor", **{k: v for k, v in common.items() if k != "act_quant_type"},
            act_quant_type="asym")
        quant = layerwise_quantize(model, compute_layer_map=maps[1])
    quant.eval()
    with torch.no_grad():
        quant(calib[0][0])  # some quantizers initialise on a first forward (as the example does)
    with contextlib.redirect_stderr(io.StringIO()):  # the example's tqdm bars
        ptq_common.calibrate(calib, quant)
        if gptq:
            ptq_common.apply_gptq(calib, quant, act_order=True, create_weight_orig=True)
        ptq_common.apply_bias_correction(calib, quant)
    return quant


def nncf_ptq(model: nn.Module, calib: list[tuple[torch.Tensor, torch.Tensor]], setting: str) -> nn.Module:
    """``nncf.quantize`` with fast bias correction at the setting's widths (the ``NPU`` target device below 8
    bits)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    weight_bits, act_bits, _ = SETTINGS[setting]
    # NNCF's CPU hardware configuration allows 8 and 16 bits only; its NPU configuration also has 4-bit weights
    # and activations
    device = nncf.TargetDevice.ANY if (weight_bits, act_bits) == (8, 8) else nncf.TargetDevice.NPU
    params = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(num_bits=weight_bits),
                                            activations_quantization_params=QuantizationParameters(num_bits=act_bits))
    dataset = nncf.Dataset(calib, lambda batch: batch[0])
    return nncf.quantize(copy.deepcopy(model).eval(), dataset, subset_size=sum(len(b[1]) for b in calib),
                         fast_bias_correction=True, target_device=device, advanced_parameters=params)


def run_peer(name: str, quantize_fn: Callable[[], nn.Module], test: Iterable[Any]) -> dict[str, Any]:
    """Quantize with ``quantize_fn`` (timed) and score on ``test``; an absent library or a refusal is recorded
    with its reason instead of a figure."""
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = quantize_fn()
    except ImportError as exc:
        return {"top1": None, "reason": f"not installed ({exc.name})"}
    except Exception as exc:  # noqa: BLE001 - a peer's refusal of a setting is a result to report
        return {"top1": None, "reason": f"refused: {type(exc).__name__}: {' '.join(str(exc).split())[:100]}"}
    seconds = time.perf_counter() - start
    return {"top1": top1(model, test), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a train.py checkpoint (best.ckpt)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help=f"widths to compare (default: {' '.join(SETTINGS)})")
    parser.add_argument("--calib-batches", type=int, default=32, help="calibration batches (default: 32)")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration / test batch size (default: 128)")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="peer methods (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    classifier = load_classifier(Path(args.ckpt))
    model = classifier.model.eval()
    arch = Arch.from_dict(classifier.hparams.arch, args.ckpt)
    _, dm = evaluation_data(Path(args.ckpt), arch, args.batch_size, args.calib_batches)
    calib = list(dm.full_calibration_dataloader())
    test = list(dm.test_dataloader())
    in_channels, num_classes = calib[0][0].shape[1], dm.info.num_classes
    fp32 = top1(model, test)
    peers: dict[str, Callable[[str], Callable[[], nn.Module]]] = {
        "Brevitas": lambda s: lambda: brevitas_ptq(model, calib, s, False, in_channels, num_classes),
        "Brevitas + GPTQ": lambda s: lambda: brevitas_ptq(model, calib, s, True, in_channels, num_classes),
        "NNCF": lambda s: lambda: nncf_ptq(model, calib, s)}

    results: dict[str, Any] = {}
    for setting in args.settings:
        ours = run_ours(args.ckpt, setting, args.calib_batches, args.batch_size)
        if abs(ours["fp32"] - fp32) > 50.0 / len(dm.test_set):  # half an image (Lightning sums in float32)
            raise RuntimeError(f"quantize.py's fp32 top-1 {ours['fp32']} differs from {fp32}: not the same test set")
        results[setting] = {"ours": ours}
        for name in args.peers:
            results[setting][name] = NOT_OFFERED.get((name, setting)) or run_peer(name, peers[name](setting), test)
        print(f"{setting} done", file=sys.stderr, flush=True)

    images = sum(len(b[1]) for b in calib)
    print(f"{arch.model} on {arch.data} ({args.ckpt}), fp32 top-1 {fp32:.2f} %; {images} calibration images, "
          f"{sum(len(b[1]) for b in test)} test images; top-1 % (delta to fp32) [seconds]")
    header = ["setting", "ours (default recipe)", "torch.ao int8", *args.peers]
    print(" | ".join(header))
    for setting, row in results.items():
        cells = [setting, cell(row["ours"], fp32), cell(row["ours"]["torch.ao"], fp32)]
        cells += [cell(row[name], fp32) for name in args.peers]
        print(" | ".join(cells))
        best = max((row[name]["top1"] for name in args.peers if row[name]["top1"] is not None), default=None)
        row["ours"]["minus_best_peer"] = None if best is None else row["ours"]["top1"] - best
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "fp32": fp32, "calibration_images": images,
                                               "results": results}, indent=2) + "\n")
    return 0


def cell(result: dict[str, Any] | None, fp32: float) -> str:
    """'87.24 (-0.15) [31.0 s]', or the reason there is no figure."""
    if result is None:
        return "-"
    if result.get("top1") is None:
        return result["reason"]
    seconds = f" [{result['seconds']:.1f} s]" if result.get("seconds") else ""
    return f"{result['top1']:.2f} ({result['top1'] - fp32:+.2f}){seconds}"


if __name__ == "__main__":
    sys.exit(main())
