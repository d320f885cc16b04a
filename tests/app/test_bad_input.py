"""Bad input and faults end in one line and exit 2, checked before any work, and leave nothing half-written.

Each case runs the real entry point (``train.main`` / ``quantize.main`` through ``run_cli``, as the scripts do)
and asserts the exit status, that stderr holds exactly one line, and what is (not) left on disk.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import report_rows, tiny_args
from test_data import write_idx, write_mnist

import quantize
import train
from lit_quant.app.cli import run_cli
from lit_quant.app.training import output_dir_lock

pytestmark = pytest.mark.slow


def _run(main, prog: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = run_cli(main, argv, prog=prog)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = int(exc.code or 0)
    return code, capsys.readouterr().err.strip()


def _train(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return _run(train.main, "train.py", argv, capsys)


def _quantize(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    return _run(quantize.main, "quantize.py", argv, capsys)


def _one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the module's trained run folder (``<root>/tiny``), free to damage."""
    root = tmp_path / "ck"
    shutil.copytree(trained / "tiny", root / "tiny", ignore=shutil.ignore_patterns("qat-*", "ptq-*", "report.*"))
    return root


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``path`` (a real file system that fills up or turns read-only); skips where this
    process may not mount (the tests run as root in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# ---------------------------------------------------------------------------------------------- flags, config


@pytest.mark.parametrize("script", ["train", "quantize"])
def test_abbreviated_flags_are_refused(script: str, tmp_path: Path, capsys) -> None:
    run = _train if script == "train" else _quantize
    code, err = run(["--epoch", "3", "--checkpoint-dir", str(tmp_path)], capsys)
    _one_line(code, err, "unrecognized arguments: --epoch 3")


@pytest.mark.parametrize("text,message", [
    ("epochs: three\n", "invalid value for epochs: 'three' (expected an integer)"),
    ("batch_size: 2.5\n", "invalid value for batch-size: 2.5 (expected an integer"),
    ("augment: 'no'\n", "invalid value for augment: 'no' (expected true or false)"),
    ("lr: .nan\n", "invalid value for lr: nan (expected a finite number)"),
    ("- epochs\n", "must hold a mapping of settings"),
])
def test_config_values_of_the_wrong_type(text: str, message: str, tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, err = _train(["--config", str(config), "--data", "fake", "--no-progress", "--checkpoint-dir",
                        str(tmp_path / "ck")], capsys)
    _one_line(code, err, message)
    assert not (tmp_path / "ck").exists()


def test_bad_config_does_not_overwrite_a_run_it_resumes(run_copy: Path, tmp_path: Path, capsys) -> None:
    saved = (run_copy / "tiny" / "config.yaml").read_bytes()
    config = tmp_path / "bad.yaml"
    config.write_text("batch_size: 2.5\n")
    code, err = _train(["--config", str(config), "--resume", "last", "--checkpoint-dir", str(run_copy)], capsys)
    _one_line(code, err, "batch-size")
    assert (run_copy / "tiny" / "config.yaml").read_bytes() == saved
    code, err = _train(["--resume", "last", "--checkpoint-dir", str(run_copy), "--epochs", "3"], capsys)
    assert code == 0, err  # the run folder still resumes


def test_nan_learning_rate_is_refused(tmp_path: Path, capsys) -> None:
    code, err = _train([*tiny_args(tmp_path), "--lr", "nan"], capsys)
    _one_line(code, err, "expected a finite number")
    assert not tmp_path.joinpath("fake-resnet20").exists()


def test_plan_boolean_given_as_a_string(trained: Path, tmp_path: Path, capsys) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text('fold_bn: "no"\n')
    code, err = _quantize(["--checkpoint-dir", str(trained), "--plan", str(plan), "--no-latency"], capsys)
    _one_line(code, err, "fold_bn must be true or false, got 'no'")


@pytest.mark.parametrize("text", ["- a\n- b\n", "data: [unclosed\n", "split_seed: one\n"])
def test_run_folder_config_that_is_invalid(run_copy: Path, text: str, capsys) -> None:
    (run_copy / "tiny" / "config.yaml").write_text(text)
    code, err = _quantize(["--checkpoint-dir", str(run_copy), "--no-latency"], capsys)
    _one_line(code, err, "config.yaml")
    assert not (run_copy / "tiny" / "ptq-w8a8.ckpt").exists()


# ---------------------------------------------------------------------------------------------- data


def _mnist(root: Path, **kwargs) -> Path:
    write_mnist(root, **kwargs)
    return root


@pytest.mark.parametrize("case,message", [
    ("truncated", "cannot read"),
    ("labels", "training label 12 is outside 0..9"),
    ("empty", "the training set is empty"),
    ("val", "leaves no validation images"),
])
def test_data_that_cannot_train(case: str, message: str, tmp_path: Path, capsys) -> None:
    data = _mnist(tmp_path / "mnist", compress=True, n_train=0 if case == "empty" else 40)
    extra: list[str] = []
    if case == "truncated":
        gz = data / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])
    elif case == "labels":
        labels = np.zeros(40, dtype=np.uint8)
        labels[7] = 12
        write_idx(data / "train-labels-idx1-ubyte.gz", labels, compress=True)
    elif case == "val":
        extra = ["--val-fraction", "0.001"]
    ck = tmp_path / "ck"
    code, err = _train(["--data", "mnist", "--data-dir", str(data), "--epochs", "1", "--batch-size", "16",
                        "--model", "lenet5", "--no-progress", "--checkpoint-dir", str(ck), *extra], capsys)
    _one_line(code, err, message)
    assert not ck.exists()  # no run folder holding only config.yaml and logs


