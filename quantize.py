"""Quantize a trained fp32 checkpoint and compare it, side by side, with PyTorch's built-in torch.ao int8.

    python quantize.py --mode ptq --bits 8                  # newest checkpoints/*/best.ckpt
    python quantize.py --mode ptq --weight-bits 4 --act-bits 8 --first-last-bits 8
    python quantize.py --mode ptq --weight-bits 4 --act-bits 8 --weight-rounding gptq --bias-correction
    python quantize.py --mode compare                       # fp32, ours, torch.ao on every CPU backend
    python quantize.py --sweep --observers minmax mse percentile   # accuracy against bits, PNG plot
    python quantize.py --mode builtin --backend qnnpack     # torch.ao only
    python quantize.py --mode qat --bits 4                  # fp32, PTQ, our QAT, torch.ao QAT (the 4-bit recipe)
    python quantize.py --eval checkpoints/digits-resnet20/ptq-w8a8.ckpt

Writes report.json and report.csv to <run>/quantize/<name>/ (copies of the newest beside the checkpoint) and
prints the table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from lit_quant.app.cli import ArgumentParser, console, run_cli
from lit_quant.app.config import add_config_arguments
from lit_quant.app.pipeline.config import LOGITS_COST, SWEEP_BITS, QuantizeConfig, resolve_request
from lit_quant.app.recipes import qat_recipe
from lit_quant.quant.plan import DEFAULTS_TEXT
from lit_quant.quant.spec import OBSERVER_NAMES, SCHEMES

if TYPE_CHECKING:  # the flags and --help import no torch
    from lit_quant.app.pipeline.rows import RowPair


def build_parser() -> ArgumentParser:
    """``--bits`` plus one flag per :class:`QuantizeConfig` field."""
    recipes = "\n".join(f"  {qat_recipe(b, b).describe(b)}" for b in (8, 4, 3, 2))
    parser = ArgumentParser(prog="quantize.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="default plan: " + DEFAULTS_TEXT + ".\n\n--mode qat takes what --qat-method, --act-observer, --weight-observer, "
                                   "--weight-rounding,\n--bias-correction, --lr, --warmup-epochs, --epochs, --distill, "
                                   "--freeze-bn-epoch and --first-last-bits\ndo not give from the recipe of its width (the narrower of "
                                   "weight and activation bits; 5-7 bits as 4):\n" + recipes)
    parser.add_argument("--bits", type=int, nargs="+", metavar="N",
                        help="sets both --weight-bits and --act-bits; several values run a sweep (ptq mode)")
    parser.add_argument("--sweep", action="store_true", help=f"sweep --bits {' '.join(map(str, SWEEP_BITS))}")
    parser.add_argument("--observers", nargs="+", choices=OBSERVER_NAMES,
                        help="activation observers compared side by side, one row each (default: --act-observer)")
    parser.add_argument("--scheme", choices=SCHEMES, help="sets both --weight-scheme and --act-scheme")
    add_config_arguments(parser, QuantizeConfig)
    parser.add_argument("--per-tensor", dest="per_channel", action="store_false", default=argparse.SUPPRESS,
                        help="one scale per weight tensor (same as --no-per-channel)")
    return parser


def resolve_args(argv: Sequence[str] | None) -> tuple[QuantizeConfig, list[int] | None, list[str] | None]:
    """Parse ``argv`` into the config, the sweep's bit widths and its observers (``None`` when not sweeping);
    the rules between flags are :func:`lit_quant.app.pipeline.config.resolve_request`'s."""
    args = vars(build_parser().parse_args(argv))
    args.pop("verbose", None)  # run_cli's
    request = resolve_request(args)
    return request.config, request.sweep_bits, request.observers


def announce_kernel_build() -> None:
    """Say so when the fused fake-quant kernel compiles (about a minute, once per machine): the core calls this
    right before the build, which happens at the first fake quantization, after every input was checked."""
    from lit_quant.quant import kernels

    kernels.set_build_notice(lambda: print("compiling the fused fake-quant kernel (once, about a minute)...",
                                           file=sys.stderr, flush=True))


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _versus_fp32(r: dict[str, Any]) -> str:
    """'+fixed/-broken' test images against fp32, '*' when the exact McNemar test rejects equal accuracy at 5 %."""
    if r.get("fixed_vs_fp32") is None:
        return "-"
    return f"+{r['fixed_vs_fp32']}/-{r['broken_vs_fp32']}" + ("*" if r["p_vs_fp32"] < 0.05 else "")


