"""The models users bring, quantized with the default flags and measured against fp32: the zoo accuracy benchmark.

For each model (torchvision's standard stem, no ``--small-input``) and data set it runs, as a user would:

- ``train.py --data D --model M --image-size 32 --epochs E`` with the default training recipe (the family's,
  see ``train.py --help``), cached: a run folder ``<out>/<data>-<model>-<E>ep/`` holds the command it was
  trained with, and a later run of the benchmark reuses it when the command is the same (an interrupted
  training resumes from its ``last.ckpt``);
- ``quantize.py --mode compare --bits 8``: fp32, ours at W8A8, torch.ao on every backend this CPU runs;
- ``quantize.py --weight-bits 4 --act-bits 8``: ours at W4A8;
- ``--export onnx`` and ``--export int8`` (on every torch.ao backend of this CPU) of the W8A8 result, each its
  own run, so that a model an exporter cannot express gets that exporter's one-line reason and keeps its
  other rows;
- ``quantize.py --sensitivity --bits 8``: the tensor whose 8-bit quantization alone costs most;
- with ``--qat``: ``quantize.py --mode qat --bits 8`` and ``--bits 4`` (our QAT, torch.ao's QAT row left out).

Every step's report stays in the run folder (``quantize/zoo-<step>/``) and the collected figures in
``<out>/zoo.json``: a rerun skips what is done, so an interrupted benchmark resumes where it stopped. Steps run
one at a time, with ``--no-latency`` (accuracy only; timing is ``benchmarks/export_latency.py``'s).

Run:  python benchmarks/zoo.py                                    # the nine models on digits at 32 px
      python benchmarks/zoo.py --data fashion-mnist --models resnet18 mobilenet_v2 --epochs 5 --qat
      python benchmarks/zoo.py --smoke --json /tmp/zoo.json       # two tiny runs: checks the chain works
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smoke import add_smoke_arguments, parse_with_smoke

ROOT = Path(__file__).resolve().parents[1]
#: The zoo of tests/app/test_zoo.py: torchvision's classifier families, convolutional and transformer.
ZOO = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
       "shufflenet_v2_x0_5", "convnext_tiny", "vit_b_16")
#: Models without convolutions: the W4A8 and QAT targets are for convolutional models.
TRANSFORMERS = ("vit_b_16",)
#: Sizes of ``--smoke``.
SMOKE_SIZES: dict[str, Any] = {"models": ["resnet18"], "epochs": 1, "limit_train_batches": 2, "qat": False,
                               "steps": ["w8a8", "onnx"]}


@dataclass(frozen=True)
class Step:
    """One ``quantize.py`` run of a model: its flags and what it contributes to the table."""

    name: str
    flags: tuple[str, ...]


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("w8a8", ("--mode", "compare", "--bits", "8")),
    Step("w4a8", ("--weight-bits", "4", "--act-bits", "8")),
    Step("onnx", ("--bits", "8", "--export", "onnx")),
    Step("int8", ("--mode", "compare", "--bits", "8", "--export", "int8")),
    Step("sensitivity", ("--sensitivity", "--bits", "8")),
    Step("qat8", ("--mode", "qat", "--bits", "8", "--no-builtin-qat")),
    Step("qat4", ("--mode", "qat", "--bits", "4", "--no-builtin-qat")),
)}
QAT_STEPS = ("qat8", "qat4")


def run(command: list[str], log: Path) -> tuple[int, str]:
    """Run ``command`` from the repository root, its output appended to ``log``; the exit status and the
    last line it printed on stderr (the one-line error of a refused run)."""
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(command)}\n")
        fh.flush()
        proc = subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.PIPE, text=True, check=False)
        fh.write(proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else ""


def train_command(data: str, model: str, epochs: int, run_name: str, out: Path,
                  extra: list[str]) -> list[str]:
    """The training command of one zoo checkpoint: train.py's defaults for everything but the model, data,
    image size and epochs."""
    return [sys.executable, "train.py", "--data", data, "--model", model, "--image-size", "32", "--epochs",
            str(epochs), "--run-name", run_name, "--checkpoint-dir", str(out), "--no-progress", *extra]


def command_key(command: list[str]) -> str:
    """What identifies a training command across machines: its arguments without the interpreter's path."""
    return hashlib.sha256(json.dumps(command[1:]).encode()).hexdigest()[:16]


