"""Resume: a run killed with SIGKILL mid-epoch and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import pytest

from pathlib import Path

import torch
from conftest import kill_after_checkpoint, run_script, tiny_args

import train

pytestmark = pytest.mark.slow


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    common = ["--fake-size", "512", "--epochs", "5", "--deterministic", "--run-name", "r", "--augment"]
    reference = run_script("train.py", *tiny_args(tmp_path / "ref", *common))
    assert reference.returncode == 0, reference.stderr[-2000:]

    ckpt_dir = tmp_path / "killed"
    last = ckpt_dir / "r" / "last.ckpt"
    kill_after_checkpoint("train.py", tiny_args(ckpt_dir, *common), last)
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert epoch_at_kill < 4  # it really was interrupted before the end

    resumed = run_script("train.py", "--resume", "last", "--checkpoint-dir", str(ckpt_dir), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    _assert_same_weights(ckpt_dir / "r" / "last.ckpt", tmp_path / "ref" / "r" / "last.ckpt")
    # optimizer momentum and scheduler position were restored too: the final learning rate matches
    a = torch.load(ckpt_dir / "r" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "ref" / "r" / "last.ckpt", map_location="cpu", weights_only=True)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert a["global_step"] == b["global_step"]


def test_resume_o2_restores_fp32_masters(tmp_path: Path) -> None:
    """O2 keeps fp32 master weights; resuming must continue from them, not from the bf16 model copy."""
    # constant learning rate: a cosine schedule would depend on the planned number of epochs
    common = ["--deterministic", "--opt-level", "O2", "--run-name", "o2", "--scheduler", "none"]
    assert train.main(tiny_args(tmp_path / "ref", *common, "--epochs", "3")) == 0
    assert train.main(tiny_args(tmp_path / "split", *common, "--epochs", "2")) == 0
    assert train.main(["--resume", "last", "--checkpoint-dir", str(tmp_path / "split"), "--epochs", "3"]) == 0
    _assert_same_weights(tmp_path / "split" / "o2" / "last.ckpt", tmp_path / "ref" / "o2" / "last.ckpt")


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    assert train.main(tiny_args(tmp_path, "--run-name", "done", "--epochs", "1")) == 0
    before = _weights(tmp_path / "done" / "last.ckpt")
    assert train.main(["--resume", "last", "--checkpoint-dir", str(tmp_path)]) == 0
    after = _weights(tmp_path / "done" / "last.ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before)
