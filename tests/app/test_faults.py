"""Hostile input refused before any work, faults found during it, and the files a run must not touch.

Each case runs the real entry point in-process (as ``tests/app/test_bad_input.py`` does) and asserts: exit status 2,
one line on stderr naming what is wrong, no Lightning stage started (``fit`` / ``validate`` / ``test`` /
``predict``: the work) for input that can be checked without a forward pass, and nothing new in the folders the
run was given. ``tools/hostile.py`` runs the same kinds of case, and more, as separate processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import tiny_args
from test_bad_input import _one_line, _quantize, _train

import quantize
import train
from lit_quant.app.cli import run_cli

pytestmark = pytest.mark.slow

STAGES = ("fit", "validate", "test", "predict")
_spec = importlib.util.spec_from_file_location("hostile", Path(__file__).resolve().parents[2] / "tools" / "hostile.py")
hostile = importlib.util.module_from_spec(_spec)
sys.modules["hostile"] = hostile  # dataclasses look their module up while the file executes
_spec.loader.exec_module(hostile)


@contextlib.contextmanager
def watch_work(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The Lightning stages started inside the block, in order (the work a refusal must come before)."""
    started: list[str] = []
    for stage in STAGES:
        real = getattr(pl.Trainer, stage)

        def marked(self: pl.Trainer, *args: Any, _real: Callable = real, _stage: str = stage, **kw: Any) -> Any:
            started.append(_stage)
            return _real(self, *args, **kw)

        monkeypatch.setattr(pl.Trainer, stage, marked)
    yield started


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.name != ".lock"} if root.exists() else set()


@pytest.fixture(scope="module")
def quantized(trained: Path) -> Path:
    """The module's trained run after one PTQ pass that also wrote its stats file (``<root>/stats.yaml``)."""
    stats = trained / "stats.yaml"
    assert quantize.main(["--checkpoint-dir", str(trained), "--calib-batches", "1", "--no-latency", "--no-progress",
                          "--stats-file", str(stats)]) == 0
    return trained


@pytest.fixture
def run(quantized: Path, tmp_path: Path) -> Path:
    """A private copy of the quantized run folder (``<root>/tiny``) and its stats file, free to damage."""
    root = tmp_path / "ck"
    shutil.copytree(quantized / "tiny", root / "tiny", ignore=shutil.ignore_patterns("quantize", "report.*"))
    shutil.copy(quantized / "stats.yaml", tmp_path / "stats.yaml")
    return root