def pair_line(pair: RowPair) -> str:
    """One sentence for an ours-against-torch.ao pair of :func:`lit_quant.app.pipeline.rows.paired_rows`."""
    verdict = "a real difference" if pair.p_value < 0.05 else "not distinguishable on this test set"
    return (f"{pair.ours} vs {pair.theirs}, image by image: only ours right on {pair.ours_only}, only "
            f"torch.ao's on {pair.theirs_only} (exact McNemar p = {pair.p_value:.3g}: {verdict} at 5 %)")


def print_mixed(mixed: dict[str, Any]) -> int:
    """The sensitivity table and, after a search, where its plan went; exit status 1 when the plan found does
    not meet --max-drop (the widest assignment is still written, labelled as such)."""
    from lit_quant.app.pipeline.mixed import sensitivity_rows

    sens = mixed["sensitivity"]
    widths = sorted(sens.widths, reverse=True)
    table = Table(title=f"sensitivity: one tensor quantized at a time, everything else float "
                        f"({sens.images} validation images, fp32 {sens.fp32_val_top1:.2f} %)",
                  caption="each cell: SQNR of the logits (dB) / validation top-1 drop (points)")
    for name in ("layer", "tensor", *(f"{w} bits" for w in widths)):
        table.add_column(name, justify="left" if name in ("layer", "tensor") else "right")
    for row in sensitivity_rows(sens):
        table.add_row(*row)
    console.print(table)
    done = f"{sens.passes} passes in {sens.seconds:.1f} s" if sens.passes else "all widths from the cache"
    console.print(f"sensitivity: {done}; "
                  + ", ".join(f"{k} {v}" for k, v in mixed["files"].items()), markup=False, highlight=False)
    search = mixed.get("search")
    if search is None:
        return 0
    console.print(f"search ({search['objective']}): {len(search['checks'])} checks in {search['seconds']:.1f} s = "
                  f"{search['passes']:.1f} calibration-and-evaluation passes of {search['pass_seconds']:.1f} s "
                  f"({search['passes_with_sensitivity']:.1f} with the sensitivity); packed weights "
                  f"{search['size_bytes'] / 1024:.1f} KiB against {search['widest_size_bytes'] / 1024:.1f} KiB at the "
                  f"widest width; plan {search['plan']}", markup=False, highlight=False)
    if not search["meets_budget"]:
        print(f"quantize.py: error: even the widest assignment drops validation top-1 by more than --max-drop "
              f"{search['max_drop']:g} points; wrote it anyway, labelled as not meeting the budget: {search['plan']}",
              file=sys.stderr)
        return 1
    return 0


def report_table(rows: list[dict[str, Any]]) -> Table:
    """The comparison table: accuracy, delta to fp32 and the images behind it, size, latency, calibration time."""
    fp32 = next((r["top1"] for r in rows if r["variant"] == "fp32"), None)
    table = Table(title="lit-quant: fp32 vs ours vs torch.ao",
                  caption="vs fp32: test images fixed / broken against fp32; * the exact McNemar test says the "
                          "accuracies differ (p < 0.05)")
    for name in ("variant", "backend", "W/A bits", "observer", "top-1 %", "top-5 %", "Δ top-1", "vs fp32",
                 "size KiB", "ms bs1", "ms bs64", "calib s"):
        table.add_column(name, justify="left" if name in ("variant", "backend", "observer") else "right")
    for r in rows:
        bits = f"{r['weight_bits']}/{r['act_bits']}"
        delta = None if fp32 is None or r["top1"] is None or r["variant"] == "fp32" else r["top1"] - fp32
        variant = f"{r['variant']} ({r['source']})" if r.get("source") else r["variant"]
        table.add_row(variant, r["backend"] or "-", bits, r["observer"] or "-", _fmt(r["top1"], ".2f"),
                      _fmt(r["top5"], ".2f"), _fmt(delta, "+.2f"), _versus_fp32(r),
                      _fmt(None if r["size_bytes"] is None else r["size_bytes"] / 1024, ".1f"),
                      _fmt(r["latency_ms_bs1"], ".2f"), _fmt(r["latency_ms_bs64"], ".1f"), _fmt(r["calib_s"], ".2f"))
    return table


