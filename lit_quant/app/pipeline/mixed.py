"""Mixed precision in the application (``quantize.py --sensitivity`` / ``--max-drop``): measuring the
sensitivity on the validation split, and the search, on top of the maths of :mod:`lit_quant.quant.mixed`.

**Sensitivity** at width ``b``: the model is prepared with every tensor at ``b`` bits and calibrated once (the
statistics are cached per width under ``<run>/sensitivity/``); then, for each knob, only its quantizers
fake-quantize and one pass over the validation subset gives its :class:`KnobScore`. Under DDP the passes are
split between the processes and gathered.

**Search** (``--max-drop D``): the longest prefix of :func:`step_order` whose PTQ model (calibration plus the PTQ
recipe) keeps validation top-1 within ``D`` points of fp32 is found by bisection, checking on validation; it is
written as a plan YAML for ``--plan``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lit_quant.app.classifier import LitClassifier
from lit_quant.io import atomic_write_text
from lit_quant.app.pipeline.checkpoint import save_quantized
from lit_quant.app.pipeline.context import RunContext, show_progress
from lit_quant.app.pipeline.deploy import add_deploy_rows
from lit_quant.app.pipeline.ptq import PTQPoint, build_plan, calibrate, layerwise_steps, ptq_row, weights_fingerprint
from lit_quant.app.pipeline.rows import Report, new_figure, save_figure
from lit_quant.quant import QuantPlan, enable_fake_quant, prepare
from lit_quant.quant.equalize import equalize
from lit_quant.quant.mixed import (
    Knob,
    KnobScore,
    LayerCost,
    Sensitivity,
    assignment,
    bit_operations,
    knob_quantizers,
    layer_costs,
    mixed_plan,
    objective,
    packed_weight_bytes,
    scores_from_dict,
    scores_to_dict,
    sqnr_db,
    step_order,
    uniform_label,
)

@dataclass
class ValSubset:
    """Validation images (a list of batches held in memory, or a loader read at each pass), with the fp32
    model's logits on them."""

    batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
    fp32_model: InitVar[nn.Module]
    labels: torch.Tensor = field(init=False)
    fp32_logits: torch.Tensor = field(init=False)

    def __post_init__(self, fp32_model: nn.Module) -> None:
        self.labels = torch.cat([y for _, y in self.batches])
        self.fp32_logits = self.logits(fp32_model)

    @property
    def fp32_top1(self) -> float:
        return top1(self.fp32_logits, self.labels)

    def logits(self, model: nn.Module) -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x) for x, _ in self.batches])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def val_subset(ctx: RunContext, images: int | None = None) -> ValSubset:
    """The first ``images`` images (default: all) of the validation split (the fp32 run's), batched as
    quantize.py batches."""
    dm = ctx.dm
    images_set = torch.utils.data.Subset(dm.val_set, range(min(images or len(dm.val_set), len(dm.val_set))))
    loader = torch.utils.data.DataLoader(images_set, batch_size=ctx.cfg.batch_size, shuffle=False)
    batches = list(loader) if images else loader  # a subset is read once; the whole split at each pass
    return ValSubset(batches, ctx.float_model)


def _distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(local: dict[Any, Any]) -> dict[Any, Any]:
    """Merge every process's ``local`` results (a no-op in one process)."""
    _, world = _distributed()
    if world == 1:
        return local
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