def _q(run: Path, *extra: str) -> list[str]:
    return ["--checkpoint-dir", str(run), "--calib-batches", "1", "--no-latency", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("flags,needle", [
    (["--momentum", "-1"], "--momentum"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--label-smoothing", "2"], "--label-smoothing"),
    (["--seed", "-1"], "--seed"),
    (["--batch-size", "99999999999999999999"], "--batch-size"),
    (["--precision", "transformer-engine"], "transformer"),
    (["--run-name", "../../escape"], "--run-name"),
    (["--run-name", "/tmp/lit-quant-absolute-escape"], "--run-name"),
    (["--num-nodes", "2"], "MASTER_ADDR"),
])
def test_train_flags_refused_before_work(flags: list[str], needle: str, tmp_path: Path, capsys,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with watch_work(monkeypatch) as started:
        code, err = _train(tiny_args(tmp_path / "new", *flags), capsys)
    _one_line(code, err, needle)
    assert started == [] and not (tmp_path / "new").exists()
    assert not Path("/tmp/lit-quant-absolute-escape").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "-1"], "--seed"),
    (["--lr", "-1"], "--lr"),
    (["--precision", "transformer-engine"], "transformer"),
    (["--num-nodes", "2"], "MASTER_ADDR"),
])
def test_qat_flags_refused_before_work(run: Path, flags: list[str], needle: str, capsys,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    before = _files(run)
    with watch_work(monkeypatch) as started:
        code, err = _quantize(_q(run, "--mode", "qat", *flags), capsys)
    _one_line(code, err, needle)
    assert started == [] and _files(run) == before


# ---------------------------------------------------------------------------------------------- plans, stats


def _stats(path: Path, minimum: float, maximum: float) -> None:
    data = yaml.safe_load(path.read_text())
    for entry in data["quantizers"].values():
        entry["min"] = [minimum] * len(entry["min"])
        entry["max"] = [maximum] * len(entry["max"])
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("case,needle", [
    ("plan syntax", "is not valid YAML at line"),
    ("plan unknown layer", "layerz.3.conv1"),
    ("plan percentile 200", "percentile"),
    ("plan /dev/zero", "not a regular file"),
    ("no-quant-layers unknown", "layerz.9"),
    ("stats syntax", "is not valid YAML at line"),
    ("stats beyond float32", "finite in float32"),
    ("stats all [0, 0]", "zero width"),
])
def test_plans_and_stats_refused_before_the_fp32_pass(run: Path, case: str, needle: str, tmp_path: Path,
                                                      capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    plan, stats = tmp_path / "plan.yaml", tmp_path / "stats.yaml"
    flags = {"plan syntax": ["--plan", str(plan)], "plan unknown layer": ["--plan", str(plan)],
             "plan percentile 200": ["--plan", str(plan)], "plan /dev/zero": ["--plan", "/dev/zero"],
             "no-quant-layers unknown": ["--no-quant-layers", "layerz.9"]}.get(case, ["--stats-file", str(stats)])
    if case == "plan syntax":
        plan.write_text("act: {bits: 8}\nweight: {bits: 4\n")
    elif case == "plan unknown layer":
        plan.write_text("overrides:\n  - {pattern: layerz.3.conv1, weight: {bits: 4}}\n")
    elif case == "plan percentile 200":
        plan.write_text("act: {observer: percentile, observer_args: {percentile: 200}}\n")
    elif case == "stats syntax":
        stats.write_text("version: 1\nquantizers:\n  input: {min: [0.0, max: [1.0]}\n")
    elif case == "stats beyond float32":
        _stats(stats, -1e39, 1e39)
    elif case == "stats all [0, 0]":
        _stats(stats, 0.0, 0.0)
    kept = stats.read_bytes()
    before = _files(run)
    with watch_work(monkeypatch) as started:
        code, err = _quantize(_q(run, *flags), capsys)
    _one_line(code, err, needle)
    assert started == [] and _files(run) == before
    assert stats.read_bytes() == kept  # a stats file given as input is never rewritten by a refused run


def test_unwritable_report_folder_refused_before_work(run: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    (run / "tiny" / "quantize").write_text("a file where the report folders go")
    before = {p: p.stat().st_mtime_ns for p in _files(run) if p.is_file()}
    with watch_work(monkeypatch) as started:
        code, err = _quantize(_q(run), capsys)
    _one_line(code, err, "quantize")
    assert started == [] and {p: p.stat().st_mtime_ns for p in _files(run) if p.is_file()} == before


# ---------------------------------------------------------------------------------------------- checkpoints


def _edit(path: Path, change: Callable[[dict[str, Any]], Any], out: Path | None = None) -> Path:
    ckpt = torch.load(path, weights_only=True)
    result = change(ckpt)
    torch.save(ckpt if result is None else result, out or path)
    return out or path


def _huge(ckpt: dict[str, Any]) -> dict[str, Any]:
    """16 KB naming a vit_h_14 with ten million classes for 224-pixel images (13 billion parameters): refused
    from the shapes alone, without building the model."""
    hp = ckpt["hyper_parameters"]
    return {"state_dict": {}, "hyper_parameters": {**hp, "num_classes": 10 ** 7, "arch": {
        **hp["arch"], "model": "vit_h_14", "num_classes": 10 ** 7, "image_size": 224}}}


@pytest.mark.parametrize("case,change,needle", [
    ("without arch", hostile.hparams(arch=hostile.DROP), "arch"),
    ("arch without in_channels", hostile.arch(in_channels=hostile.DROP), "in_channels"),
    ("negative class count", hostile.arch(num_classes=-3), "num_classes"),
    ("extra hyper-parameter", hostile.hparams(colour="blue"), "colour"),
    ("missing hyper-parameter", hostile.hparams(lr=hostile.DROP), "lr"),
    ("inf in a BatchNorm variance", hostile.set_tensor("bn1.running_var", float("inf")), "running_var"),
    ("huge architecture", _huge, "does not match its architecture"),
])
def test_malformed_checkpoints_name_the_field(run: Path, case: str, change: Callable, needle: str, capsys,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _edit(run / "tiny" / "best.ckpt", change, run / "tiny" / "bad.ckpt")
    before = _files(run)
    with watch_work(monkeypatch) as started:
        code, err = _quantize(_q(run, "--ckpt", str(bad)), capsys)
    _one_line(code, err, needle)
    assert started == [] and _files(run) == before


def test_quantized_checkpoint_with_an_unknown_data_key(run: Path, capsys) -> None:
    bad = _edit(run / "tiny" / "ptq-w8a8.ckpt", lambda c: c["data"].update(colour="blue"), run / "x.ckpt")
    code, err = _quantize(["--eval", str(bad), "--no-progress"], capsys)
    _one_line(code, err, "colour")


def test_train_resume_refuses_a_qat_checkpoint_and_writes_nothing(quantized: Path, tmp_path: Path,
                                                                  capsys) -> None:
    root = tmp_path / "ck"
    shutil.copytree(quantized / "tiny", root / "tiny", ignore=shutil.ignore_patterns("quantize", "report.*"))
    assert quantize.main(_q(root, "--mode", "qat", "--epochs", "1", "--no-builtin-qat", "--bits", "8")) == 0
    qat = next((root / "tiny").glob("qat-w8a8/last.ckpt"))
    before = _files(root)
    code, err = _train(tiny_args(root, "--resume", str(qat)), capsys)
    _one_line(code, err, "QAT")
    assert _files(root) == before


def test_train_resume_refuses_a_bad_rng_state(run: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    last = run / "tiny" / "last.ckpt"
    _edit(last, lambda c: c.update(rng_state={"python": "garbage"}))
    kept = (run / "tiny" / "best.ckpt").read_bytes()
    with watch_work(monkeypatch) as started:
        code, err = _train(["--resume", "last", "--checkpoint-dir", str(run), "--epochs", "4", "--no-progress"],
                           capsys)
    _one_line(code, err, "rng")
    assert started == [] and (run / "tiny" / "best.ckpt").read_bytes() == kept


# ---------------------------------------------------------------------------------------------- faults in the work


def test_fp32_model_that_overflows_is_named(run: Path, capsys) -> None:
    bad = _edit(run / "tiny" / "best.ckpt", hostile.overflowing_weights, run / "tiny" / "overflow.ckpt")
    before = _files(run)
    code, err = _quantize(_q(run, "--ckpt", str(bad)), capsys)
    _one_line(code, err, "fp32 model")
    assert _files(run) == before


def test_qat_that_diverges_stops_with_one_line(run: Path, capsys) -> None:
    code, err = _quantize(_q(run, "--mode", "qat", "--bits", "8", "--epochs", "1", "--lr", "1e38",
                             "--no-builtin-qat"), capsys)
    _one_line(code, err, "non-finite")


# ---------------------------------------------------------------------------------------------- caches, data


def test_damaged_sensitivity_cache_is_measured_again(run: Path, capsys) -> None:
    args = _q(run, "--sensitivity", "--bits", "8", "--sensitivity-images", "32", "--name", "s")
    assert quantize.main(args) == 0
    cache = run / "tiny" / "sensitivity" / "sensitivity.json"
    measured = json.loads(cache.read_text())["8"]["knobs"]
    tampered = json.loads(cache.read_text())
    knob = next(iter(tampered["8"]["knobs"]))
    tampered["8"]["knobs"][knob]["sqnr_db"] = 999.0
    for damage in (json.dumps(tampered), cache.read_text()[: len(cache.read_text()) // 2]):
        cache.write_text(damage)
        assert quantize.main([*args[:-1], f"s-{len(damage)}"]) == 0
        assert json.loads(cache.read_text())["8"]["knobs"] == measured
    capsys.readouterr()


@pytest.mark.parametrize("bad", ["truncated", "bomb", "pickle"])
def test_unreadable_image_is_skipped_and_counted(bad: str, tmp_path: Path, capsys) -> None:
    hostile.imagenet(bad)(tmp_path)  # an ImageFolder tree at <tmp_path>/imagenet, one file made bad
    data = tmp_path / "imagenet"
    code = run_cli(train.main, ["--data", "imagenet", "--data-dir", str(data), "--model", "resnet20",
                                "--image-size", "16", "--epochs", "1", "--batch-size", "4", "--no-progress",
                                "--checkpoint-dir", str(tmp_path / "ck")], prog="train.py")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.count("\n") == 1 and "warning: skipped unreadable image" in err and "3.png" in err
    assert "skipped 1 unreadable image" in out
    assert json.loads(next((tmp_path / "ck").glob("*/metrics.json")).read_text())["skipped_images"] == 1


def test_third_party_warnings_stay_quiet(tmp_path: Path, capsys) -> None:
    """What a user sees is what lit-quant says: Lightning's start-up lines and known deprecation warnings of
    dependencies are filtered at the entry points (``--verbose`` shows them)."""
    code, err = _train(tiny_args(tmp_path, "--epochs", "1"), capsys)
    assert code == 0 and err == "", err


def test_torch_ao_failing_on_a_model_costs_only_its_row(run: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.ao's converted model raising on a model (an op it cannot run, as its shufflenet_v2 does on this
    torch) leaves that backend's row without accuracy, its reason in the note, and every other row."""
    from lit_quant.app.pipeline import reference

    real = reference.builtin_ptq

    def failing(model: torch.nn.Module, batches: Any, backend: str, example: torch.Tensor) -> Any:
        result = real(model, batches, backend, example)
        if backend == "qnnpack":
            def broken(x: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("required rank 4 tensor to use channels_last format")
            result.model.forward = broken
        return result

    monkeypatch.setattr(reference, "builtin_ptq", failing)
    assert quantize.main(_q(run, "--backend", "qnnpack", "--name", "ao")) == 0
    rows = json.loads((run / "tiny" / "quantize" / "ao" / "report.json").read_text())["rows"]
    failed = [r for r in rows if r["variant"] == "builtin-ptq" and r["backend"] == "qnnpack"]
    assert len(failed) == 1 and failed[0]["top1"] is None
    assert "torch.ao qnnpack int8 failed on this model: required rank 4" in failed[0]["note"]
    assert all(r["top1"] is not None for r in rows if r is not failed[0])
    assert {r["variant"] for r in rows} >= {"fp32", "ptq", "builtin-ptq"}
    capsys.readouterr()
