"""Mixed precision in the application: knobs map back to plan overrides, the search's bisection and the
``--sensitivity`` / ``--max-drop`` command line end to end on a tiny trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import report_rows, run_script
from torch import nn

import quantize
from lit_quant.app.cli import run_cli
from lit_quant.app.models import build_model
from lit_quant.app.pipeline import mixed
from lit_quant.quant import QuantPlan, iter_quantizers, prepare
from lit_quant.quant.mixed import (
    Knob,
    KnobScore,
    LayerCost,
    Sensitivity,
    assignment,
    knob_quantizers,
    mixed_plan,
    step_order,
)

pytestmark = pytest.mark.slow


def resnet20() -> nn.Module:
    return build_model("resnet20", 1, 10).eval()


def test_every_knob_is_a_plan_override_of_exactly_its_quantizers() -> None:
    """Narrowing one knob in a plan changes the width of that knob's quantizers and of no other, for every
    knob: weights, outputs, outputs governed by an absorbed add, and the input."""
    model = resnet20()
    base = QuantPlan.from_bits(8, 8)
    knobs = knob_quantizers(prepare(model, base))
    assert ("input", "act") in knobs and ("layers.0.add", "act") in knobs and ("fc", "weight") in knobs
    assert sum(len(q) for q in knobs.values()) == len(list(iter_quantizers(prepare(model, base))))
    for knob in knobs:
        widths = {k: 8 for k in knobs} | {knob: 4}
        narrowed = knob_quantizers(prepare(model, mixed_plan(base, widths, 8)))
        assert set(narrowed) == set(knobs)
        for k, quantizers in narrowed.items():
            assert [fq.spec.bits for fq in quantizers] == [4 if k == knob else 8] * len(quantizers), (knob, k)


@pytest.mark.parametrize(("accuracies", "kept", "meets"), [
    ([90, 90, 90, 90, 90], 4, True),    # everything narrowed passes
    ([90, 89.8, 89.6, 80, 70], 2, True),  # within 0.5 up to two steps
    ([89, 88, 80, 80, 80], 0, False),   # even the widest misses the budget
])
def test_search_keeps_the_longest_passing_prefix(monkeypatch: pytest.MonkeyPatch, accuracies: list[float],
                                                   kept: int, meets: bool) -> None:
    """Bisection over the greedy order with validation checks (``check_plan`` answers from ``accuracies``,
    indexed by how many steps the plan holds); fp32 validation top-1 90, budget 0.5."""
    names = ["a", "b", "c", "d"]
    costs = {n: LayerCost(100 * (i + 1), 1, None) for i, n in enumerate(names)}
    knobs = [(n, "weight") for n in names]
    s = Sensitivity(90.0, 100, {8: {Knob(n, "weight"): KnobScore(60, 0.0) for n in names},
                                4: {Knob(n, "weight"): KnobScore(30, 0.0) for n in names}})
    order = step_order(s, knobs, [4, 8], costs, "size")

    def check_plan(_ctx: object, plan: QuantPlan, _subset: object) -> tuple[float, float]:
        narrowed = sum(1 for o in plan.overrides if dict(o.weight).get("bits") == 4)
        return accuracies[narrowed], 1.0

    monkeypatch.setattr(mixed, "check_plan", check_plan)
    cfg = type("Cfg", (), {"max_drop": 0.5, "search_objective": "size", "progress": False})()
    ctx = type("Ctx", (), {"cfg": cfg, "is_global_zero": True})()
    monkeypatch.setattr(mixed, "build_plan", lambda _cfg, bits: QuantPlan.from_bits(bits, bits))
    subset = type("Subset", (), {"fp32_top1": 90.0})()
    result = mixed.search(ctx, s, [4, 8], subset, costs, knobs)  # type: ignore[arg-type]
    assert result.meets_budget is meets and result.kept_steps == kept
    assert result.widths == assignment(knobs, 8, order[:kept])
    assert len(result.checks) <= 2 + math.ceil(math.log2(len(order)))
    assert result.kept.val_top1 == accuracies[kept]


def copy_run(trained: Path, dest: Path) -> Path:
    run = dest / "tiny"
    run.mkdir(parents=True)
    for name in ("best.ckpt", "config.yaml"):
        (run / name).write_bytes((trained / "tiny" / name).read_bytes())
    return run


def test_sensitivity_and_search_end_to_end(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--sensitivity writes a table, PNG and JSON and caches each width; --max-drop writes a plan that --plan
    reuses bit for bit, a report row and a Pareto plot."""
    run = copy_run(trained, tmp_path)
    common = ["--ckpt", str(run / "best.ckpt"), "--no-latency", "--sensitivity-images", "48", "--calib-batches", "2"]
    assert quantize.main([*common, "--sensitivity", "--bits", "8", "3", "--name", "sens", "--progress"]) == 0
    out = capsys.readouterr().out  # (--progress: the bars run; rich draws them only on a terminal)
    assert "SQNR of the logits" in out and "passes in" in out
    report = run / "quantize" / "sens"
    sens = json.loads((report / "sensitivity.json").read_text())
    assert set(sens["widths"]) == {"8", "3"} and sens["images"] == 48
    knobs = sens["widths"]["8"]["knobs"]
    assert "conv1|weight" in knobs and "input|act" in knobs and "fc|weight" in knobs
    assert "fc|act" not in knobs  # the logits stay float: no width to choose
    assert (report / "sensitivity.png").stat().st_size > 1000
    for name, knob in knobs.items():  # 3 bits is noisier than 8 for every tensor
        assert knob["sqnr_db"] > sens["widths"]["3"]["knobs"][name]["sqnr_db"], name
    assert [r["variant"] for r in report_rows(run)] == ["fp32", "builtin-ptq"]

    # the search reuses the cached 8-bit statistics and results
    assert quantize.main([*common, "--max-drop", "100", "--bits", "8", "3", "--name", "search"]) == 0
    out = capsys.readouterr().out
    search = json.loads((run / "quantize" / "search" / "search.json").read_text())
    assert search["meets_budget"] and search["size_bytes"] < 0.4 * search["widest_size_bytes"]
    assert search["checks"][0]["label"] == "uniform W8A8" and search["checks"][-1]["label"] == "uniform W3A8"
    assert (run / "quantize" / "search" / "pareto.png").stat().st_size > 1000
    rows = report_rows(run)
    assert [r["variant"] for r in rows] == ["fp32", "ptq", "builtin-ptq"]
    assert (rows[1]["weight_bits"], rows[1]["act_bits"]) == (3, 8)
    assert f"plan {search['plan']}" in rows[1]["note"] and "meets --max-drop 100" in rows[1]["note"]

    assert quantize.main([*common, "--plan", search["plan"], "--name", "reuse"]) == 0
    reuse = report_rows(run)
    assert reuse[1]["top1"] == rows[1]["top1"]
    found = torch.load(run / "ptq-mixed.ckpt", weights_only=False)["state_dict"]
    again = torch.load(run / "ptq-w8a8.ckpt", weights_only=False)["state_dict"]
    assert found.keys() == again.keys() and all(torch.equal(found[k], again[k]) for k in found)

    # QAT trains the plan found, with the recipe of its narrowest width (3 bits: LSQ)
    assert quantize.main([*common, "--mode", "qat", "--plan", search["plan"], "--epochs", "2", "--no-builtin-qat",
                          "--name", "qat"]) == 0
    qat = torch.load(run / "qat-w8a8.ckpt", weights_only=False)
    assert QuantPlan.from_dict(qat["plan"]).overrides == QuantPlan.from_yaml(search["plan"]).overrides
    assert qat["plan"]["weight"]["quantizer"] == "lsq" and "3-bit QAT recipe" in report_rows(run)[2]["note"]


