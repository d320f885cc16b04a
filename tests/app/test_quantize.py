"""quantize.py called as a function on a freshly trained tiny checkpoint: report rows, accuracy, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import report_rows, run_script, tiny_args

import quantize
import train
from lit_quant.app.cli import run_cli
from lit_quant.app.pipeline.rows import ROW_KEYS

pytestmark = pytest.mark.slow


def test_ptq_8bit_report_matches_fp32_and_builtin(trained: Path) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "8", "--calib-batches", "4",
                          "--no-latency"]) == 0
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert set(rows) == {"fp32", "ptq", "builtin-ptq"}
    assert all(set(r) == set(ROW_KEYS) for r in rows.values())
    assert rows["ptq"]["weight_bits"] == rows["ptq"]["act_bits"] == 8 and rows["ptq"]["calib_s"] > 0
    assert rows["ptq"]["size_bytes"] is None  # a fake-quant simulation has no integer size to report
    assert abs(rows["ptq"]["top1"] - rows["fp32"]["top1"]) <= 2.0
    assert abs(rows["builtin-ptq"]["top1"] - rows["fp32"]["top1"]) <= 2.0
    assert rows["builtin-ptq"]["backend"] == "x86"
    assert rows["builtin-ptq"]["size_bytes"] < 0.35 * rows["fp32"]["size_bytes"]  # real int8 weights
    csv_header = (trained / "tiny" / "report.csv").read_text().splitlines()[0]
    assert csv_header.split(",") == list(ROW_KEYS)
    # image by image: fixed - broken is the top-1 difference in images (fake test split: a quarter of 256)
    images = 64
    for variant in ("ptq", "builtin-ptq"):
        r = rows[variant]
        assert r["fixed_vs_fp32"] - r["broken_vs_fp32"] == pytest.approx((r["top1"] - rows["fp32"]["top1"]) * images / 100)
        assert 0.0 < r["p_vs_fp32"] <= 1.0
    [pair] = _pairs(trained / "tiny")
    assert pair["ours"] == "ptq" and pair["theirs"] == "builtin-ptq (x86)"
    assert pair["ours_only"] - pair["theirs_only"] == pytest.approx(
        (rows["ptq"]["top1"] - rows["builtin-ptq"]["top1"]) * images / 100)


def test_low_bits_lose_accuracy_honestly(trained: Path) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--weight-bits", "2", "--act-bits", "2",
                          "--calib-batches", "4", "--no-latency"]) == 0
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert rows["ptq"]["weight_bits"] == 2 and rows["ptq"]["top1"] < rows["fp32"]["top1"]


def test_compare_runs_every_backend(trained: Path) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--mode", "compare", "--calib-batches", "2",
                          "--no-latency"]) == 0
    backends = {r["backend"] for r in report_rows(trained / "tiny") if r["variant"] == "builtin-ptq"}
    assert {"fbgemm", "x86", "qnnpack"} <= backends


@pytest.mark.parametrize("argv,message", [
    (["--bits", "1"], "must be in 2..16"),
    (["--bits", "17"], "must be in 2..16"),
    (["--backend", "tensorrt"], "invalid --backend 'tensorrt'; choose from fbgemm"),
    (["--act-observer", "kl"], "invalid --act-observer 'kl'"),
    (["--ckpt", "/nonexistent.ckpt"], "not found"),
])
def test_bad_input_is_one_line(trained: Path, argv: list[str], message: str, capsys) -> None:
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--no-latency", *argv], prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_no_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    assert run_cli(quantize.main, ["--checkpoint-dir", str(tmp_path)], prog="quantize.py") == 2
    assert "no fp32 checkpoint" in capsys.readouterr().err


def test_eval_reloads_quantized_checkpoint_exactly(trained: Path, capsys) -> None:
    from lit_quant.app.pipeline.checkpoint import evaluate_quantized

    assert quantize.main(["--checkpoint-dir", str(trained), "--weight-bits", "4", "--act-bits", "6",
                          "--calib-batches", "4", "--no-latency"]) == 0
    saved = trained / "tiny" / "ptq-w4a6.ckpt"
    reported = next(r for r in report_rows(trained / "tiny") if r["variant"] == "ptq")
    reloaded = evaluate_quantized(saved, batch_size=64)  # another batch size: the result must not depend on it
    assert reloaded["top1"] == pytest.approx(reported["top1"], abs=1e-9)
    assert reloaded["top5"] == pytest.approx(reported["top5"], abs=1e-9)
    assert quantize.main(["--eval", str(saved)]) == 0
    assert "ptq (reloaded)" in capsys.readouterr().out
    # an fp32 checkpoint is not a quantized one
    assert run_cli(quantize.main, ["--eval", str(trained / "tiny" / "best.ckpt")], prog="quantize.py") == 2
    assert "is an fp32 training checkpoint: quantize it with --ckpt" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "said"), [
    (["--weight-rounding", "gptq", "--bias-correction"], "GPTQ weight rounding + bias correction: "),
    (["--weight-rounding", "adaround", "--adaround-iters", "50", "--cle"],
     "cross-layer equalization of 9 layer pairs, biases absorbed in ")])
def test_layerwise_rows_reload_exactly(trained: Path, flags: list[str], said: str) -> None:
    """GPTQ with bias correction, AdaRound after cross-layer equalization: the row says what ran, the model
    stays on its grid, and --eval of the saved checkpoint reproduces the row (the equalized, rounded weights
    and shifted biases are in it)."""
    from lit_quant.app.pipeline.checkpoint import evaluate_quantized, load_quantized
    from lit_quant.quant.layers import QuantWeightLayer

    assert quantize.main(["--checkpoint-dir", str(trained), "--weight-bits", "3", "--act-bits", "8", *flags,
                          "--calib-batches", "4", "--no-latency"]) == 0
    row = next(r for r in report_rows(trained / "tiny") if r["variant"] == "ptq")
    assert said in row["note"] and "round-to-nearest" in row["note"]
    saved = trained / "tiny" / "ptq-w3a8.ckpt"
    assert evaluate_quantized(saved, batch_size=64)["top1"] == pytest.approx(row["top1"], abs=1e-9)
    model, _ = load_quantized(saved)
    for layer in (m for m in model.modules() if isinstance(m, QuantWeightLayer)):
        w, qp = layer.float_weight().detach(), layer.weight_quant.qparams()
        k = w / qp.scale.reshape(-1, *[1] * (w.dim() - 1))
        assert torch.allclose(k, k.round(), atol=1e-3)


def test_scheme_shorthand_and_plan_yaml(trained: Path, tmp_path: Path, capsys) -> None:
    cfg, _, _ = quantize.resolve_args(["--scheme", "asym_s", "--act-scheme", "asym_u"])
    assert (cfg.weight_scheme, cfg.act_scheme) == ("asym_s", "asym_u")  # explicit flag beats the shorthand
    plan = tmp_path / "plan.yaml"
    plan.write_text("weight: {bits: 4}\nact: {bits: 4, observer: mse}\n"
                    "overrides:\n  - {pattern: '@first', weight: {bits: 8}, act: {bits: 8}}\n")
    assert quantize.main(["--checkpoint-dir", str(trained), "--plan", str(plan), "--calib-batches", "2",
                          "--no-latency"]) == 0
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert rows["ptq"]["weight_bits"] == 4 and (trained / "tiny" / "ptq-w4a4.ckpt").is_file()
    assert "; overrides: @first w8 a8;" in rows["ptq"]["note"]  # a 4/4 row says what stayed wider
    assert "PTQ recipe gptq" in rows["ptq"]["note"]  # a 4-bit plan gets the 4-bit recipe
    plan.write_text("overrides:\n  - {pattern: layers.0.conv9, skip: true}\n")
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--plan", str(plan), "--no-latency"],
                   prog="quantize.py") == 2
    err = capsys.readouterr().err
    assert "layers.0.conv9" in err and "layers.0.conv1" in err and len(err.strip().splitlines()) == 1


def test_stats_file_second_run_skips_calibration(trained: Path, tmp_path: Path) -> None:
    stats = tmp_path / "stats.yaml"
    args = ["--checkpoint-dir", str(trained), "--bits", "6", "--no-latency", "--stats-file", str(stats)]
    assert quantize.main([*args, "--calib-batches", "4"]) == 0 and stats.is_file()
    saved = trained / "tiny" / "ptq-w6a6.ckpt"

    def act_scales() -> dict:
        state = torch.load(saved, weights_only=True)["state_dict"]
        return {k: v for k, v in state.items() if k.endswith(".scale") and "weight" not in k}

    first, first_row = act_scales(), next(r for r in report_rows(trained / "tiny") if r["variant"] == "ptq")
    stats_text = stats.read_text()
    assert quantize.main([*args, "--calib-batches", "1"]) == 0
    # qparams came from the file, not from the single calibration batch of this run
    assert all(torch.equal(first[k], v) for k, v in act_scales().items()) and stats.read_text() == stats_text
    assert next(r for r in report_rows(trained / "tiny") if r["variant"] == "ptq")["top1"] == first_row["top1"]
    # ...which on its own gives other activation ranges, so the check above can fail
    assert quantize.main([*args[:-2], "--calib-batches", "1"]) == 0
    assert any(not torch.equal(first[k], v) for k, v in act_scales().items())


def test_dynamic_and_half_modes(trained: Path) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--mode", "dynamic", "--no-latency"]) == 0
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert set(rows) == {"fp32", "builtin-dynamic"}
    assert abs(rows["builtin-dynamic"]["top1"] - rows["fp32"]["top1"]) <= 2.0
    assert quantize.main(["--checkpoint-dir", str(trained), "--mode", "half", "--no-latency"]) == 0
    rows = {r["variant"]: r for r in report_rows(trained / "tiny")}
    assert abs(rows["half"]["top1"] - rows["fp32"]["top1"]) <= 1.0
    assert rows["half"]["size_bytes"] < 0.6 * rows["fp32"]["size_bytes"]


def test_bit_sweep_table_and_plot(trained: Path, capsys) -> None:
    assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "8", "4", "2", "--observers", "minmax", "mse",
                          "--calib-batches", "2", "--no-latency", "--name", "sweep", "--save-checkpoints"]) == 0
    out = capsys.readouterr().out
    assert "top-1 % against bits" in out  # a line per width, a column per observer
    rows = report_rows(trained / "tiny")
    ptq = {(r["act_bits"], r["observer"]): r["top1"] for r in rows if r["variant"] == "ptq"}
    assert set(ptq) == {(b, o) for b in (8, 4, 2) for o in ("minmax", "mse")}
    line2 = next(line for line in out.splitlines() if line.strip("│ ").startswith("2 "))
    assert f"{ptq[(2, 'minmax')]:.2f}" in line2 and f"{ptq[(2, 'mse')]:.2f}" in line2
    fp32 = next(r["top1"] for r in rows if r["variant"] == "fp32")
    for observer in ("minmax", "mse"):
        assert abs(ptq[(8, observer)] - fp32) <= 2.0 and ptq[(2, observer)] < ptq[(8, observer)]
    assert report_rows(trained / "tiny" / "quantize" / "sweep") == rows  # the run's own report, copied beside the run
    png = (trained / "tiny" / "quantize" / "sweep" / "accuracy_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert (trained / "tiny" / "ptq-w4a4-mse.ckpt").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--sweep", "--mode", "builtin"], "need --mode ptq"),
    (["--bits", "8", "1"], "must be in 2..16"),
    (["--bits", "8", "4", "--observers", "kl"], "invalid --observers 'kl'"),
])
def test_bad_sweep_flags(trained: Path, argv: list[str], message: str, capsys) -> None:
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), *argv], prog="quantize.py") == 2
    assert message in capsys.readouterr().err


def _ptq_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_clipping_flags_and_float_layers(trained: Path) -> None:
    run = trained / "tiny"
    assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "4", "--act-observer", "percentile",
                          "--percentile", "99.5", "--no-quant-layers", "fc", "layers.0.*", "--per-tensor",
                          "--calib-batches", "2", "--no-latency"]) == 0
    payload = torch.load(run / "ptq-w4a4.ckpt", weights_only=True)
    assert payload["plan"]["act"]["observer_args"] == {"percentile": 99.5}
    assert payload["plan"]["weight"]["per_channel"] is False
    names = set(payload["state_dict"])
    assert not any(k.startswith(("model.fc.", "model.layers.0.")) and "quant" in k for k in names)  # left in float
    assert any(k.startswith("model.layers.1.") and "quant" in k for k in names)
    # the report lists every op, and the layers the flags left float as float
    layers = {op["name"]: op for op in json.loads((run / "report.json").read_text())["layers"]}
    assert layers["fc"]["status"] == "float" and layers["layers.0.conv1"]["status"] == "float"
    assert layers["layers.1.conv2"] == {"name": "layers.1.conv2", "op": "Conv2d", "weight_bits": 4, "act_bits": 4,
                                        "status": "quantized"}
    assert layers["layers.1.add"]["status"] == "fused" and layers["input"]["act_bits"] == 4
    # the percentile really clips: a lower percentile gives smaller activation ranges than 100 (the max)
    scales = {}
    for p in ("100", "90"):
        assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "4", "--act-observer", "percentile",
                              "--percentile", p, "--calib-batches", "2", "--no-latency"]) == 0
        scales[p] = {k: v for k, v in _ptq_state(run / "ptq-w4a4.ckpt").items()
                     if k.endswith("act_quant.scale")}
    assert all(scales["90"][k] <= scales["100"][k] for k in scales["90"])
    assert any(scales["90"][k] < scales["100"][k] for k in scales["90"])
    assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "8", "--act-observer", "nstd",
                          "--n-std", "2", "--calib-batches", "2", "--no-latency"]) == 0
    assert torch.load(run / "ptq-w8a8.ckpt", weights_only=True)["plan"]["act"]["observer_args"] == {"n_std": 2.0}


@pytest.mark.parametrize("argv,message", [
    (["--percentile", "40"], "--percentile must be in (50, 100]"),
    (["--n-std", "0"], "--n-std must be positive"),
    (["--no-quant-layers", "fcc"], "did you mean"),
    (["--devices", "two"], "invalid --devices 'two'"),
])
def test_bad_clipping_flags(trained: Path, argv: list[str], message: str, capsys) -> None:
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--no-latency", "--calib-batches", "1", *argv],
                   prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_stats_file_of_another_model_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    assert train.main(tiny_args(other, "--run-name", "tiny", "--epochs", "1", "--seed", "7")) == 0
    stats = tmp_path / "stats.yaml"
    assert quantize.main(["--checkpoint-dir", str(other), "--bits", "8", "--calib-batches", "1", "--no-latency",
                          "--stats-file", str(stats)]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (trained / "tiny").iterdir()}
    # same architecture and data set, other weights: the ranges would be wrong, so the file is refused
    assert run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--bits", "8", "--no-latency",
                                   "--stats-file", str(stats)], prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert "calibrated on another model" in err and "weights" in err and len(err.splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in (trained / "tiny").iterdir()} == before  # nothing written


def test_mismatched_checkpoints_are_refused(trained: Path, tmp_path: Path, capsys) -> None:
    # a checkpoint copied into another run's folder, whose config.yaml describes another model and data set
    copied = tmp_path / "digits-lenet5"
    copied.mkdir()
    (copied / "best.ckpt").write_bytes((trained / "tiny" / "best.ckpt").read_bytes())
    (copied / "config.yaml").write_text("data: digits\nmodel: lenet5\n")
    assert run_cli(quantize.main, ["--ckpt", str(copied / "best.ckpt"), "--no-latency"], prog="quantize.py") == 2
    err = capsys.readouterr().err.strip()
    assert "resnet20 trained on fake" in err and "lenet5 on digits" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in copied.iterdir()) == ["best.ckpt", "config.yaml"]
    # a quantized checkpoint where the fp32 one is expected points at --eval
    assert quantize.main(["--checkpoint-dir", str(trained), "--bits", "8", "--calib-batches", "1",
                          "--no-latency"]) == 0
    assert run_cli(quantize.main, ["--ckpt", str(trained / "tiny" / "ptq-w8a8.ckpt")], prog="quantize.py") == 2
    assert "quantize.py --eval" in capsys.readouterr().err


def _pairs(run: Path) -> list[dict]:
    return json.loads((run / "report.json").read_text())["pairs"]


OBSERVERS = ("minmax", "ema", "avg", "nstd", "percentile", "mse", "entropy")


@pytest.mark.ddp
def test_two_processes_give_the_single_process_report(trained: Path, tmp_path: Path) -> None:
    """Every activation observer calibrates bit for bit alike in one process and in two: three calibration
    batches of 80 images (rank 0 gets batches 0 and 2, rank 1 batch 1; 80 x 16 x 8 x 8 activations, so the
    histograms subsample them), 4 bits so that each observer's top-1 tells its qparams apart."""
    runs = {}
    for devices in ("1", "2"):
        run = tmp_path / f"dev{devices}" / "tiny"
        run.mkdir(parents=True)
        for name in ("best.ckpt", "config.yaml"):
            (run / name).write_bytes((trained / "tiny" / name).read_bytes())
        args = ["--ckpt", str(run / "best.ckpt"), "--accelerator", "cpu", "--devices", devices, "--mode", "ptq",
                "--bits", "4", "--observers", *OBSERVERS, "--calib-batches", "3", "--batch-size", "80", "--no-latency",
                "--save-checkpoints"]
        if devices == "1":
            assert quantize.main(args) == 0
        else:
            proc = run_script("quantize.py", *args)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert proc.stdout.count("lit-quant: fp32 vs ours vs torch.ao") == 1  # one table, from rank 0
        runs[devices] = run
    one_rows, two_rows = report_rows(runs["1"]), report_rows(runs["2"])
    assert [r["variant"] for r in two_rows] == ["fp32", *["ptq"] * len(OBSERVERS), "builtin-ptq"]
    assert [r["observer"] for r in two_rows if r["variant"] == "ptq"] == list(OBSERVERS)
    for a, b in zip(one_rows, two_rows, strict=True):
        assert (b["variant"], b["observer"], b["top1"], b["top5"]) == (a["variant"], a["observer"], a["top1"], a["top5"])
        # per-image outcomes gathered from both ranks pair up with fp32's as one process's do
        assert all(b[k] == a[k] for k in ("fixed_vs_fp32", "broken_vs_fp32", "p_vs_fp32"))
    assert _pairs(runs["2"]) == _pairs(runs["1"])
    for observer in OBSERVERS:
        one, two = (_ptq_state(runs[d] / f"ptq-w4a4-{observer}.ckpt") for d in ("1", "2"))
        quant_keys = [k for k in one if k.endswith((".scale", ".zero_point"))]
        assert quant_keys and [k for k in quant_keys if not torch.equal(one[k], two[k])] == [], observer
