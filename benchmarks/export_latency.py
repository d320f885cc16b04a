"""Latency of our exported int8 models against each runtime's own route and fp32, side by side in one run.

First table, per torch.ao engine (fbgemm / x86 / qnnpack kernels): ours is ``lit_quant.deploy.int8.export_int8``
of our PTQ model (our qparams), torch.ao's is ``prepare_fx`` / ``convert_fx`` with its default qconfig.

Second table (``--runtimes``), the routes PyTorch supports today, each pair on the same runtime: fp32 eager and
``torch.compile``; torchao's own PT2E (``X86InductorQuantizer``, ``convert_pt2e``, Inductor with freezing)
against our ``--export pt2e`` program compiled the same way; onnxruntime on the fp32 model against our QDQ
model (QDQ fusions on: integer kernels); ExecuTorch XNNPACK fp32 against our int8 ``.pte`` (exported for each
batch size). Export times are printed against one calibration pass.

Timings are interleaved (each model in turn, repeated) on one thread, medians reported, and the ratios printed
are measured side by side in this one run.

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
                               "batches": [1, 4], "runtimes": ["onnx"]}
#: Images per calibration batch and the largest batch timed.
BATCH = 64
#: The second table's pairs: each runtime's fp32 or own int8 route, and ours on it.
RUNTIMES = ("compile", "pt2e", "onnx", "executorch")


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


def random_setup(calib_batches: int, seed: int, name: str = "resnet20", size: int = 28
                 ) -> tuple[torch.nn.Module, list[Any], torch.Tensor, str]:
    """A random-weight ``name`` for 1 x ``size`` x ``size`` inputs (10 classes), ``calib_batches`` batches of
    random images and 64 more; BatchNorm statistics from a few train-mode passes, as a trained model has."""
    torch.manual_seed(seed)
    model = build_model(name, 1, 10, image_size=size).train()
    calib = [torch.randn(BATCH, 1, size, size) for _ in range(calib_batches)]
    with torch.no_grad():
        for batch in calib[:4]:
            model(batch)
    title = f"random-weight {name} on random {size}x{size} images"
    return model.eval(), calib, torch.randn(BATCH, 1, size, size), title


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
    parser.add_argument("--model", default="resnet20", help="--random-weights: the model (default: resnet20)")
    parser.add_argument("--image-size", type=int, default=28, help="--random-weights: the image side (default: 28)")
    parser.add_argument("--runtimes", nargs="*", default=list(RUNTIMES), choices=RUNTIMES,
                        help="second table: the runtime pairs timed (default: all; none: only the torch.ao table)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    if not all(1 <= b <= BATCH for b in args.batches):
        parser.error(f"--batches must lie in 1..{BATCH}; got {args.batches}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    model, calib, x64, title = (random_setup(args.calib_batches, args.seed, args.model, args.image_size)
                                if args.random_weights
                                else checkpoint_setup(args.ckpt, args.calib_batches))
    start = time.perf_counter()
    qmodel = prepare(model, QuantPlan.from_bits(8, 8, act_observer="mse"))
    calibrate(qmodel, calib)
    args.calibration_s = time.perf_counter() - start
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
    runtime_rows = runtimes_table(model, qmodel, calib, x64, args)
    if args.json:
        report = {"benchmark": "export_latency", "torch": torch.__version__, "model": title, "args": vars(args),
                  "timing": rows, "runtimes": runtime_rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0



def _torchao_pt2e(model: torch.nn.Module, calib: list[Any]) -> torch.nn.Module:
    """torchao's own x86 PT2E route: ``X86InductorQuantizer`` defaults, calibrated on ``calib``, compiled by
    Inductor with freezing."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from lit_quant.deploy.pt2e import compile_x86

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model, (calib[0],), dynamic_shapes=({0: batch},))
    prepared = prepare_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for batch in calib:
            prepared(batch)
    return compile_x86(convert_pt2e(prepared))


def _onnx_fp32(model: torch.nn.Module, x: torch.Tensor, path: Path) -> torch.nn.Module:
    """The fp32 model in onnxruntime (TorchScript-based exporter, opset 17)."""
    from lit_quant.deploy.onnx_export import OnnxModel

    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return OnnxModel(path)