def sweep_table(rows: list[dict[str, Any]]) -> Table | None:
    """A sweep's table: one line per bit width, one column of top-1 per observer."""
    ptq = [r for r in rows if r["variant"] == "ptq"]
    widths = sorted({r["act_bits"] for r in ptq}, reverse=True)
    if len(widths) < 2:
        return None
    observers = list(dict.fromkeys(r["observer"] for r in ptq))
    fp32 = next((r["top1"] for r in rows if r["variant"] == "fp32"), None)
    table = Table(title=f"top-1 % against bits (weights = activations; fp32 {_fmt(fp32, '.2f')})")
    table.add_column("bits", justify="right")
    for observer in observers:
        table.add_column(observer, justify="right")
    top1 = {(r["act_bits"], r["observer"]): r["top1"] for r in ptq}
    for bits in widths:
        table.add_row(str(bits), *(_fmt(top1.get((bits, o)), ".2f") for o in observers))
    return table


def layers_table(layers: list[dict[str, Any]]) -> Table | None:
    """What our model quantizes: ops grouped by kind, status and widths, each float op named."""
    if not layers:
        return None
    groups: dict[tuple[str, str, str], list[str]] = {}
    for op in layers:
        bits = f"{op['weight_bits'] or '-'}/{op['act_bits'] or '-'}"
        groups.setdefault((op["op"], op["status"], bits), []).append(op["name"])
    floats = sum(len(names) for (_, status, _), names in groups.items() if status == "float")
    table = Table(title=f"what is quantized: {len(layers)} ops, {floats} float (report.json \"layers\": each op)")
    for name in ("op", "status", "W/A bits", "count", "layers"):
        table.add_column(name, justify="right" if name == "count" else "left")
    for (op, status, bits), names in groups.items():
        shown = names if status == "float" else names[:2] + (["..."] if len(names) > 2 else [])
        table.add_row(op, f"[red]{status}[/]" if status == "float" else status, bits, str(len(names)),
                      ", ".join(shown))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, quantize, print the table; returns the exit status."""
    cfg, sweep, observers = resolve_args(argv)
    # imported here, after parsing: torch and Lightning take seconds to load, --help and flag errors need neither
    from lit_quant.app.pipeline.checkpoint import evaluate_quantized
    from lit_quant.app.pipeline.run import run_quantize

    announce_kernel_build()
    if cfg.eval is not None:
        console.print(report_table([evaluate_quantized(cfg.eval, cfg.batch_size)]))
        return 0
    result = run_quantize(cfg, sweep, observers)
    if not result.is_global_zero:  # DDP: the other processes computed the same rows; one table is enough
        return 0
    rows = result.rows
    layers = layers_table(result.layers)
    if layers is not None:
        console.print(layers)
    console.print(report_table(rows))
    sweep_summary = sweep_table(rows)
    if sweep_summary is not None:
        console.print(sweep_summary)
    if any(r["backend"] == "fake-quant" for r in rows):
        console.print("fake-quant rows simulate integers in float: accuracy only, no integer size or latency.")
    for r in rows:  # what the table's columns cannot say: why a deployed row is missing or differs
        if r.get("source") and r["note"]:
            console.print(f"{r['variant']} of {r['source']} ({r['backend']}): {r['note']}", markup=False,
                          highlight=False)
        elif r["note"] and LOGITS_COST in r["note"]:  # quantized logits, asked for: what they cost
            console.print(f"{r['variant']}: {LOGITS_COST}{r['note'].split(LOGITS_COST, 1)[1].split(';')[0]}",
                          markup=False, highlight=False)
    for pair in result.pairs:
        console.print(pair_line(pair), markup=False, highlight=False)
    for message in result.messages:
        console.print(message, markup=False, highlight=False, soft_wrap=True)
    console.print(f"Report: {result.report_dir / 'report.json'}")
    if result.mixed is not None:
        return print_mixed(result.mixed)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="quantize.py"))