@contextlib.contextmanager
def progress_bar(ctx: RunContext, total: int, description: str) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr (rank 0, when ``--progress`` or a terminal asks for bars); yields the
    function that advances it by one."""
    if not (show_progress(ctx.cfg) and ctx.is_global_zero):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _digest(entry: dict[str, Any]) -> str:
    """The checksum a cached width carries: of its key and its figures, so a truncated or edited cache entry
    is measured again rather than trusted."""
    return _key(entry.get("key"), entry.get("knobs"))


def read_cache(path: Path) -> dict[str, Any]:
    """The sensitivity cache at ``path``; empty when it is missing or unreadable (its widths are measured
    again and the file rewritten)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def sensitivity(ctx: RunContext, widths: Sequence[int], subset: ValSubset) -> Sensitivity:
    """Per-knob SQNR and validation drop at each width (see the module docstring), with the cache of earlier
    runs of the same model, data, plan and images reused; also the seconds and passes it took."""
    cfg = ctx.cfg
    cache_dir = ctx.run_dir / "sensitivity"
    cache_path = cache_dir / "sensitivity.json"
    cache = read_cache(cache_path)
    result = Sensitivity(subset.fp32_top1, len(subset.labels))
    start, passes = time.perf_counter(), 0
    rank, world = _distributed()
    for bits in widths:
        plan = build_plan(cfg, bits=bits)
        key = _key(weights_fingerprint(ctx.float_model), ctx.data_settings, plan.to_dict(), len(subset.labels),
                   cfg.calib_batches, cfg.batch_size)
        entry = cache.get(str(bits))
        if isinstance(entry, dict) and entry.get("key") == key and entry.get("digest") == _digest(entry):
            result.widths[bits] = scores_from_dict(entry["knobs"])
            continue
        lit = LitClassifier(prepare(ctx.float_model, plan), ctx.num_classes)
        calibrate(ctx.trainer, lit, ctx.dm, str(cache_dir / f"stats-{key}.yaml"), ctx.source)
        knobs = knob_quantizers(lit.model)
        enable_fake_quant(lit.model, False)
        local: dict[Knob, KnobScore] = {}
        mine = [(knob, q) for i, (knob, q) in enumerate(knobs.items()) if i % world == rank]
        with progress_bar(ctx, len(mine), f"sensitivity at {bits} bits") as advance:
            for knob, quantizers in mine:
                for fq in quantizers:
                    fq.fake_quant_enabled.fill_(True)
                logits = subset.logits(lit.model)
                for fq in quantizers:
                    fq.fake_quant_enabled.fill_(False)
                local[knob] = KnobScore(sqnr_db(subset.fp32_logits, logits),
                                        subset.fp32_top1 - top1(logits, subset.labels))
                advance()
        passes += 1 + len(knobs)
        merged = _gather(local)
        result.widths[bits] = {knob: merged[knob] for knob in knobs}
        entry = {"key": key, "knobs": scores_to_dict(result.widths[bits])}
        cache[str(bits)] = {**entry, "digest": _digest(entry)}
        if ctx.is_global_zero:
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    result.seconds, result.passes = time.perf_counter() - start, passes
    return result


@dataclass
class Check:
    """One validated assignment of the search: its prefix length, objective, size and validation top-1."""

    steps: int
    objective: int
    size_bytes: int
    val_top1: float
    seconds: float
    label: str = ""


def check_plan(ctx: RunContext, plan: QuantPlan, subset: ValSubset) -> tuple[float, float]:
    """Validation top-1 of ``plan`` after calibration and the PTQ recipe's steps, and the seconds it took."""
    start = time.perf_counter()
    lit = LitClassifier(prepare(ctx.float_model, plan), ctx.num_classes)
    calibrate(ctx.trainer, lit, ctx.dm, None, ctx.source)
    layerwise_steps(ctx.cfg, lit.model, ctx.dm)
    top = top1(subset.logits(lit.model), subset.labels)
    return top, time.perf_counter() - start


@dataclass
class SearchResult:
    """The assignment found, whether it meets the budget, the plan and every check made."""

    widths: dict[Knob, int]
    plan: QuantPlan
    meets_budget: bool
    checks: list[Check]
    seconds: float
    pass_seconds: float  # one calibration-and-evaluation pass (the first check's)
    kept_steps: int  # prefix length of the kept assignment

    @property
    def kept(self) -> Check:
        return next(c for c in self.checks if c.steps == self.kept_steps)


def search(ctx: RunContext, sens: Sensitivity, widths: Sequence[int], subset: ValSubset,
           costs: dict[str, LayerCost], knobs: Sequence[Knob]) -> SearchResult:
    """Bisection over the greedy order for the longest prefix within ``--max-drop`` (module docstring)."""
    cfg = ctx.cfg
    widest = max(widths)
    base = build_plan(cfg, bits=widest)
    order = step_order(sens, knobs, widths, costs, cfg.search_objective)
    budget = subset.fp32_top1 - cfg.max_drop
    checks: dict[int, Check] = {}
    start = time.perf_counter()

    most = 2 + math.ceil(math.log2(max(len(order), 1)))
    with progress_bar(ctx, most, "mixed-precision search: validation checks") as advance:
        def passes(k: int) -> bool:
            if k not in checks:
                assign = assignment(knobs, widest, order[:k])
                top, seconds = check_plan(ctx, mixed_plan(base, assign, widest), subset)
                checks[k] = Check(k, objective(costs, assign, cfg.search_objective),
                                  packed_weight_bytes(costs, assign), top, seconds, uniform_label(assign))
                advance()
            return checks[k].val_top1 >= budget - 1e-9

        if not passes(0):
            best, meets = 0, False
        elif passes(len(order)):
            best, meets = len(order), True
        else:  # passes(lo), not passes(hi)
            lo, hi = 0, len(order)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if passes(mid) else (lo, mid)
            best, meets = lo, True
    found = assignment(knobs, widest, order[:best])
    return SearchResult(found, mixed_plan(base, found, widest), meets, sorted(checks.values(), key=lambda c: c.steps),
                        time.perf_counter() - start, checks[0].seconds, best)