def train(data: str, model: str, epochs: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """The checkpoint of ``model`` on ``data``: reused when its folder holds one trained by the same command,
    resumed when its training was interrupted, else trained. Returns ``{"ckpt", "command", "fp32_val"}`` or
    ``{"error"}``."""
    run_name = f"{data}-{model}-{epochs}ep"
    run_dir = out / run_name
    command = train_command(data, model, epochs, run_name, out, extra)
    record = run_dir / "zoo-train.json"
    key = command_key(command)
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") != key:
            return {"error": f"{run_dir} was trained by another command ({' '.join(saved.get('command', []))}); "
                             "move it away or pass another --out"}
        if saved.get("done"):
            return saved
    elif run_dir.exists():
        return {"error": f"{run_dir} exists and was not made by this benchmark; pass another --out"}
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = ["--resume", "last"] if (run_dir / "last.ckpt").is_file() else []
    record.write_text(json.dumps({"key": key, "command": command[1:], "done": False}) + "\n")
    start = time.perf_counter()
    code, last = run(command + resume, run_dir / "zoo.log")
    if code != 0:
        return {"error": f"train.py: {last}"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    saved = {"key": key, "command": command[1:], "done": True, "ckpt": str(run_dir / "best.ckpt"),
             "train_seconds": time.perf_counter() - start, "fp32_val": metrics.get("val/top1")}
    record.write_text(json.dumps(saved, indent=2) + "\n")
    return saved


def quantize_step(ckpt: str, step: Step, extra: list[str]) -> dict[str, Any]:
    """``quantize.py`` with the step's flags on ``ckpt`` (report folder ``zoo-<step>``, reused when done):
    the report's rows, or ``{"error"}`` with the run's one-line refusal."""
    run_dir = Path(ckpt).parent
    report_dir = run_dir / "quantize" / f"zoo-{step.name}"
    report = report_dir / "report.json"
    if not report.is_file():
        command = [sys.executable, "quantize.py", "--ckpt", ckpt, *step.flags, "--name", f"zoo-{step.name}",
                   "--no-latency", "--no-progress", *extra]
        code, last = run(command, run_dir / "zoo.log")
        if code != 0 and not (step.name == "sensitivity" and report.is_file()):
            return {"error": last.removeprefix("quantize.py: error: ")}
    data = json.loads(report.read_text())
    result: dict[str, Any] = {"rows": data["rows"]}
    if step.name == "sensitivity":
        result["worst"] = worst_tensor(report_dir / "sensitivity.json")
    return result


def worst_tensor(path: Path) -> dict[str, Any] | None:
    """The tensor of ``sensitivity.json`` whose quantization alone loses most validation top-1 (ties: the lower
    SQNR of the logits), with that drop and SQNR."""
    if not path.is_file():
        return None
    sens = json.loads(path.read_text())
    cells = [(cell["drop"], -cell["sqnr_db"], knob, int(width))
             for width, result in sens["widths"].items() for knob, cell in result["knobs"].items()]
    if not cells:
        return None
    drop, minus_sqnr, knob, width = max(cells)
    return {"tensor": knob.replace("|", " "), "bits": width, "drop": drop, "sqnr_db": -minus_sqnr}


def row(rows: list[dict[str, Any]], variant: str, backend: str | None = None) -> dict[str, Any] | None:
    return next((r for r in rows if r["variant"] == variant and (backend is None or r["backend"] == backend)), None)


def summarize(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The table line of one model: fp32 and each figure as top-1 with its delta to fp32."""
    steps = entry.get("steps", {})
    w8 = steps.get("w8a8", {})
    rows = w8.get("rows", [])
    fp32 = (row(rows, "fp32") or {}).get("top1")
    line: dict[str, Any] = {"model": name, "fp32": fp32}

    def take(step: str, variant: str, backend: str | None = None) -> Any:
        result = steps.get(step)
        if result is None:
            return None
        if "error" in result:
            return {"error": result["error"]}
        r = row(result["rows"], variant, backend)
        if r is None:
            return None
        if r["top1"] is None:
            return {"error": r["note"]}
        return {"top1": r["top1"], "delta": None if fp32 is None else r["top1"] - fp32}

    line["w8a8"] = take("w8a8", "ptq")
    line["w4a8"] = take("w4a8", "ptq")
    for backend in ("fbgemm", "x86", "qnnpack", "onednn"):
        line[f"torch.ao {backend}"] = take("w8a8", "builtin-ptq", backend)
    line["onnx"] = take("onnx", "onnx")
    for backend in ("x86", "qnnpack"):
        line[f"int8 {backend}"] = take("int8", "int8-export", backend)
    line["qat8"] = take("qat8", "qat")
    line["qat8_ptq"] = take("qat8", "ptq")
    line["qat4"] = take("qat4", "qat")
    line["qat4_ptq"] = take("qat4", "ptq")
    sens = steps.get("sensitivity")
    line["worst"] = sens.get("worst") if sens and "error" not in sens else (sens and {"error": sens["error"]})
    ao = [v["top1"] for k, v in line.items() if k.startswith("torch.ao") and v and "top1" in v]
    line["best_torch_ao"] = max(ao) if ao else None
    return line


def cell(value: Any) -> str:
    """``91.64 (+0.28)``, the error's first words, or ``-``."""
    if value is None:
        return "-"
    if "error" in value:
        return f"fails: {' '.join(str(value['error']).split())[:60]}"
    return f"{value['top1']:.2f} ({value['delta']:+.2f})" if value.get("delta") is not None else f"{value['top1']:.2f}"


def table(lines: list[dict[str, Any]], data: str) -> str:
    """The markdown table of one data set."""
    head = ["model", "fp32", "ours W8A8", "ours W4A8", "torch.ao best", "int8 export x86", "int8 qnnpack", "ONNX",
            "worst tensor at 8 bits (val drop)", "QAT W8A8", "QAT W4A4"]
    out = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for line in lines:
        best = [(k.split()[1], v) for k, v in line.items() if k.startswith("torch.ao") and v and "top1" in v]
        best_cell = "-" if not best else "{} ({})".format(cell(max(best, key=lambda kv: kv[1]["top1"])[1]),
                                                          max(best, key=lambda kv: kv[1]["top1"])[0])
        worst = line.get("worst")
        worst_cell = "-" if not worst else (cell(worst) if "error" in worst else
                                            f"{worst['tensor']} ({worst['drop']:+.2f}, {worst['sqnr_db']:.1f} dB)")
        cells = [line["model"], "-" if line["fp32"] is None else f"{line['fp32']:.2f}", cell(line["w8a8"]),
                 cell(line["w4a8"]), best_cell, cell(line["int8 x86"]), cell(line["int8 qnnpack"]),
                 cell(line["onnx"]), worst_cell,
                 cell(line["qat8"]), cell(line["qat4"])]
        out.append(f"| {' | '.join(cells)} |")
    return f"{data}, 32 px, torchvision's standard stem; test top-1 % (delta to fp32)\n\n" + "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO), help=f"models (default: {' '.join(ZOO)})")
    parser.add_argument("--data", default="digits", choices=("digits", "fashion-mnist"),
                        help="data set (default: digits)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default: 15)")
    parser.add_argument("--out", default="checkpoints/zoo", help="folder of the zoo's runs (default: checkpoints/zoo)")
    parser.add_argument("--qat", action="store_true", help="also our QAT at 8 and 4 bits")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), help="quantize steps (default: all but QAT; "
                                                                      "with --qat all)")
    parser.add_argument("--limit-train-batches", type=int, help="train.py --limit-train-batches (smoke runs)")
    add_smoke_arguments(parser, SMOKE_SIZES)
    args = parse_with_smoke(parser, argv, SMOKE_SIZES)
    steps = args.steps or [s for s in STEPS if args.qat or s not in QAT_STEPS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "zoo.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    train_extra = [] if args.limit_train_batches is None else ["--limit-train-batches", str(args.limit_train_batches)]
    quant_extra = ["--calib-batches", "2"] if args.smoke else []
    env_threads = os.environ.get("OMP_NUM_THREADS")
    for model in args.models:
        key = f"{args.data}/{model}/{args.epochs}ep"
        entry = results.setdefault(key, {"steps": {}})
        trained = train(args.data, model, args.epochs, out, train_extra)
        entry["train"] = trained
        print(f"{key}: trained" if "error" not in trained else f"{key}: {trained['error']}", file=sys.stderr,
              flush=True)
        if "error" not in trained:
            for name in steps:
                if name not in entry["steps"] or "error" in entry["steps"][name]:
                    entry["steps"][name] = quantize_step(trained["ckpt"], STEPS[name], quant_extra)
                    done = entry["steps"][name]
                    print(f"{key}: {name} " + (done["error"] if "error" in done else "done"), file=sys.stderr,
                          flush=True)
                    results_path.write_text(json.dumps(results, indent=2) + "\n")
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    lines = [summarize(model, results[f"{args.data}/{model}/{args.epochs}ep"]) for model in args.models]
    print(table(lines, args.data))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": env_threads, "models": lines},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
