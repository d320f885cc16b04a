"""Atomic writes: a save that dies midway leaves the previous file intact and no temporary file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_args

import lit_quant.io as lq_io
import train
from lit_quant.io import atomic_write_text
from lit_quant.app.training import AtomicCheckpointIO

pytestmark = pytest.mark.slow


def test_interrupted_text_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def dies(fh):
        fh.write(b"half of the new con")
        raise KeyboardInterrupt  # stands in for a kill between two writes

    with pytest.raises(KeyboardInterrupt):
        lq_io.atomic_write(target, dies)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checkpoint_save_that_dies_midway_keeps_last_ckpt(tmp_path: Path, monkeypatch) -> None:
    assert train.main(tiny_args(tmp_path, "--run-name", "r", "--epochs", "1")) == 0
    last = tmp_path / "r" / "last.ckpt"
    before = last.read_bytes()

    def partial_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, last)
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".lit-quant.tmp")]
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["epoch"] == 0


#: A sitecustomize module that holds a save of ``last.ckpt`` in its fsync until the test says go: the
#: deterministic window in which a second process runs (``HOLD_DIR``: where the two marker files live).
_HOLD_SAVE = '''
import os, time
_fsync = os.fsync
def fsync(fd):
    hold = os.environ.get("HOLD_DIR")
    if hold and ".last.ckpt." in os.readlink(f"/proc/self/fd/{fd}") and not os.path.exists(hold + "/go"):
        open(hold + "/saving", "w").close()
        while not os.path.exists(hold + "/go"):
            time.sleep(0.01)
    _fsync(fd)
os.fsync = fsync
'''


@pytest.mark.parametrize("second", ["quantize", "train"])
def test_a_second_run_never_removes_a_save_in_progress(tmp_path: Path, second: str) -> None:
    """While a training run is inside its save of last.ckpt, a quantize.py run on that run folder (or a
    second train.py, refused by the folder's lock) cleans up stale temporary files: the live save's file is
    not one of them, and the first run ends with its last.ckpt."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT, run_script

    hook, hold = tmp_path / "hook", tmp_path / "hold"
    hook.mkdir(), hold.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_SAVE)
    root = tmp_path / "checkpoints"
    args = tiny_args(root, "--run-name", "run", "--epochs", "1")
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "HOLD_DIR": str(hold)}
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (hold / "saving").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        temp = [p for p in (root / "run").iterdir() if p.name.startswith(".last.ckpt.")]
        assert len(temp) == 1  # the save in progress
        if second == "quantize":
            proc = run_script("quantize.py", "--ckpt", str(root / "run" / "best.ckpt"), "--calib-batches", "1",
                              "--no-latency", "--no-progress")
            assert proc.returncode == 0, proc.stderr
        else:
            proc = run_script("train.py", *args)
            assert proc.returncode == 2 and "in use by another run" in proc.stderr
        assert temp[0].exists()
    finally:
        (hold / "go").touch()
        out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert torch.load(root / "run" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_two_quantize_runs_in_the_same_second_keep_both_results(trained: Path, monkeypatch) -> None:
    """Report folders are named by the UTC second and a random suffix: two runs in one second (the clock
    held still here) write two folders, each with its report and quantized checkpoint; the run folder's
    report.json and ptq checkpoints name the newest of them, whole."""
    import json
    import time

    import quantize

    still = time.gmtime(0)
    monkeypatch.setattr(time, "gmtime", lambda *_: still)
    for bits in ("8", "6"):
        assert quantize.main(["--checkpoint-dir", str(trained), "--bits", bits, "--calib-batches", "1",
                              "--no-latency", "--no-progress"]) == 0
    run = trained / "tiny"
    folders = sorted(p for p in (run / "quantize").iterdir() if p.name.startswith("19700101-000000-"))
    assert len(folders) == 2
    widths = {json.loads((f / "report.json").read_text())["rows"][1]["weight_bits"]: f for f in folders}
    assert set(widths) == {8, 6}
    assert (widths[8] / "ptq-w8a8.ckpt").is_file() and (widths[6] / "ptq-w6a6.ckpt").is_file()
    assert (run / "report.json").read_bytes() == (widths[6] / "report.json").read_bytes()
    assert (run / "ptq-w8a8.ckpt").read_bytes() == (widths[8] / "ptq-w8a8.ckpt").read_bytes()


def test_a_report_folder_another_run_writes_is_refused(trained: Path, capsys) -> None:
    """--name of a folder another live run holds: one line, and that folder is not touched."""
    import fcntl

    from lit_quant.app.cli import run_cli

    import quantize

    folder = trained / "tiny" / "quantize" / "busy"
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("the other run's")
    with (folder / ".lock").open("w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        code = run_cli(quantize.main, ["--checkpoint-dir", str(trained), "--name", "busy", "--no-latency"],
                       prog="quantize.py")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "in use by another run" in err
    assert (folder / "report.json").read_text() == "the other run's"