def test_impossible_budget_writes_the_widest_plan_and_fails(trained: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    run = copy_run(trained, tmp_path)
    real = mixed.check_plan
    monkeypatch.setattr(mixed, "check_plan", lambda *a: (real(*a)[0] - 1.0, 1.0))  # every check 1 point worse
    args = ["--ckpt", str(run / "best.ckpt"), "--no-latency", "--sensitivity-images", "48", "--calib-batches", "2",
            "--max-drop", "0.5", "--bits", "4", "8", "--name", "impossible"]
    assert quantize.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "even the widest assignment" in err[0]
    plan = (run / "quantize" / "impossible" / "mixed-plan.yaml").read_text()
    assert "does NOT meet --max-drop 0.5" in plan
    widest = QuantPlan.from_yaml(run / "quantize" / "impossible" / "mixed-plan.yaml")
    # no layer narrowed: only the default plan's own overrides (the image's observer, the float logits)
    assert {o.pattern for o in widest.overrides} == {"input", "@output"}


@pytest.mark.parametrize(("args", "message"), [
    (["--max-drop", "-1"], "--max-drop must be >= 0 points, got -1.0"),
    (["--max-drop", "0.5", "--bits", "4"], "--max-drop chooses between widths: give two or more"),
    (["--max-drop", "0.5", "--bits", "1", "8"], "--bits must be in 2..16, got 1"),
    (["--sensitivity", "--bits", "17"], "--bits must be in 2..16, got 17"),
    (["--sensitivity", "--mode", "qat"], "--sensitivity / --max-drop work on --mode ptq without --plan"),
    (["--sensitivity", "--sweep"], "take their widths from --bits"),
    (["--sensitivity", "--sensitivity-images", "0"], "--sensitivity-images must be positive"),
])
def test_bad_mixed_precision_flags(args: list[str], message: str, capsys: pytest.CaptureFixture,
                                   tmp_path: Path) -> None:
    try:
        code = run_cli(quantize.main, ["--checkpoint-dir", str(tmp_path), *args], prog="quantize.py")
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = int(exc.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


def test_plan_chooses_the_recipe_of_its_narrowest_width(tmp_path: Path) -> None:
    from lit_quant.app.pipeline.config import QuantizeConfig

    path = tmp_path / "plan.yaml"
    plan = mixed_plan(QuantPlan.from_bits(8, 8), {("conv1", "weight"): 4, ("fc", "act"): 8}, 8)
    path.write_text(yaml.safe_dump(plan.to_dict()))
    cfg = QuantizeConfig(plan=str(path))
    assert (cfg.weight_bits, cfg.act_bits, cfg.weight_rounding, cfg.bias_correction) == (4, 8, "gptq", True)
    path.write_text(yaml.safe_dump(QuantPlan.from_bits(8, 8).to_dict()))
    assert QuantizeConfig(plan=str(path)).weight_rounding == "nearest"


@pytest.mark.ddp
def test_two_processes_split_the_sensitivity_passes(trained: Path, tmp_path: Path) -> None:
    """Under DDP each process measures every other knob and the results are gathered: the same table as one
    process (the calibration statistics are merged bit for bit, so the drops agree exactly)."""
    results = {}
    for devices in ("1", "2"):
        run = copy_run(trained, tmp_path / f"dev{devices}")
        args = ["--ckpt", str(run / "best.ckpt"), "--accelerator", "cpu", "--devices", devices, "--no-latency",
                "--sensitivity", "--bits", "8", "4", "--sensitivity-images", "48", "--calib-batches", "3",
                "--batch-size", "40", "--name", "sens"]
        proc = run_script("quantize.py", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("SQNR of the logits") == 1  # one table, from rank 0
        results[devices] = json.loads((run / "quantize" / "sens" / "sensitivity.json").read_text())
    one, two = results["1"]["widths"], results["2"]["widths"]
    assert one.keys() == two.keys()
    for bits in one:
        assert one[bits]["knobs"].keys() == two[bits]["knobs"].keys()
        for name, knob in one[bits]["knobs"].items():
            assert two[bits]["knobs"][name]["drop"] == knob["drop"], (bits, name)
            assert two[bits]["knobs"][name]["sqnr_db"] == pytest.approx(knob["sqnr_db"], rel=1e-3), (bits, name)


def test_cross_layer_equalization_is_applied_once_for_the_whole_search(trained: Path, tmp_path: Path) -> None:
    """With --cle the sensitivity, the checks and the row all see the equalized model: the sensitivity cache
    of the plain model is not reused, and the row's plan rebuilds the row with --cle --plan."""
    run = copy_run(trained, tmp_path)
    common = ["--ckpt", str(run / "best.ckpt"), "--no-latency", "--sensitivity-images", "48", "--calib-batches", "2"]
    assert quantize.main([*common, "--sensitivity", "--bits", "8", "--name", "plain"]) == 0
    assert quantize.main([*common, "--cle", "--max-drop", "100", "--bits", "3", "8", "--name", "cle"]) == 0
    sens = json.loads((run / "quantize" / "cle" / "sensitivity.json").read_text())
    assert sens["passes"] > 0  # neither width came from the plain model's cache
    row = report_rows(run)[1]
    plan = json.loads((run / "quantize" / "cle" / "search.json").read_text())["plan"]
    assert quantize.main([*common, "--cle", "--plan", plan, "--name", "again"]) == 0
    assert report_rows(run)[1]["top1"] == row["top1"]