# ---------------------------------------------------------------------------------------------- outputs


def test_checkpoint_dir_that_is_a_file(tmp_path: Path, capsys) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    code, err = _train(tiny_args(target), capsys)
    _one_line(code, err, "--checkpoint-dir: cannot write", "a file stands where a folder is needed")


def test_checkpoint_dir_under_proc(capsys) -> None:
    code, err = _train(tiny_args(Path("/proc/lit-quant-test")), capsys)
    _one_line(code, err, "--checkpoint-dir: cannot write to /proc/lit-quant-test")


def test_full_disk_is_named_before_training(tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "small", "32k") as small:
        code, err = _train(tiny_args(small), capsys)
    _one_line(code, err, "no space left on the device (the disk is full)")


def test_read_only_run_folder_fails_before_calibration(trained: Path, tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", "16m") as ro:
        shutil.copytree(trained / "tiny", ro / "tiny", ignore=shutil.ignore_patterns("qat-*", "ptq-*", "report.*"))
        assert subprocess.run(["mount", "-o", "remount,ro", str(ro)]).returncode == 0
        code, err = _quantize(["--checkpoint-dir", str(ro), "--no-latency"], capsys)
        _one_line(code, err, "cannot write to", "read-only")
        assert "lit-quant: fp32 vs ours" not in capsys.readouterr().out


def test_write_that_fails_midway_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A disk that fills after the start (the probe passed): the failed save is one line naming it."""
    import errno
    import os

    import lit_quant.io as lq_io

    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if "best.ckpt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(lq_io.os, "fsync", fsync)
    code, err = _train(tiny_args(tmp_path, "--epochs", "1"), capsys)
    _one_line(code, err, "no space left on the device (the disk is full)")
    assert not list(tmp_path.rglob("*.lit-quant.tmp"))


# ---------------------------------------------------------------------------------------------- stats files


@pytest.mark.parametrize("case,message", [
    ("binary", "is not text"),
    ("types", "min must be a list of numbers finite in float32"),
    ("missing", "lacks max"),
    ("folder", "is a folder"),
])
def test_bad_stats_file(trained: Path, tmp_path: Path, case: str, message: str, capsys) -> None:
    stats = tmp_path / "stats.yaml"
    entry = {"kind": "act", "observer": "mse", "bits": 8, "scheme": "asym_u", "min": [0.0], "max": [1.0]}
    if case == "binary":
        stats.write_bytes(bytes(range(256)) * 4)
    elif case == "types":
        stats.write_text(yaml.safe_dump({"version": 1, "quantizers": {"input": {**entry, "min": "low"}}}))
    elif case == "missing":
        stats.write_text(yaml.safe_dump({"version": 1, "quantizers": {"input": {
            k: v for k, v in entry.items() if k != "max"}}}))
    else:
        stats.mkdir()
    code, err = _quantize(["--checkpoint-dir", str(trained), "--stats-file", str(stats), "--no-latency"], capsys)
    _one_line(code, err, "stats file", message)


# ---------------------------------------------------------------------------------------------- training faults


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys) -> None:
    args = tiny_args(tmp_path, "--run-name", "run", "--epochs", "1")
    assert _train(args, capsys)[0] == 0
    best = (tmp_path / "run" / "best.ckpt").read_bytes()
    last = (tmp_path / "run" / "last.ckpt").read_bytes()
    code, err = _train([*args, "--lr", "1e12"], capsys)
    _one_line(code, err, "the training loss is nan", "try a lower --lr")
    assert (tmp_path / "run" / "best.ckpt").read_bytes() == best
    assert (tmp_path / "run" / "last.ckpt").read_bytes() == last


def test_only_stale_temporary_files_of_ours_are_removed(run_copy: Path, capsys) -> None:
    """A killed save's temporary file (our suffix, old, unlocked) goes; a user's own hidden ``.tmp`` file, and
    the temporary file of a save another process is making (locked), stay."""
    import fcntl
    import os
    import time

    from lit_quant.io import TEMP_SUFFIX

    run = run_copy / "tiny"
    hour_ago = time.time() - 3600
    stale = [run / f".best.ckpt.k1ll3d{TEMP_SUFFIX}", run / f".last.ckpt.x9{TEMP_SUFFIX}"]
    live = run / f".last.ckpt.s4v1ng{TEMP_SUFFIX}"
    users = [run / "notes.tmp", run / ".thesis.tmp", run / ".best.ckpt.draft.tmp"]
    for path in (*stale, live, *users):
        path.write_bytes(b"half a checkpoint")
        os.utime(path, (hour_ago, hour_ago))
    with live.open("rb") as held:  # a save in progress elsewhere holds its lock
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        code, err = _quantize(["--checkpoint-dir", str(run_copy), "--calib-batches", "1", "--no-latency"], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert live.exists() and all(p.read_bytes() == b"half a checkpoint" for p in users)


def test_folder_another_run_writes_is_refused(run_copy: Path, tmp_path: Path, capsys) -> None:
    """A second run into a folder a running one writes (its lock held) stops with one line, writing nothing
    there; the lock goes with the run that held it."""
    qat_dir = run_copy / "tiny" / "qat-w8a8"
    qat_dir.mkdir()
    args = ["--checkpoint-dir", str(run_copy), "--mode", "qat", "--epochs", "1", "--calib-batches", "1",
            "--no-builtin-qat", "--no-latency"]
    with output_dir_lock(qat_dir, "the QAT run folder"):
        code, err = _quantize(args, capsys)
    _one_line(code, err, f"the QAT run folder: {qat_dir} is in use by another run")
    assert sorted(p.name for p in qat_dir.iterdir()) == [".lock"]
    ck = tmp_path / "train"
    (ck / "fake-resnet20").mkdir(parents=True)
    with output_dir_lock(ck / "fake-resnet20", "--checkpoint-dir"):
        code, err = _train(tiny_args(ck), capsys)
    _one_line(code, err, "is in use by another run")
    assert not (ck / "fake-resnet20" / "last.ckpt").exists()
    assert _train(tiny_args(ck, "--epochs", "1"), capsys)[0] == 0  # released


# ---------------------------------------------------------------------------------------------- late checks


def test_conflicting_precision_flags_fail_before_ptq(run_copy: Path, capsys) -> None:
    code, err = _quantize(["--checkpoint-dir", str(run_copy), "--mode", "qat", "--opt-level", "O2", "--precision",
                           "bf16-mixed", "--no-latency"], capsys)
    _one_line(code, err, "either --precision or --opt-level")
    assert not (run_copy / "tiny" / "ptq-w8a8.ckpt").exists()


def test_checkpoint_weights_that_do_not_fit_name_the_tensors(run_copy: Path, capsys) -> None:
    path = run_copy / "tiny" / "best.ckpt"
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 4)
    ckpt["state_dict"][name] = torch.zeros(3, 3, 1, 1)
    torch.save(ckpt, path)
    code, err = _quantize(["--checkpoint-dir", str(run_copy), "--no-latency"], capsys)
    _one_line(code, err, "does not match its architecture", name, "(3, 3, 1, 1)")
    ckpt["state_dict"]["model.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    code, err = _quantize(["--checkpoint-dir", str(run_copy), "--no-latency"], capsys)
    _one_line(code, err, "does not match its architecture", "unexpected model.extra.weight")


def test_resumed_qat_reuses_ptq_and_torch_ao_rows(run_copy: Path, capsys) -> None:
    args = ["--checkpoint-dir", str(run_copy), "--mode", "qat", "--epochs", "1", "--calib-batches", "2",
            "--no-latency"]
    assert _quantize(args, capsys)[0] == 0
    first = {r["variant"]: r for r in report_rows(run_copy / "tiny")}
    ptq_file = (run_copy / "tiny" / "ptq-w8a8.ckpt").read_bytes()
    assert _quantize([*args, "--resume", "last"], capsys)[0] == 0
    again = {r["variant"]: r for r in report_rows(run_copy / "tiny")}
    assert (run_copy / "tiny" / "ptq-w8a8.ckpt").read_bytes() == ptq_file  # not recalibrated, not rewritten
    assert "reused from ptq-w8a8.ckpt" in again["ptq"]["note"]
    assert "reused from" in again["builtin-qat"]["note"]
    for variant in ("ptq", "builtin-qat"):
        assert again[variant]["top1"] == first[variant]["top1"]
        assert again[variant]["fixed_vs_fp32"] == first[variant]["fixed_vs_fp32"]
    assert again["builtin-qat"]["size_bytes"] == first["builtin-qat"]["size_bytes"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--weight-rounding", "adaround", "--adaround-iters", "0"], "--adaround-iters must be positive, got 0"),
    (["--weight-rounding", "adaround", "--adaround-lr", "-1"], "--adaround-lr must be positive, got -1.0"),
    (["--cle", "--stats-file", "stats.yaml"], "--cle with --stats-file"),
    (["--ptq-recipe", "brevitas"], "invalid --ptq-recipe 'brevitas'; choose from auto, nearest, gptq, adaround"),
])
def test_bad_ptq_step_flags(run_copy: Path, flags: list[str], message: str, capsys) -> None:
    code, err = _quantize(["--checkpoint-dir", str(run_copy), "--bits", "4", "--no-latency", *flags], capsys)
    _one_line(code, err, message)
    assert not (run_copy / "tiny" / "ptq-w4a4.ckpt").exists()