def _pte_fp32(model: torch.nn.Module, x: torch.Tensor, path: Path) -> torch.nn.Module:
    """The fp32 model as an ExecuTorch program with the XNNPACK delegate, for batches like ``x``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from lit_quant.deploy.pte import PteModel

    edge = to_edge_transform_and_lower(torch.export.export(model, (x,)), partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return PteModel(path, batch=len(x))


def runtimes_table(model: torch.nn.Module, qmodel: Any, calib: list[Any], x64: torch.Tensor,
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """The second table (module docstring): per runtime pair and batch, fp32 or the runtime's own int8 route
    against ours, and fp32 eager; a pair that cannot be built says why."""
    import tempfile

    from lit_quant.deploy.onnx_export import OnnxModel, export_onnx
    from lit_quant.deploy.pt2e import export_pt2e, lower_x86
    from lit_quant.deploy.pte import PteModel, export_executorch

    if not args.runtimes:
        return []
    rows: list[dict[str, Any]] = []
    print(f"\n{'runtime':26} {'batch':>5} {'fp32 eager ms':>13} {'theirs ms':>10} {'ours ms':>8} "
          f"{'ours/theirs':>11} {'ours speedup':>12} {'export s':>8} {'x calib':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for batch in args.batches:
            x = x64[:batch]
            pairs: dict[str, tuple[str, Any, Any, float]] = {}
            ours_pt2e: list[tuple[Any, float]] = []  # one compiled program serves both PT2E pairs
            for runtime in args.runtimes:
                try:
                    if runtime in ("compile", "pt2e"):
                        if runtime == "compile":
                            theirs, label = torch.compile(model), "fp32 torch.compile / ours pt2e"
                        else:
                            theirs, label = _torchao_pt2e(model, calib), "torchao PT2E x86 / ours pt2e"
                        if not ours_pt2e:
                            start = time.perf_counter()
                            program = export_pt2e(qmodel, x)
                            ours_pt2e.append((lower_x86(program), time.perf_counter() - start))
                        ours, export_s = ours_pt2e[0]
                    elif runtime == "onnx":
                        theirs, label = _onnx_fp32(model, x, folder / "fp32.onnx"), "onnxruntime fp32 / ours QDQ"
                        start = time.perf_counter()
                        ours = OnnxModel(export_onnx(qmodel, folder / "ours.onnx", x), fuse_qdq=True)
                        export_s = time.perf_counter() - start
                    else:
                        theirs, label = _pte_fp32(model, x, folder / "fp32.pte"), "ExecuTorch fp32 / ours int8"
                        start = time.perf_counter()
                        ours = PteModel(export_executorch(qmodel, x, folder / "ours.pte", batch=batch), batch=batch)
                        export_s = time.perf_counter() - start
                    for m in (theirs, ours):  # compile / load / warm-up
                        _time(m, x, 3)
                    pairs[runtime] = (label, theirs, ours, export_s)
                except Exception as exc:  # noqa: BLE001 - a route that cannot be built is a row saying why
                    message = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else type(exc).__name__
                    print(f"{runtime:26} {batch:5d} fails: {message}")
                    rows.append({"runtime": runtime, "batch": batch, "error": message})
            _time(model, x, 3)
            times: dict[str, list[float]] = {"fp32": []}
            for _ in range(args.rounds):
                times["fp32"] += _time(model, x, args.repeats)
                for runtime, (_, theirs, ours, _) in pairs.items():
                    times.setdefault(f"{runtime}-theirs", []).extend(_time(theirs, x, args.repeats))
                    times.setdefault(f"{runtime}-ours", []).extend(_time(ours, x, args.repeats))
            fp32 = statistics.median(times["fp32"])
            for runtime, (label, _, _, export_s) in pairs.items():
                theirs_ms, ours_ms = (statistics.median(times[f"{runtime}-{k}"]) for k in ("theirs", "ours"))
                row = {"runtime": runtime, "label": label, "batch": batch, "fp32_ms": fp32, "theirs_ms": theirs_ms,
                       "ours_ms": ours_ms, "ours_over_theirs": ours_ms / theirs_ms, "ours_speedup": fp32 / ours_ms,
                       "export_s": export_s, "export_over_calibration": export_s / args.calibration_s}
                rows.append(row)
                print(f"{label:26} {batch:5d} {fp32:13.2f} {theirs_ms:10.2f} {ours_ms:8.2f} "
                      f"{row['ours_over_theirs']:10.2f}x {row['ours_speedup']:11.2f}x {export_s:8.1f} "
                      f"{row['export_over_calibration']:6.1f}x")
    return rows

if __name__ == "__main__":
    raise SystemExit(main())