def plot_sensitivity(sens: Sensitivity, path: Path) -> None:
    """Knobs by widths, coloured by validation drop (weights and activations side by side)."""
    widths = sorted(sens.widths, reverse=True)
    names = list(dict.fromkeys(k.name for w in widths for k in sens.widths[w]))
    fig, axes = new_figure(1, 2, figsize=(8, 1.5 + 0.25 * len(names)), sharey=True)
    for ax, kind in zip(axes, ("weight", "act")):
        grid = [[getattr(sens.widths[w].get(Knob(n, kind)), "drop", math.nan) for w in widths] for n in names]
        image = ax.imshow(grid, cmap="Reds", aspect="auto", vmin=0)
        ax.set_xticks(range(len(widths)), [f"{w} b" for w in widths])
        ax.set_title(f"{'weights' if kind == 'weight' else 'activations'}: val top-1 drop")
        fig.colorbar(image, ax=ax, label="points")
    axes[0].set_yticks(range(len(names)), names, fontsize=7)
    save_figure(fig, path)


def plot_pareto(result: SearchResult, fp32: float, max_drop: float, objective_name: str, path: Path) -> None:
    """Validation top-1 against packed weight size (or bit-operations) of every checked assignment, the
    uniform ones labelled, the non-dominated ones joined, the one kept circled."""
    def x(c: Check) -> float:
        return c.size_bytes / 1024 if objective_name == "size" else c.objective / 1e9

    fig, ax = new_figure(figsize=(6, 4))
    front, best = [], -math.inf
    for c in sorted(result.checks, key=x):
        if c.val_top1 > best:
            front.append(c)
            best = c.val_top1
    ax.plot([x(c) for c in front], [c.val_top1 for c in front], color="grey", linewidth=1, label="Pareto front")
    for c in result.checks:
        ax.plot(x(c), c.val_top1, marker="s" if c.label else "o", color="C0" if c.label else "C1", linestyle="")
        ax.annotate(c.label.removeprefix("uniform ") or f"mixed ({c.steps} steps)", (x(c), c.val_top1), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    kept = result.kept
    ax.plot(x(kept), kept.val_top1, marker="o", markersize=12, fillstyle="none", color="C3", linestyle="",
            label="kept")
    ax.axhline(fp32, color="grey", linestyle="--", label="fp32")
    ax.axhline(fp32 - max_drop, color="C3", linestyle=":", label=f"budget (-{max_drop:g})")
    ax.set_xlabel("packed weights (KiB)" if objective_name == "size" else "bit-operations per image (G)")
    ax.set_ylabel("validation top-1 (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def sensitivity_rows(sens: Sensitivity) -> list[list[str]]:
    """The sensitivity table's rows: knob, kind, then 'SQNR dB / drop' at each width (widest first)."""
    widths = sorted(sens.widths, reverse=True)
    knobs = list(dict.fromkeys(k for w in widths for k in sens.widths[w]))
    rows = []
    for knob in knobs:
        cells = []
        for w in widths:
            score = sens.widths[w].get(knob)
            cells.append("-" if score is None else f"{score.sqnr_db:.1f} / {score.drop:+.2f}")
        rows.append([knob.name, knob.kind, *cells])
    return rows


def run_mixed(ctx: RunContext, report: Report, widths: Sequence[int]) -> dict[str, Any]:
    """``--sensitivity`` and ``--max-drop``: the sensitivity (table rows, PNG, ``sensitivity.json`` in the
    report folder), then with a budget the search, its plan YAML, Pareto plot and the plan's PTQ row (on
    the test split) added to ``report``. Returns what the run prints."""
    if ctx.cfg.cle:  # equalize once: the sensitivity, every check and the row then share the equalized model
        classifier = copy.deepcopy(ctx.classifier)
        classifier.model = equalize(ctx.float_model)[0]
        ctx = dataclasses.replace(ctx, classifier=classifier, cfg=dataclasses.replace(ctx.cfg, cle=False))
    cfg = ctx.cfg
    subset = val_subset(ctx, cfg.sensitivity_images)
    sens = sensitivity(ctx, widths, subset)
    out: dict[str, Any] = {"sensitivity": sens, "files": {}}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_global_zero:
        atomic_write_text(ctx.out_dir / "sensitivity.json", json.dumps(sens.to_dict(), indent=1) + "\n")
        plot_sensitivity(sens, ctx.out_dir / "sensitivity.png")
        out["files"] = {"json": ctx.out_dir / "sensitivity.json", "png": ctx.out_dir / "sensitivity.png"}
    if cfg.max_drop is None:
        return out
    widest = max(widths)
    probe = prepare(ctx.float_model, build_plan(cfg, bits=widest))
    knobs = list(knob_quantizers(probe))
    costs = layer_costs(probe, ctx.example)
    # the budget is checked on the whole validation split: a subset's sampling noise would be spent from it
    validation = val_subset(ctx)
    result = search(ctx, sens, widths, validation, costs, knobs)
    uniform = {k: widest for k in knobs}
    plan_path = ctx.out_dir / "mixed-plan.yaml"
    narrowed = sum(1 for k, b in result.widths.items() if b != widest)
    verdict = "meets" if result.meets_budget else "does NOT meet"
    header = (f"# lit-quant mixed-precision plan: {narrowed} of {len(knobs)} tensors narrowed from {widest} bits "
              f"(widths {' '.join(map(str, sorted(widths)))}, --search-objective {cfg.search_objective}); it {verdict} "
              f"--max-drop {cfg.max_drop:g} on validation.\n# quantize.py --plan {plan_path.name} reuses it.\n")
    search_info = {
        "meets_budget": result.meets_budget, "plan": str(plan_path), "objective": cfg.search_objective,
        "max_drop": cfg.max_drop, "fp32_val_top1": validation.fp32_top1, "val_images": len(validation.labels),
        "size_bytes": packed_weight_bytes(costs, result.widths),
        "widest_size_bytes": packed_weight_bytes(costs, uniform),
        "bitops": bit_operations(costs, result.widths), "widest_bitops": bit_operations(costs, uniform),
        "seconds": result.seconds, "pass_seconds": result.pass_seconds,
        "passes": result.seconds / result.pass_seconds,
        # what the whole run cost, sensitivity (0 s when cached) included, in the same unit
        "passes_with_sensitivity": (result.seconds + sens.seconds) / result.pass_seconds,
        "checks": [dataclasses.asdict(c) for c in result.checks]}
    out["search"] = search_info
    if ctx.is_global_zero:
        atomic_write_text(plan_path, header + yaml.safe_dump(result.plan.to_dict(), sort_keys=False))
        atomic_write_text(ctx.out_dir / "search.json", json.dumps(search_info, indent=1) + "\n")
        plot_pareto(result, validation.fp32_top1, cfg.max_drop, cfg.search_objective, ctx.out_dir / "pareto.png")
    row_ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(cfg, plan=str(plan_path)))
    row, correct, model, _ = ptq_row(row_ctx, PTQPoint(result.plan, "ptq-mixed"), None)
    saved = 1 - search_info["size_bytes"] / search_info["widest_size_bytes"]
    row.note += (f"; mixed precision ({cfg.search_objective}): {narrowed} of {len(knobs)} tensors below "
                 f"{widest} bits, plan {plan_path}; packed weights {search_info['size_bytes'] / 1024:.1f} KiB "
                 f"({saved:.0%} below uniform {widest}-bit weights); validation top-1 "
                 f"{result.kept.val_top1:.2f} against fp32 "
                 f"{validation.fp32_top1:.2f}: {verdict} --max-drop {cfg.max_drop:g}; search {len(result.checks)} "
                 f"checks, {result.seconds:.0f} s = {search_info['passes']:.1f} calibration-and-evaluation passes "
                 f"({search_info['passes_with_sensitivity']:.1f} with the sensitivity)")
    # the narrowest widths the plan uses (the columns of a uniform row hold its only widths)
    row.weight_bits = min(b for (_, kind), b in result.widths.items() if kind == "weight")
    row.act_bits = min(b for (_, kind), b in result.widths.items() if kind == "act")
    report.add(row, correct)
    report.describe(model)
    if ctx.is_global_zero:
        save_quantized(ctx.out_dir / "ptq-mixed.ckpt", model, result.plan, ctx.arch, ctx.data_settings, row.to_dict(),
                       source=ctx.source)
        ctx.publish("ptq-mixed.ckpt")
    add_deploy_rows(row_ctx, report, row, model, "ptq-mixed")
    return out

